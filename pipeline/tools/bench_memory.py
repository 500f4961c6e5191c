"""`make bench-memory`: the memory planner (pipeline/memory.py) against measured peaks on a CPU.

For each family, the public full-size denoiser config (its planning capability) at full width, cut to
one block of each kind, is saved with random weights as a normal diffusers folder; a config points
model.path at it and the real `python -m pipeline plan-memory --config F --json` estimates it. Each
measurement then runs in a fresh subprocess, which loads the folder as the stages do
(pipeline.denoiser.swap.load_denoiser; for training with the stages' prepare_model: the LoRA, gradient
checkpointing, and its build_optimizer) and measures:
- vae: the second of two encodes of cache.batch_size images by the family's full-size VAE (random weights,
  model.encoder_dtype), with the cache stage's encode_images, against the planner's VAE working set;
- prior: the second of two no-grad forwards (the cache stage's prior), against the planner's working set;
- train: the second of two steps (forward, MSE, backward, AdamW step, zero_grad), so the optimizer's state
  already exists, against activations + LoRA gradients + backward temporaries;
- static: what loading, the LoRA and the optimizer state hold before that step, against weights + LoRA +
  optimizer state (diffusers maps the safetensors, so the weights' pages come in during the first call).

How the peak is measured: torch's CPU allocator is plain malloc, which tracemalloc does not see. The
process's peak RSS (VmHWM in /proc/self/status) is reset through /proc/self/clear_refs just before the
measured call and read after it; the figure is that peak minus the RSS at the reset. glibc would keep
freed memory below its (growing) mmap threshold in its heap, so a freed tensor's pages could be reused
unseen or count twice; MALLOC_MMAP_THRESHOLD_ fixes that threshold at 64 KiB, so every tensor of note
is its own mapping, returned to the system when freed, and RSS follows the live tensors.
Not part of `make test` (minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from pipeline.families import FAMILIES, family_class
from pipeline.tools.public_configs import planning

GiB = 2**30
MiB = 2**20
MEASUREMENT = 2  # raised when what measure_peaks does changes: older entries of measured.json are not reused


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> int:
    """Free what malloc holds, reset the peak RSS, and return the RSS now."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
    return _status("VmRSS")


def _peak_of(fn) -> int:
    base = _reset_peak()
    fn()
    return _status("VmHWM") - base


def measure_peaks(config_path: str, kind: str) -> dict:
    """In this (fresh) process: the peaks of `kind` (prior or train) for the config's model folder."""
    import torch

    from pipeline.config import load_config
    from pipeline.families.load import get_family
    from pipeline.settings import TORCH_DTYPES
    from pipeline.denoiser.swap import load_denoiser
    from pipeline.train.optim import build_optimizer
    from pipeline.denoiser.build import prepare_model

    torch.set_num_threads(2)
    cfg = load_config(config_path)
    family = get_family(cfg.model)
    dtype, cpu = TORCH_DTYPES[cfg.train.dtype], torch.device("cpu")
    config = family.denoiser_class.load_config(family.root, subfolder=family.denoiser_component)
    latent, cond = family.planning.dry_run_shapes(config, cfg.train.batch_size, cfg.data.resolution,
                                                  cfg.model.max_sequence_length)
    torch.manual_seed(0)
    if kind == "vae":  # the cache stage's encode, with the family's own encode_images
        from diffusers import AutoencoderKL

        from pipeline.memory import vae_class

        vae_dtype = TORCH_DTYPES[cfg.model.encoder_dtype]
        encode = lambda: family.encode_images(vae, torch.rand(  # noqa: E731 - the images are made in the call
            cfg.cache.batch_size, 3, cfg.data.resolution, cfg.data.resolution, dtype=vae_dtype))
        start = _reset_peak()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(vae_dtype)
        try:
            vae_config = AutoencoderKL.load_config(family.root, subfolder="vae")
            vae = vae_class(vae_config).from_config(vae_config).eval()
        finally:
            torch.set_default_dtype(previous)
        encode()
        static = _reset_peak() - start
        return {"static": static, "peak": _peak_of(encode)}
    shapes = cond
    timesteps = torch.full((latent[0],), 500.0)
    start = _reset_peak()
    params: list = []
    model, _ = load_denoiser(family, cpu, dtype, 0, (lambda m: params.extend(prepare_model(m, cfg, family)))
                             if kind == "train" else None)

    if kind != "vae" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        # oneDNN copies a convolution's weight into its own layout on every call (up to 112 MiB for a
        # full-size UNet in fp32), which cuDNN does not: without it, torch's own conv holds only its im2col columns
        torch.backends.mkldnn.enabled = False

    def predict():  # the batch is made in the measured call: the planner counts it too (it is on the GPU)
        noisy, cond = torch.randn(latent), {k: torch.randn(s) for k, s in shapes.items()}
        return family.predict(model, noisy, timesteps, cond, device=cpu, dtype=dtype)

    if kind == "prior":
        model.eval()

        def prior():
            with torch.no_grad():
                predict()

        prior()  # safetensors are mapped: the weights' pages come in on first use
        static = _reset_peak() - start
        return {"static": static, "peak": _peak_of(prior)}
    model.train()
    optimizer = build_optimizer(params, cfg.optimizer)

    def step():
        loss = ((predict().float() - torch.randn(latent)) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state is made here, as in every step after the first
    static = _reset_peak() - start
    return {"static": static, "peak": _peak_of(step)}


def _config(path: Path, model: Path, name: str, resolution: int, ckpt: bool, dtype: str, seq: int) -> Path:
    # concepts are not read by plan-memory or by the measurement: the folder need not exist
    seq_line = f"max_sequence_length = {seq}\n" if planning(name).sequence_length_applies else ""
    path.write_text(f'[model]\npath = "{model}"\n{seq_line}[data]\nresolution = {resolution}\n'
                    f'[[concepts]]\nfolder = "{path.parent / "no-images"}"\ntype = "standard"\n'
                    f'[cache]\nbatch_size = 1\n[lora]\nrank = 16\n'
                    f'[train]\ndtype = "{dtype}"\nbatch_size = 1\ngradient_checkpointing = {str(ckpt).lower()}\n')
    return path


def _run(args: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cpu_prior(model: Path, name: str, resolution: int, dtype: str, seq: int) -> int:
    """The planner's prior working set with the im2col columns of torch's CPU convolution (a UNet's; a
    GPU has no such buffer), which is what a CPU measurement of the prior forward holds."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.memory import prior_working

    cls = family_class(name)
    family = cls(model, ModelConfig(path=str(model)))
    config = cls.denoiser_class.load_config(model, subfolder=cls.denoiser_component)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    seq = seq if family.planning.sequence_length_applies else 0
    return prior_working(family, config, 1, resolution, torch_dtype, seq, cpu_conv=True)


def _measured(work: Path, cfg: Path, kind: str, fresh: bool, conv: bool) -> dict:
    """A measurement, kept in work/measured.json under the config's text and the kind: a measurement does
    not depend on the planner, so changing the planner re-runs only plan-memory (--fresh measures again)."""
    store = work / "measured.json"
    known = json.loads(store.read_text()) if store.is_file() else {}
    # a conv denoiser is measured without oneDNN (see measure_peaks): the key says so
    key = f"{MEASUREMENT}\n{kind}{' no-onednn' if conv and kind != 'vae' else ''}\n{cfg.read_text()}"
    if fresh or key not in known:
        known[key] = _run(["-m", "pipeline.tools.bench_memory", "--measure", kind, "--config", str(cfg)])
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(store)  # atomic
    return known[key]


def rows(name: str, work: Path, resolutions: list[int], dtype: str, seq: int, blocks: int, fresh: bool) -> list[dict]:
    from pipeline.tools.public_configs import save_cut_model

    import torch

    model = work / f"{name}-cut{blocks}-{dtype}"
    if not (model / "model_index.json").is_file():
        save_cut_model(name, model, blocks, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    out = []
    for res in resolutions:
        for ckpt in (False, True):
            cfg = _config(work / f"{name}-{res}-{int(ckpt)}.toml", model, name, res, ckpt, dtype, seq)
            plan = _run(["-m", "pipeline", "plan-memory", "--config", str(cfg), "--json"])
            p = plan["parts"]
            kinds = ("vae", "prior", "train") if not ckpt else ("train",)  # no-grad forwards: no checkpointing
            for kind in kinds:
                got = _measured(work, cfg, kind, fresh, planning(name).conv_denoiser)
                if kind == "vae":
                    planned = plan["working_sets"]["vae"]
                    static = plan["cache_parts"]["vae"] - planned - p["overhead"]
                elif kind == "prior":
                    planned = plan["working_sets"]["denoiser prior forward"]
                    static = p["weights"]
                    cpu = _cpu_prior(model, name, res, dtype, seq)
                else:
                    planned = p["activations"] + p["lora_grads"] + p["backward_temporaries"]
                    static = p["weights"] + p["lora"] + p["optimizer_state"]
                if kind != "prior":
                    cpu = planned
                row = {"family": name, "resolution": res, "kind": kind, "checkpointing": ckpt if kind == "train" else None,
                       "measured_mib": round(got["peak"] / MiB), "planned_mib": round(planned / MiB),
                       "ratio": round(got["peak"] / planned, 2),
                       "cpu_planned_mib": round(cpu / MiB), "cpu_ratio": round(got["peak"] / cpu, 2),
                       "static_measured_mib": round(got["static"] / MiB), "static_planned_mib": round(static / MiB),
                       "static_ratio": round(got["static"] / static, 2)}
                click.echo(json.dumps(row), err=True)
                out.append(row)
    return out


@click.command()
@click.option("--families", default=",".join(FAMILIES), show_default=True)
@click.option("--resolutions", default="256,512", show_default=True)
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]))
@click.option("--max-sequence-length", "seq", default=128, show_default=True,
              help="Text tokens (of the families whose model.max_sequence_length applies).")
@click.option("--blocks", default=1, show_default=True, help="Blocks of each kind in the cut models.")
@click.option("--work", default="cache/bench-memory", show_default=True, type=click.Path(file_okay=False))
@click.option("--fresh", is_flag=True, help="Measure again what work/measured.json already holds.")
@click.option("--measure", type=click.Choice(["vae", "prior", "train"]), default=None, hidden=True)
@click.option("--config", "config_path", default=None, hidden=True)
def main(families, resolutions, dtype, seq, blocks, work, fresh, measure, config_path):
    if measure:  # the subprocess
        click.echo(json.dumps(measure_peaks(config_path, measure)))
        return
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    table = []
    for name in families.split(","):
        table += rows(name, work, [int(r) for r in resolutions.split(",")], dtype, seq, blocks, fresh)
    plans = [planning(name) for name in FAMILIES if family_class(name).planning is not None]
    texts = " and ".join(p.label for p in plans if p.sequence_length_applies)
    convs = ", ".join(p.label for p in plans if p.conv_denoiser)
    click.echo(f"measured on CPU ({dtype}, batch 1, LoRA rank 16 on attention, AdamW, {blocks} block(s) of "
               f"each kind at full width, {seq} text tokens for {texts}); MiB")
    click.echo("ratio = measured / planned; CPU planned: the prior forward with the CPU convolution's im2col "
               f"columns ({convs}); static: weights (+ LoRA and optimizer state for training)")
    click.echo("| family | px | measured | checkpointing | measured | planned | ratio | CPU planned | ratio | "
               "static measured | static planned | ratio |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        ck = "-" if r["checkpointing"] is None else ("on" if r["checkpointing"] else "off")
        what = {"vae": "VAE encode", "prior": "prior forward", "train": "train step"}[r["kind"]]
        click.echo(f"| {r['family']} | {r['resolution']} | {what} | {ck} | {r['measured_mib']} | {r['planned_mib']} | "
                   f"{r['ratio']} | {r['cpu_planned_mib']} | {r['cpu_ratio']} | {r['static_measured_mib']} | {r['static_planned_mib']} | {r['static_ratio']} |")


if __name__ == "__main__":
    main()
