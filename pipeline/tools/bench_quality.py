"""`make bench-quality`: does prior prediction preserve the model, and how well against the peers' way?

One LoRA per mode on the same data, steps and seeds (the tiny base of pipeline/tinybase where it is
shipped, else the random-weight tiny model of the embedded default's family):

  none          the prior concept at loss weight 0 (its samples still in the batches: same data, same order)
  cached_k1/4/16  cached priors with cache.variants = K draws per prior image
  online_fresh  the peers' way: train.prior_mode = "online", a fresh draw and a LoRA-disabled forward each step

and for each:

  drift_train_prior, drift_heldout_prior  MSE between the LoRA model's and the base's predictions at
                 DRAWS fresh noise/timestep draws per image (seeds no training step uses), averaged over the
                 training prior images and over held-out prior images (scenes of combinations the base never saw)
  concept_match  share of trigger-prompt samples ("a sks teapot on a red table") the judge reads as the
                 concept (a yellow round teapot) on the named table
  class_preservation  share of class-prompt samples (held-out combinations, "a red tall teapot on a green
                 table") the judge reads as their caption
  seconds_per_step  the median of the run's steps (metrics.jsonl)

base_caption_accuracy is the base's own share on those class prompts, the ceiling of class_preservation.
The last stdout line is the JSON of issue 22; the table above it says the settings.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

DRAWS = 16  # fresh draws per image for the drift

# mode -> (cache.variants, train.prior_mode, the prior concept's loss weight)
MODES = {"none": (4, "cached", 0.0), "cached_k1": (1, "cached", 1.0), "cached_k4": (4, "cached", 1.0),
         "cached_k16": (16, "cached", 1.0), "online_fresh": (1, "online", 1.0)}

CONFIG = """
[model]
path = "{model}"
max_sequence_length = {max_sequence_length}
guidance = 1.0
[data]
resolution = 64
buckets = false
auto_hold_out = 0
prior_ratio = {prior_ratio}
[[concepts]]
folder = "data/concept"
[[concepts]]
folder = "data/prior"
type = "prior"
loss_weight = {prior_weight}
{heldout}
[cache]
dir = "cache"
variants = {variants}
batch_size = 16
[lora]
rank = {rank}
alpha = {rank}.0
[optimizer]
lr = {lr}
[train]
dtype = "fp32"
device = "cpu"
batch_size = {batch}
max_steps = {steps}
seed = 0
prior_mode = "{prior_mode}"
output_dir = "out/{mode}"
checkpoint_every = {steps}
{validation}
"""

HELDOUT = '[[concepts]]\nfolder = "data/heldout-prior"\ntype = "validation"\nprior = true'


def concept_prompts(limit: int | None = None) -> list[str]:
    """The trigger prompts, one per table colour (the first `limit`)."""
    from pipeline.tinybase.scenes import COLOURS, Scene, caption_for

    return [caption_for(Scene(table=t, sks=True)) for t in COLOURS][:limit]


def class_prompts(limit: int | None = None) -> list[str]:
    """The class prompts: the held-out combinations' captions (the first `limit`)."""
    from pipeline.tinybase.scenes import HELDOUT as COMBOS, caption_for

    return [caption_for(c) for c in COMBOS][:limit]


def write_data(root: Path, concept: int, prior: int, heldout: int) -> None:
    """The concept ("a sks teapot on a <table> table"), prior images of trained combinations and held-out
    prior images of held-out combinations, each a PNG with its caption, all from scenes.render."""
    from pipeline.tinybase.scenes import COLOURS, HELDOUT as HELD, TRAIN, Scene, caption_for, render

    tables = list(COLOURS)
    folders = {"concept": [Scene(table=tables[i % len(tables)], sks=True) for i in range(concept)],
               "prior": [TRAIN[(i * 7) % len(TRAIN)] for i in range(prior)],  # spread over the combinations
               "heldout-prior": [HELD[i % len(HELD)] for i in range(heldout)]}
    for k, (name, chosen) in enumerate(folders.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(chosen):
            render(scene, seed=1000 * (k + 1) + i).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(caption_for(scene) + "\n")


@torch.no_grad()
def drift(plan, store, denoiser, samples, draws: int = DRAWS, label: str = "bench-quality-drift") -> float:
    """Mean over `samples` of the MSE between the denoiser's predictions with its LoRA and without (the base)
    at `draws` fresh noise/timestep draws per sample, from seeds of (`label`, image, draw): no training
    step draws them (its seeds are of train.seed, step and position)."""
    from pipeline.data.batches import load_inputs
    from pipeline.denoiser.model import forward
    from pipeline.objective import per_sample_mse
    from pipeline.store.keys import derive_seed

    model = denoiser.module
    model.eval()
    values = []
    try:
        for s in samples:
            key = s.content_key  # by content: the same image gets the same draws in every mode
            fresh = [(derive_seed(label, "noise", key, j), derive_seed(label, "timestep", key, j)) for j in range(draws)]
            inputs = load_inputs(plan, store, [(s, 0)] * draws, fresh)
            lora = forward(plan.family, denoiser, inputs)
            model.disable_adapters()
            try:
                base = forward(plan.family, denoiser, inputs)
            finally:
                model.enable_adapters()
            values.append(float(per_sample_mse(lora, base).mean()))
    finally:
        model.train()
    return sum(values) / len(values)


def judged(images, prompts, wanted) -> float:
    """Share of images the judge reads as `wanted(prompt)` (a caption naming what must be seen)."""
    from pipeline.tinybase import judge

    hits = [judge.matches(im, wanted(p)) for im, p in zip(images, prompts)]
    return sum(hits) / len(hits)


def as_concept(prompt: str) -> str:
    """What a trigger prompt's sample must show: the concept's body and shape on the named table."""
    return prompt.replace("sks teapot", "yellow round teapot")


def render_all(plan, store, denoiser, prompts, seeds):
    from pipeline.train.validation import render_prompts

    images, labels = [], []
    for seed in seeds:
        images += render_prompts(plan, store, denoiser, prompts, seed)
        labels += prompts
    return images, labels


def run_mode(root: Path, mode: str, model: Path, steps: int, settings: dict, seeds: list[int], base: dict) -> dict:
    """Cache and train one mode, then measure it (`base`: filled with the base's accuracy on first use)."""
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.data.plan import make_plan
    from pipeline.denoiser.build import build_denoiser
    from pipeline.store.store import Store
    from pipeline.train import checkpoint
    from pipeline.tinybase.shipped import MAX_SEQUENCE_LENGTH
    from pipeline.train.stage import run_train

    variants, prior_mode, weight = MODES[mode]
    values = dict(model=model, max_sequence_length=MAX_SEQUENCE_LENGTH, prior_weight=weight, variants=variants,
                  prior_mode=prior_mode, mode=mode, steps=steps, **settings)
    n = len(concept_prompts(settings["prompts"]))
    prompts = concept_prompts(settings["prompts"]) + class_prompts(settings["prompts"])
    validation = (f"[validation]\nprompts = {json.dumps(prompts)}\nsteps = {settings['sample_steps']}\n"
                  "guidance_scale = 1.0")
    (root / f"{mode}.toml").write_text(CONFIG.format(heldout="", validation="", **values))
    # the same run with what is measured: held-out prior images and the prompts, cached, never trained on
    (root / f"{mode}-eval.toml").write_text(CONFIG.format(heldout=HELDOUT, validation=validation, **values))
    cfg, eval_cfg = load_config(root / f"{mode}.toml"), load_config(root / f"{mode}-eval.toml")
    run_cache(eval_cfg, progress=False)
    run_train(cfg, progress=False, restart=True)
    out = Path(cfg.train.output_dir)
    seconds = statistics.median(json.loads(x)["seconds"] for x in open(out / "metrics.jsonl"))
    plan, store = make_plan(eval_cfg), Store(eval_cfg.cache.dir)
    try:
        torch.manual_seed(0)
        denoiser, _ = build_denoiser(eval_cfg, plan.family, torch.device("cpu"), torch.float32)
        checkpoint.restore_lora(sorted((out / "checkpoints").iterdir())[-1], denoiser.module)
        train_prior = [s for s in plan.training if s.prior]
        heldout_prior = [s for s in plan.held_out if s.prior]
        if "accuracy" not in base:
            denoiser.module.disable_adapters()
            try:
                images, labels = render_all(plan, store, denoiser, prompts[n:], seeds)
            finally:
                denoiser.module.enable_adapters()
            base["accuracy"] = judged(images, labels, lambda p: p)
            base["grid"] = (images, labels)
        images, labels = render_all(plan, store, denoiser, prompts, seeds)
        concept = [(im, p) for im, p in zip(images, labels) if p in prompts[:n]]
        classes = [(im, p) for im, p in zip(images, labels) if p not in prompts[:n]]
        result = {
            "drift_train_prior": drift(plan, store, denoiser, train_prior),
            "drift_heldout_prior": drift(plan, store, denoiser, heldout_prior),
            "class_preservation": judged(*zip(*classes), lambda p: p),
            "concept_match": judged(*zip(*concept), as_concept),
            "seconds_per_step": seconds,
        }
    finally:
        store.close()
    from pipeline.train.validation import save_grid

    save_grid(images, root / f"samples-{mode}.png", columns=len(prompts), labels=[f"{mode}: {p}" for p in labels])
    return result


def rounded(result: dict) -> dict:
    """Four significant digits: drifts are small numbers."""
    return {k: float(f"{v:.4g}") for k, v in result.items()}


def print_table(modes: dict, accuracy: float, settings: dict, steps: int, seeds: list[int], seconds: float) -> None:
    click.echo(f"\nprior prediction's quality: {steps} steps per mode, batch {settings['batch']}, lr {settings['lr']}, "
               f"LoRA rank {settings['rank']}, prior ratio {settings['prior_ratio']}, fp32 on the CPU; drift: MSE "
               f"to the base at {DRAWS} fresh draws per image; samples: {settings['sample_steps']} steps, "
               f"{len(seeds)} seed(s) per prompt; {seconds:.0f} s in all")
    click.echo(f"base caption accuracy on held-out combinations: {accuracy:.3f}")
    click.echo(f"  {'mode':<14}{'drift train prior':>18}{'drift held-out':>16}{'class kept':>12}{'concept':>10}"
               f"{'s/step':>9}")
    for mode, r in modes.items():
        click.echo(f"  {mode:<14}{r['drift_train_prior']:>18.3e}{r['drift_heldout_prior']:>16.3e}"
                   f"{r['class_preservation']:>12.3f}{r['concept_match']:>10.3f}{r['seconds_per_step']:>9.4f}")


def bench(root: Path, model: Path, steps: int, settings: dict, seeds: list[int], modes: list[str],
          sizes: tuple[int, int, int]) -> dict:
    """Every mode under `root` (the data written there first): the JSON object of the last line."""
    from pipeline.train.validation import save_grid

    write_data(root / "data", *sizes)
    base: dict = {}
    results = {mode: rounded(run_mode(root, mode, model, steps, settings, seeds, base)) for mode in modes}
    images, labels = base["grid"]
    save_grid(images, root / "samples-base.png", columns=len(class_prompts(settings["prompts"])),
              labels=[f"base: {p}" for p in labels])
    return {"bench_quality": {"base_caption_accuracy": rounded({"a": base["accuracy"]})["a"], "modes": results}}


def default_model(root: Path) -> tuple[Path, str]:
    """The shipped tiny base where it is, else the embedded family's random-weight tiny model built here."""
    from pipeline.families import tiny_module
    from pipeline.tinybase import shipped

    if (shipped.MODEL / "model_index.json").is_file():
        return shipped.MODEL, "the shipped tiny base"
    tiny_module(shipped.FAMILY).build(root / "model", shipped.PRESET)
    return root / "model", f"a random-weight tiny {shipped.FAMILY} model of the base's size (no shipped base)"


@click.command()
@click.option("--steps", default=1500, show_default=True, help="Training steps per mode.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--rank", default=4, show_default=True)
@click.option("--prior-ratio", default=0.5, show_default=True, help="data.prior_ratio: the share of prior samples.")
@click.option("--images", default="6,48,12", show_default=True, help="Concept, prior and held-out prior images.")
@click.option("--sample-steps", default=20, show_default=True, help="Denoising steps per sample.")
@click.option("--seeds", default=2, show_default=True, help="Samples per prompt (seeds 0..N-1).")
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--prompts", default=0, help="Only the first N trigger and N class prompts (0: all, 6 and 18).")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A model folder (default: the shipped tiny base, else a random-weight tiny model).")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work in this folder and keep it (sample grids samples-<mode>.png); default: a temporary one.")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads (0: torch's default). The tiny "
              "models' operations are too small to gain from more, and on a busy machine more cost many times over.")
def main(steps, batch_size, lr, rank, prior_ratio, images, sample_steps, seeds, modes, prompts, model, keep, threads):
    if threads:
        torch.set_num_threads(threads)
    chosen = [m for m in modes.split(",") if m]
    for m in chosen:
        if m not in MODES:
            raise click.BadParameter(f"{m!r} is not a mode; choose from {', '.join(MODES)}", param_hint="'--modes'")
    sizes = tuple(int(x) for x in images.split(","))
    settings = {"batch": batch_size, "lr": lr, "rank": rank, "prior_ratio": prior_ratio, "sample_steps": sample_steps,
                "prompts": prompts or None}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        model, what = (model.resolve(), str(model)) if model else default_model(root)
        click.echo(f"bench-quality on {what}, in {root}", err=True)
        result = bench(root, model, steps, settings, list(range(seeds)), chosen, sizes)
        print_table(result["bench_quality"]["modes"], result["bench_quality"]["base_caption_accuracy"], settings,
                    steps, list(range(seeds)), time.perf_counter() - t0)
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
