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
from pathlib import Path

import torch
from diffusers.training_utils import free_memory

from pipeline.data import schema
from pipeline.data.batches import load_inputs
from pipeline.denoiser.model import Denoiser, forward
from pipeline.store.store import Store
from pipeline.families.base import render_cached
from pipeline.objective import per_sample_mse
from pipeline.data.plan import Plan
from pipeline.processes import OneProcess
from pipeline.atomic import replacing
from pipeline.train.step import targets


class Validator:
    """Held-out scores and sample grids at chosen steps, each validation's record to the run's sinks."""

    def __init__(self, plan: Plan, store: Store, denoiser: Denoiser, out_dir: Path, sinks, procs: OneProcess):
        self.plan, self.store, self.denoiser, self.sinks, self.procs = plan, store, denoiser, sinks, procs
        self.samples_dir = out_dir / "samples"
        self.done: set[int] = set()
        self.last: dict = {}

    @staticmethod
    def enabled(plan: Plan) -> bool:
        return bool(plan.held_out or plan.cfg.validation.prompts)

    def run(self, step: int) -> None:
        if not self.enabled(self.plan) or step in self.done:
            return
        self.done.add(step)
        record = {"step": step, **held_out_scores(self.plan, self.store, self.denoiser, self.procs,
                                                  self.plan.cfg.train.prior_mode)}
        # the grid on rank 0 alone (the unwrapped model: no collective), the others going on to the next step;
        # under FSDP each forward is a collective, so every rank renders it and rank 0 saves it
        images = render_prompts(self.plan, self.store, self.denoiser) if self.procs.renders else []
        if images and self.procs.is_main:
            labels = [f"step {step}: {p}" for p in self.plan.cfg.validation.prompts]
            record["samples"] = str(save_grid(images, self.samples_dir / f"step-{step:06d}.png", labels=labels))
        self.sinks.validation(record)
        self.last = {k: record[k] for k in ("val_loss", "prior_drift", "samples") if k in record}


@torch.no_grad()
def held_out_scores(plan: Plan, store: Store, denoiser: Denoiser, procs: OneProcess,
                    prior_mode: str = "cached") -> dict:
    """Validation loss (held-out standard images) and prior drift (held-out prior images), each averaged over
    every cached variant; None where the config has no such images. Leaves the model in train mode. Under a
    launcher the ranks share the batches and every rank gets the scores one process would compute."""
    held = plan.held_out
    if not held:
        return {}
    model = denoiser.module
    model.eval()  # LoRA dropout off: the score must be deterministic
    size = plan.cfg.train.batch_size
    batches = []
    for v in range(plan.cfg.cache.variants):
        by_shape: dict[tuple, list] = {}
        for s in held:
            by_shape.setdefault(store.shape("latent", s.latent_keys[v], "latent"), []).append(s)
        batches += [[(s, v) for s in group[i : i + size]] for group in by_shape.values() for i in range(0, len(group), size)]
    mine = {}
    for j in procs.turns(len(batches)):  # this rank's batches (under FSDP a short share repeats the last)
        items = batches[min(j, len(batches) - 1)]
        inputs = load_inputs(plan, store, items)  # the cached draws: a score must not move by chance
        target = targets(plan, store, denoiser, items, inputs, prior_mode)
        pred = forward(plan.family, denoiser, inputs)
        if j < len(batches):
            mine[j] = per_sample_mse(pred, target.to(pred.device)).cpu().tolist()
    done = {j: v for part in procs.gather(mine) for j, v in part.items()}
    losses: dict[bool, list[float]] = {False: [], True: []}
    for j, items in enumerate(batches):  # in one process's order, so the means are its to the last bit
        for (s, _), loss in zip(items, done[j]):
            losses[s.prior].append(loss)
    model.train()
    mean = lambda xs: round(sum(xs) / len(xs), 8) if xs else None  # noqa: E731
    return {"val_loss": mean(losses[False]), "prior_drift": mean(losses[True])}


def render_prompts(plan: Plan, store: Store, denoiser: Denoiser, prompts: list[str] | None = None,
                   seed: int | None = None) -> list:
    """The validation prompts (or `prompts`, cached among them) rendered with the model as it is now (one PIL
    image each), each from validation.seed (or `seed`)."""
    v = plan.cfg.validation
    prompts = v.prompts if prompts is None else prompts
    if not prompts:
        return []
    vae = plan.family.load_vae(denoiser.device, denoiser.dtype)
    # decoding only: the encoder's memory goes at once (an empty module, not None: a 3D-causal VAE counts its
    # encoder's layers when it decodes)
    vae.encoder = torch.nn.Module()
    gc.collect()
    model = denoiser.module
    model.eval()
    try:
        images = []
        empty = {k: t[None] for k, t in schema.read(plan, store, "text", plan.text_key(""))[0].items()}
        for prompt in prompts:  # one at a time: peak memory of one image, and each image its own seed
            cond = schema.read(plan, store, "text", plan.text_key(prompt))[0]
            generator = torch.Generator("cpu").manual_seed(v.seed if seed is None else seed)
            images += render_cached(
                plan.family, model, vae, {k: t[None] for k, t in cond.items()}, device=denoiser.device,
                dtype=denoiser.dtype, height=v.height or plan.cfg.data.resolution,
                width=v.width or plan.cfg.data.resolution, steps=v.steps, guidance_scale=v.guidance_scale,
                generator=generator, negative=empty,
            )
    finally:
        model.train()
        del vae
        free_memory()
    return images


def wrap(text: str, fits) -> list[str]:
    """`text` in lines that each pass fits(line) (a width check), broken at spaces, and inside a word only
    where a word alone does not fit. Nothing is left out: " ".join of the lines is the text, spaces
    collapsed (a word broken inside is joined without one)."""
    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while not fits(word) and len(word) > 1:  # a word wider than the image: cut where it fills a line
            cut = next((n for n in range(len(word) - 1, 0, -1) if fits(word[:n])), 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines


def label(image, text: str):
    """A copy of the image with `text` on a dark band along its bottom edge, wrapped onto as many lines as it
    takes (the font shrinks when they would cover more than half the image): the size stays the image's, so
    a grid is the images side by side, as without labels."""
    from PIL import ImageDraw, ImageFont

    image = image.convert("RGB")
    w, h = image.size
    draw = ImageDraw.Draw(image, "RGBA")
    size = max(9, h // 28)  # legible on a 64 px tile and on a 1024 px one
    while True:
        try:
            font = ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font, one size only
            font, size = ImageFont.load_default(), 11
        lines = wrap(text, lambda t: draw.textlength(t, font=font) <= w - 4)
        step = round(size * 1.2)
        if len(lines) * step <= h // 2 or size <= 6 or not hasattr(font, "font_variant"):
            break
        size -= 1
    band = len(lines) * step + round(size * 0.3)
    draw.rectangle([0, h - band, w, h], fill=(0, 0, 0, 170))
    for n, line in enumerate(lines):
        draw.text((2, h - band + n * step + 1), line, font=font, fill=(255, 255, 255, 255))
    return image


def save_grid(images: list, path: Path, columns: int = 4, labels: list[str] | None = None) -> Path:
    """One PNG with the images in rows of `columns`, each with its label (prompt and step) drawn on it; the
    labels are also in the PNG's text chunk "prior_lora.labels" (JSON). Written atomically."""
    import json

    from diffusers.utils import make_image_grid
    from PIL.PngImagePlugin import PngInfo

    if labels:
        images = [label(im, text) for im, text in zip(images, labels)]
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    blank = images[0].copy()
    blank.paste((0, 0, 0), (0, 0, *blank.size))
    grid = make_image_grid(images + [blank] * (rows * columns - len(images)), rows=rows, cols=columns)
    info = PngInfo()
    if labels:
        info.add_text("prior_lora.labels", json.dumps(labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, ".png") as tmp:  # the suffix: PIL picks the format by it
        grid.save(tmp, pnginfo=info)
    return path
