"""`make bench-methods`: what each training method does to the model, on a tiny model (random weights,
the synthetic concepts; `--family` picks the family, `--model` another model folder).

For each method it trains the same steps on one shared cache and then measures, at 16 fresh noise and
timestep draws per image (seeded alike for every method, none of them seen in training):

- **drift**: the mean squared difference between the trained model's and the base model's predictions on
  the held-out prior images: what the priors should keep near zero;
- **concept loss**: the mean flow-matching loss on the held-out standard images, trained and base; concept
  match is the share of the base's loss the training removed (1 - trained / base).

Methods: full fine-tuning with and without prior images (lr 1e-4), a LoRA, and a LoKr whose rank and
factor are chosen to have about the LoRA's parameter count (both on the attention preset, alpha = rank,
lr 1e-3). Prints a markdown table and a JSON line.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from pathlib import Path

import click
import torch

CONFIG = """
[model]
path = "{model}"
max_sequence_length = 32
[data]
resolution = 64
buckets = false
[[concepts]]
folder = "{data}/standard"
{prior}
[[concepts]]
folder = "{data}/heldout-standard"
type = "validation"
[[concepts]]
folder = "{data}/heldout-prior"
type = "validation"
prior = true
[cache]
dir = "{cache}"
variants = 2
[optimizer]
lr = {lr}
max_grad_norm = 1.0
[train]
dtype = "fp32"
batch_size = 4
max_steps = {steps}
output_dir = "{out}"
{train}
[lora]
{lora}
"""
PRIOR = '[[concepts]]\nfolder = "{data}/prior"\ntype = "prior"'
DRAWS = 16


def _config(root: Path, model: Path, data: Path, name: str, steps: int, lr: float, priors: bool, train: str,
            lora: str):
    from pipeline.config import load_config

    path = root / f"{name}.toml"
    path.write_text(CONFIG.format(model=model, data=data, cache=root / "cache", out=root / name, steps=steps, lr=lr,
                                  prior=PRIOR.format(data=data) if priors else "", train=train, lora=lora))
    return load_config(path)


def lokr_like(model: torch.nn.Module, lora_rank: int, presets: dict) -> tuple[int, int, int, int]:
    """(LoKr rank, lokr_factor, its parameter count, the LoRA's): the LoKr whose count is nearest the LoRA's
    (a LoKr whose factors are whole has a count set by its factor, not its rank)."""
    from pipeline.config import LoraConfig
    from pipeline.memory import lora_bytes

    count = lambda cfg: lora_bytes(model, cfg, presets, "adamw")["lora"] // 4  # noqa: E731
    want = count(LoraConfig(rank=lora_rank))
    rank, factor = min(((r, f) for r in range(1, 33) for f in (-1, 2, 4, 8, 16)),
                       key=lambda rf: abs(count(LoraConfig(rank=rf[0], type="lokr", lokr_factor=rf[1])) - want))
    return rank, factor, count(LoraConfig(rank=rank, type="lokr", lokr_factor=factor)), want


def measure(cfg, trained: torch.nn.Module) -> dict:
    """Drift and concept loss of `trained` against the base model at DRAWS fresh draws per held-out image."""
    from pipeline.data.batches import load_inputs
    from pipeline.data.draws import fresh_seeds
    from pipeline.data.plan import make_plan
    from pipeline.denoiser.model import Denoiser, forward
    from pipeline.objective import per_sample_mse
    from pipeline.store.store import Store

    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    base = plan.family.load_denoiser(torch.device("cpu"), torch.float32)
    cpu = torch.device("cpu")
    models = {"base": Denoiser(base, cpu, torch.float32), "trained": Denoiser(trained.eval(), cpu, torch.float32)}
    drift, loss = [], {"base": [], "trained": []}
    with torch.no_grad():
        for i, s in enumerate(plan.held_out):
            for k in range(DRAWS):  # steps no run reaches: draws that training never saw
                inputs = load_inputs(plan, store, [(s, 0)], [fresh_seeds(cfg, 10**6 + k, i)])
                pred = {name: forward(plan.family, m, inputs).float() for name, m in models.items()}
                if s.prior:
                    drift.append(per_sample_mse(pred["trained"], pred["base"]).item())
                else:
                    target = plan.family.target(inputs.latents, inputs.noise, inputs.timesteps)
                    for name in loss:
                        loss[name].append(per_sample_mse(pred[name], target).item())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    base_loss, trained_loss = mean(loss["base"]), mean(loss["trained"])
    return {"drift": mean(drift), "concept_loss_base": base_loss, "concept_loss": trained_loss,
            "concept_match": 1 - trained_loss / base_loss}


@click.command()
@click.option("--steps", default=60, show_default=True, help="optimizer steps per method")
@click.option("--model", "model_dir", default=None, type=click.Path(file_okay=False),
              help="a model folder (default: the tiny Flux, built in a temporary folder)")
@click.option("--family", default=None, help="the tiny model of this family (default: the embedded default's)")
@click.option("--lora-rank", default=4, show_default=True)
def main(steps: int, model_dir: str | None, family: str | None, lora_rank: int):
    from pipeline import tiny
    from pipeline.cache.stage import run_cache
    from pipeline.config import EmbeddedConfig
    from pipeline.families import tiny_module
    from pipeline.train.stage import train_lora

    root = Path(tempfile.mkdtemp(prefix="prior-lora-methods-"))
    data = root / "data"
    tiny.build_synthetic_concepts(data)
    model = Path(model_dir) if model_dir else root / "model"
    if not model_dir:
        tiny_module(family or EmbeddedConfig().family).build(model)
    probe = _config(root, model, data, "probe", steps, 1e-4, True, "", f"rank = {lora_rank}")
    from pipeline.data.plan import make_plan

    fam = make_plan(probe).family
    lokr_rank, factor, lokr_count, lora_count = lokr_like(fam.load_denoiser(torch.device("cpu"), torch.float32),
                                                          lora_rank, fam.target_presets)
    methods = {
        "full, with priors": (True, 'method = "full"', "", 1e-4),
        "full, without priors": (False, 'method = "full"', "", 1e-4),
        # both adapters at scale 1 (alpha = rank) and the same learning rate
        f"LoRA rank {lora_rank} ({lora_count:,} params), with priors":
            (True, "", f"rank = {lora_rank}\nalpha = {lora_rank}", 1e-3),
        f"LoKr rank {lokr_rank}, factor {factor} ({lokr_count:,} params), with priors":
            (True, "", f'type = "lokr"\nrank = {lokr_rank}\nalpha = {lokr_rank}\nlokr_factor = {factor}', 1e-3),
    }
    results = {}
    for i, (name, (priors, train, lora, lr)) in enumerate(methods.items()):
        cfg = _config(root, model, data, f"run{i}", steps, lr, priors, train, lora)
        run_cache(cfg, progress=False)
        trained, _ = train_lora(cfg, progress=False)
        results[name] = measure(cfg, trained)
    click.echo(f"Measured on {datetime.date.today()}, {steps} steps, batch 4, fp32, {DRAWS} fresh draws per held-out "
               "image:\n")
    click.echo("| method | drift (held-out priors) | concept loss (base -> trained) | concept match |")
    click.echo("|---|---|---|---|")
    for name, r in results.items():
        click.echo(f"| {name} | {r['drift']:.3g} | {r['concept_loss_base']:.4f} -> {r['concept_loss']:.4f} | "
                   f"{r['concept_match']:.1%} |")
    click.echo(json.dumps({"steps": steps, "results": results}))


if __name__ == "__main__":
    main()
