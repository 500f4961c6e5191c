"""Seeing progress during training: a deterministic score on held-out images, and sample images.

Held-out (`type = "validation"`) images use their cached seeds, timesteps and, for held-out prior images,
cached base-model predictions, so a score moves only because the LoRA moved. Prior drift is the mean
squared difference between the LoRA model's and the base model's predictions on held-out prior images:
near zero means the prior regularisation keeps the model unchanged where it should.

Sample images render the validation prompts from their cached embeddings: no text encoder is loaded,
only the VAE (its encoder dropped at once) for decoding, and it is freed afterwards.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from pipeline.batches import load_inputs
from pipeline.families import render_cached
from pipeline.objective import per_sample_mse
from pipeline.plan import Plan
from pipeline.store import Store


@torch.no_grad()
def held_out_scores(plan: Plan, store: Store, model, prior_mode: str = "cached") -> dict:
    """Validation loss (held-out standard images) and prior drift (held-out prior images), each averaged over
    every cached variant; None where the config has no such images. Leaves the model in train mode."""
    held = plan.held_out
    if not held:
        return {}
    model.eval()  # LoRA dropout off: the score must be deterministic
    losses: dict[bool, list[float]] = {False: [], True: []}
    for v in range(plan.cfg.cache.variants):
        by_shape: dict[tuple, list] = {}
        for s in held:
            by_shape.setdefault(store.shape("latent", s.latent_keys[v], "latent"), []).append(s)
        for group in by_shape.values():
            for i in range(0, len(group), plan.cfg.train.batch_size):
                batch = group[i : i + plan.cfg.train.batch_size]
                latents, noise, noisy, timesteps, cond, _ = load_inputs(plan, store, [(s, v) for s in batch])
                target = plan.family.target(latents, noise, timesteps)
                is_prior = torch.tensor([s.prior for s in batch])
                if is_prior.any():
                    target[is_prior] = _base_predictions(plan, store, model, batch, v, noisy, timesteps, cond,
                                                         is_prior, prior_mode)
                pred = plan.family.predict(model, noisy, timesteps, cond)
                for s, loss in zip(batch, per_sample_mse(pred, target.to(pred.device)).cpu().tolist()):
                    losses[s.prior].append(loss)
    model.train()
    mean = lambda xs: round(sum(xs) / len(xs), 8) if xs else None  # noqa: E731
    return {"val_loss": mean(losses[False]), "prior_drift": mean(losses[True])}


def _base_predictions(plan, store, model, batch, v, noisy, timesteps, cond, is_prior, prior_mode):
    if prior_mode == "cached":
        cached = [store.read(plan.prior_kind(), plan.prior_key(s, v))[0]["prediction"] for s in batch if s.prior]
        return torch.stack(cached).float()
    model.disable_adapters()
    try:
        sub = {k: t[is_prior] for k, t in cond.items()}
        return plan.family.predict(model, noisy[is_prior], timesteps[is_prior], sub).float().cpu()
    finally:
        model.enable_adapters()


def render_prompts(plan: Plan, store: Store, model, device: torch.device) -> list:
    """The validation prompts rendered with the model as it is now (one PIL image each)."""
    v = plan.cfg.validation
    if not v.prompts:
        return []
    vae = plan.family.load_vae(device, model.dtype)
    vae.encoder = None  # decoding only: the encoder's memory goes at once
    gc.collect()
    model.eval()
    try:
        images = []
        empty = {k: t[None] for k, t in store.read("text", plan.text_key(""))[0].items()}
        for prompt in v.prompts:  # one at a time: peak memory of one image, and each image its own seed
            cond = store.read("text", plan.text_key(prompt))[0]
            generator = torch.Generator("cpu").manual_seed(v.seed)
            images += render_cached(
                plan.family, model, vae, {k: t[None] for k, t in cond.items()}, height=v.height or plan.cfg.data.resolution,
                width=v.width or plan.cfg.data.resolution, steps=v.steps, guidance_scale=v.guidance_scale,
                generator=generator, negative=empty,
            )
    finally:
        model.train()
        del vae
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return images


def save_grid(images: list, path: Path, columns: int = 4) -> Path:
    """One PNG with the images in rows of `columns`, written atomically."""
    from diffusers.utils import make_image_grid

    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    blank = images[0].copy()
    blank.paste((0, 0, 0), (0, 0, *blank.size))
    grid = make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
    grid.save(tmp)
    os.replace(tmp, path)
    return path
