"""validation.compare_without_priors: what prior prediction does, shown. After the run, the same run is
trained again with every prior concept at loss weight 0 (its samples still in the batches, so the data,
order and steps are the same; only their pull toward the base is gone), into <output_dir>/without-priors/.
Both LoRAs then render the validation prompts from the same seed, side by side in one labelled grid,
<output_dir>/comparison.png, and the summary gets the second run's held-out scores beside the first's.

The second run is a run of its own (its checkpoints, metrics, resume and nothing-to-do as any run's); it
lives inside the first's folder, so starting the first over moves it aside with it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.errors import option, warn

WITHOUT = "without-priors"
GRID = "comparison.png"


def without_priors(cfg: Config) -> Config:
    """The config of the comparison run: every prior concept at loss weight 0, its own output folder."""
    concepts = [dataclasses.replace(c, loss_weight=0.0) if c.type == "prior" else c for c in cfg.concepts]
    return dataclasses.replace(
        cfg, concepts=concepts,
        train=dataclasses.replace(cfg.train, output_dir=str(Path(cfg.train.output_dir) / WITHOUT)),
        validation=dataclasses.replace(cfg.validation, compare_without_priors=False))


def last_scores(out_dir: Path) -> dict:
    """The held-out scores of the run's last validation (validation.jsonl), {} where there is none."""
    path = Path(out_dir) / "validation.jsonl"
    if not path.is_file():
        return {}
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {k: lines[-1][k] for k in ("val_loss", "prior_drift") if lines and k in lines[-1]}


def render(cfg: Config, model: torch.nn.Module) -> list:
    """The validation prompts rendered by this trained model (the cache read under its read lock)."""
    from pipeline.data.plan import make_plan
    from pipeline.denoiser.model import Denoiser
    from pipeline.settings import TORCH_DTYPES
    from pipeline.store.lock import cache_lock
    from pipeline.store.store import Store
    from pipeline.train.validation import render_prompts

    with cache_lock(cfg.cache.dir, "read"):
        plan, store = make_plan(cfg), Store(cfg.cache.dir)
        try:
            device = next(model.parameters()).device
            return render_prompts(plan, store, Denoiser(model, device, TORCH_DTYPES[cfg.train.dtype]))
        finally:
            store.close()


def compare(cfg: Config, model: torch.nn.Module | None, summary: dict, train) -> dict:
    """Train the comparison run (`train(config) -> (model, summary)`: the train stage's train_lora with the
    caller's options), write the side-by-side grid and return `summary` with the comparison in it. `model`:
    the first run's trained model, None where that run was complete already (then a grid written before
    is kept; the samples of a complete run are not rendered again)."""
    from pipeline.train.validation import save_grid

    out_dir = Path(cfg.train.output_dir)
    grid = out_dir / GRID
    with_images = render(cfg, model) if model is not None and cfg.validation.prompts else None
    del model
    other = without_priors(cfg)
    other_model, other_summary = train(other)
    if with_images is not None and other_model is not None:
        without_images = render(other, other_model)
        prompts = cfg.validation.prompts
        images = [im for pair in zip(with_images, without_images) for im in pair]
        labels = [f"{tag}: {p}" for p in prompts for tag in ("with priors", "without priors")]
        save_grid(images, grid, columns=2, labels=labels)
    elif cfg.validation.prompts and not grid.is_file():
        warn(f"validation.compare_without_priors: no '{grid}' (a run was complete already, and its samples are "
             f"not rendered again): train with {option('--restart')} to make it")
    lora = other_summary.get("lora", str(Path(other.train.output_dir) / cfg.train.lora_name))
    return {
        **summary,
        "without_priors": {**last_scores(other.train.output_dir), "lora": lora},
        "comparison": str(grid) if grid.is_file() else None,
    }
