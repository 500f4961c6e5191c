"""`make bench-gpu`: each family's full-size public denoiser (its planning capability's configs, built by
pipeline/tools/public_configs.py) with random weights built directly on the GPU, at 1024 px: the cache stage's
latents/s (the family's full-size VAE encoding cache.batch_size images, in model.encoder_dtype) and, for each
model.quantize (none = bf16, int8, fp8, nf4), priors/s of the cache stage's no-grad forward, training
s/step for a standard and a cached-prior batch (one forward) and an online-prior batch (the peers' extra
forward), peak memory beside the planner's estimate, and model FLOPs utilisation (FLOPs counted by
torch's FlopCounterMode over one step, against the GPU's bf16 dense peak). Without CUDA it says so in
one line and exits 0. Quantized rows need torchao (int8, fp8) and bitsandbytes (nf4)."""

from __future__ import annotations

import json
import time

import click
import torch

from pipeline.families import FAMILIES

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def _quantize(model, quantize: str) -> None:
    if quantize in ("int8", "fp8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig() if quantize == "int8" else Float8WeightOnlyConfig())
    elif quantize == "nf4":
        import bitsandbytes as bnb

        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    if child.bias is not None:
                        q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(parent, name, q.cuda())


def _timed(fn, steps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_vae(name: str, resolution: int, steps: int, batch: int, dtype: torch.dtype) -> dict:
    """The cache stage's latents/s: the family's full-size VAE (public config, random weights, built on the
    GPU) encoding `batch` images of `resolution` px with the stage's own encode_images, and its peak."""
    from diffusers import AutoencoderKL

    from pipeline.memory import GiB
    from pipeline.tools.public_configs import planning, public_family

    family, dev = public_family(name), torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with dev:
            vae = AutoencoderKL.from_config(dict(planning(name).vae_config)).eval()
    finally:
        torch.set_default_dtype(previous)
    pixels = torch.rand(batch, 3, resolution, resolution, device=dev) * 2 - 1
    seconds = _timed(lambda: family.encode_images(vae, pixels), steps)
    result = {"family": name, "vae_dtype": str(dtype).removeprefix("torch."), "resolution": resolution,
              "batch": batch, "latents_per_s": round(batch / seconds, 3),
              "vae_peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2)}
    del vae, pixels
    return result


def bench_one(name: str, quantize: str, resolution: int, steps: int, batch: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import LoraConfig
    from pipeline.denoiser.lora import add_lora
    from pipeline.memory import GiB, Settings, estimate
    from pipeline.tools.public_configs import planning, public_family

    family, config = public_family(name), dict(planning(name).denoiser_config)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.set_default_dtype(dtype)
    try:
        with dev:  # random weights allocated on the GPU directly: no download, no CPU copy
            model = family.denoiser_class.from_config(config, **family.denoiser_kwargs)
    finally:
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    _quantize(model, quantize)
    latent, cond = family.planning.dry_run_shapes(config, batch, resolution, 0)
    noisy = torch.randn(latent, device=dev)
    cond = {k: torch.randn(s, device=dev) for k, s in cond.items()}
    timesteps = torch.full((batch,), 500.0, device=dev)
    predict = lambda: family.predict(model, noisy, timesteps, cond, device=dev, dtype=dtype)  # noqa: E731
    model.eval()
    with torch.no_grad():
        prior_s = _timed(predict, steps)
    params = add_lora(model, LoraConfig(), family.target_presets)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn(latent, device=dev)

    def train_step(online=False):
        if online:
            with torch.no_grad():
                model.disable_adapters()
                predict()
                model.enable_adapters()
        loss = ((predict().float() - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = _timed(train_step, steps)
    online_s = _timed(lambda: train_step(True), steps)
    with FlopCounterMode(display=False) as counter:
        train_step()
    flops = counter.get_total_flops()
    gpu = torch.cuda.get_device_name()
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    planned = estimate(family, config, LoraConfig(), Settings(quantize=quantize, batch_size=batch,
                                                               resolution=resolution, cache_batch_size=batch))
    result = {
        "family": name, "quantize": quantize, "resolution": resolution, "batch": batch, "gpu": gpu,
        "priors_per_s": round(batch / prior_s, 3), "train_s_per_step": round(step_s, 4),
        "cached_prior_s_per_step": round(step_s, 4),  # a cached-prior batch is one forward, as a standard one
        "online_prior_s_per_step": round(online_s, 4), "online_ratio": round(online_s / step_s, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
        "planned_train_gib": round(planned.train_peak / GiB, 2),
        "mfu": round(flops / step_s / peak_flops, 3) if peak_flops else None,
    }
    del model, opt, params
    return result


@click.command()
@click.option("--families", default=",".join(FAMILIES), show_default=True)
@click.option("--quantize", "quantizes", default="none,int8,fp8,nf4", show_default=True)
@click.option("--resolution", default=1024, show_default=True)
@click.option("--batch-size", default=1, show_default=True)
@click.option("--steps", default=3, show_default=True, help="Timed steps per measurement (after one warm-up).")
@click.option("--vae-batch-size", default=4, show_default=True, help="Images per VAE encode (cache.batch_size).")
@click.option("--vae-dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="The VAE's dtype (model.encoder_dtype).")
def main(families, quantizes, resolution, batch_size, steps, vae_batch_size, vae_dtype):
    if not torch.cuda.is_available():
        click.echo("bench-gpu: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured")
        return
    rows = []
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[vae_dtype]
    for name in families.split(","):
        try:
            vae_row = bench_vae(name, resolution, steps, vae_batch_size, dtype)
        except Exception as e:  # noqa: BLE001 - reported, the denoiser rows still run
            vae_row = {"family": name, "error": f"VAE: {type(e).__name__}: {str(e)[:160]}"}
        torch.cuda.empty_cache()
        click.echo(json.dumps(vae_row))
        for q in quantizes.split(","):
            try:
                rows.append({**bench_one(name, q, resolution, steps, batch_size),
                             **{k: v for k, v in vae_row.items() if k in ("latents_per_s", "vae_peak_gib")}})
            except Exception as e:  # noqa: BLE001 - one row's failure (OOM, a missing library) is reported
                rows.append({"family": name, "quantize": q, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            torch.cuda.empty_cache()
            click.echo(json.dumps(rows[-1]))
    head = ("family", "quantize", "latents_per_s", "vae_peak_gib", "priors_per_s", "train_s_per_step", "online_prior_s_per_step", "online_ratio",
            "peak_gib", "planned_train_gib", "mfu")
    click.echo("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        click.echo("| " + " | ".join(str(r.get(k, r.get("error", "-") if k == "priors_per_s" else "-")) for k in head)
                   + " |")


if __name__ == "__main__":
    main()
