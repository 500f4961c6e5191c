"""`make tiny-base` (python -m pipeline.tinybase.train): train the tiny base on the scenes, on the CPU,
deterministically (one seed, a fixed data order, a fixed thread count), and measure it with the judge.

1. The embedded default family's tiny builder gives the architecture (preset "base") with random weights;
   its text encoders stay as built, random and frozen: the captions' words still map to distinct vectors.
2. The VAE learns to reconstruct the training scenes (pixel MSE plus a small KL term); its scaling and
   shift factors are then set so that the latents have zero mean and unit variance.
3. The denoiser learns the scenes' latents from scratch through the family's own adapter (encode_images,
   encode_captions, noisy_input, target, predict): the code path that caches priors and trains LoRAs.
   Captions name all three attributes, or (PARTIAL of the time) a random subset of them.
4. Samples of the held-out combinations, rendered through the project's sampling path (render_cached:
   the family's diffusers pipeline on cached conditioning), are read by the judge: the caption accuracy.

The result is a diffusers folder at `--out` (default: the shipped pipeline/tinybase/model) with
its manifest (shipped.MANIFEST) inside: every file's sha256, the recipe, the accuracy and the time it took.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.families import tiny_module
from pipeline.families.base import render_cached
from pipeline.families.load import get_family
from pipeline.families.tiny_parts import _move_into_place
from pipeline.tinybase import judge, scenes
from pipeline.tinybase.shipped import FAMILY, MANIFEST, MAX_SEQUENCE_LENGTH, MODEL, PRESET

# One thread: a float sum's order, and so the weights' bits, can depend on the thread count; and on a
# busy machine one thread is several times faster than two that wait for each other.
THREADS = 1
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    images_per_combo: int = 12  # training images per trained combination (different seeds)
    vae_steps: int = 700
    vae_batch: int = 16
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    steps: int = 4000  # denoiser steps
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    partial: float = 0.3  # share of captions that leave some attributes out ("a red teapot")
    eval_per_combo: int = 4  # samples per held-out combination
    sample_steps: int = 20


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _pixels(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_vae(vae, pixels: torch.Tensor, r: Recipe, log) -> None:
    """Reconstruction (pixel MSE) of the posterior's mean, plus r.kl_weight x KL to keep the latents
    bounded: nearly an autoencoder, like the large latent models' VAEs, whose decoders see the mode."""
    g, began = torch.Generator().manual_seed(r.seed + 1), time.perf_counter()
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    for step in range(r.vae_steps):
        for group in opt.param_groups:
            group["lr"] = r.vae_lr * _schedule(step, r.vae_steps, r.warmup)
        x = pixels[torch.randint(len(pixels), (r.vae_batch,), generator=g)]
        dist = vae.encode(x).latent_dist
        mse = torch.nn.functional.mse_loss(vae.decode(dist.mode()).sample, x)
        loss = mse + r.kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == r.vae_steps - 1:
            log(f"vae step {step}: mse {mse.item():.5f} ({time.perf_counter() - began:.0f} s)")
    vae.eval().requires_grad_(False)


def reconstruction_accuracy(vae, combos, seed: int = 10**6) -> float:
    """The share of fresh renders of `combos` whose reconstruction the judge reads as the scene."""
    pixels = _pixels(scenes.render(c, seed=seed + i) for i, c in enumerate(combos))
    with torch.no_grad():
        out = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    arr = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return sum(judge.read(Image.fromarray(a)) == c for a, c in zip(arr, combos)) / len(combos)


def normalise_latents(vae, pixels: torch.Tensor) -> None:
    """Set the VAE's shift and scaling factors so that its latents (the mode) have mean 0 and variance 1."""
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
    vae.register_to_config(shift_factor=round(z.mean().item(), 6), scaling_factor=round(1 / z.std().item(), 6))


def captions_of(combos: list[scenes.Scene], r: Recipe) -> tuple[list[str], torch.Tensor]:
    """Every caption a training image can carry (the full one and each subset of its attributes), and per
    combination the indices of its captions, the full one first."""
    names, index = [], {}
    table = []
    for c in combos:
        row = []
        for keep in [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (0, 0, 0)]:
            text = scenes.caption_for(scenes.Scene(*[v if k else None for v, k in zip((c.body, c.shape, c.table), keep)]))
            if text not in index:
                index[text] = len(names)
                names.append(text)
            row.append(index[text])
        table.append(row)
    return names, torch.tensor(table)


def train_denoiser(family, denoiser, latents, combo_of, text, caption_table, r: Recipe, log) -> None:
    """Flow matching on the scenes' latents through the family's adapter, like a training step."""
    g, began = torch.Generator().manual_seed(r.seed + 2), time.perf_counter()
    timesteps, sigmas = family.timestep_table()
    denoiser.train().requires_grad_(True)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=r.lr, weight_decay=0.0)
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = r.lr * _schedule(step, r.steps, r.warmup)
        idx = torch.randint(len(latents), (r.batch,), generator=g)
        # the full caption, or PARTIAL of the time one of the 8 (a subset of the attributes; the full one too)
        variant = torch.where(torch.rand(r.batch, generator=g) < r.partial,
                              torch.randint(8, (r.batch,), generator=g), torch.zeros(r.batch, dtype=torch.long))
        cond = family.collate([text[i] for i in caption_table[combo_of[idx], variant].tolist()])
        # logit-normal timesteps, the family's default scheme, as indices into its training table
        u = torch.sigmoid(torch.randn(r.batch, generator=g))
        t_idx = (u * len(timesteps)).long().clamp(max=len(timesteps) - 1)
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=g)
        noisy = family.noisy_input(x0, noise, timesteps[t_idx], sigmas[t_idx])
        target = family.target(x0, noise, timesteps[t_idx])
        pred = family.predict(denoiser, noisy, timesteps[t_idx], cond, device=CPU, dtype=torch.float32)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == r.steps - 1:
            log(f"denoiser step {step}: loss {loss.item():.4f} ({time.perf_counter() - began:.0f} s)")
    denoiser.eval().requires_grad_(False)


def caption_accuracy(family, denoiser, vae, encoders, combos, per_combo: int, steps: int, seed: int = 0,
                     batch: int = 16):
    """The share of samples the judge finds matching their caption: `per_combo` samples of each combination,
    rendered through render_cached (the family's pipeline on the captions' conditioning) from seeded noise.
    Returns (accuracy, [(caption, image, matched)])."""
    captions = [scenes.caption_for(c) for c in combos for _ in range(per_combo)]
    results = []
    for start in range(0, len(captions), batch):
        chunk = captions[start : start + batch]
        cond = family.collate(family.encode_captions(encoders, chunk))
        images = render_cached(family, denoiser, vae, cond, device=CPU, dtype=torch.float32,
                               height=scenes.SIZE, width=scenes.SIZE, steps=steps, guidance_scale=1.0,
                               generator=torch.Generator().manual_seed(seed + start))
        results += [(c, im, judge.matches(im, c)) for c, im in zip(chunk, images)]
    return sum(m for _, _, m in results) / len(results), results


def strip_build_path(config: Path) -> None:
    """Drop `_name_or_path` (the folder a model was loaded from, here a temporary one) from a saved config:
    the same recipe then writes the same bytes wherever it runs. The format is diffusers' own."""
    data = json.loads(config.read_text())
    data.pop("_name_or_path", None)
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def build(out: Path = MODEL, r: Recipe = Recipe(), log=print) -> dict:
    """Train the base into `out` (replaced whole at the end) and return the manifest written beside it."""
    started = time.perf_counter()
    torch.set_num_threads(THREADS)
    torch.manual_seed(r.seed)
    out = Path(out)
    work = out.with_name(f".{out.name}.building")
    shutil.rmtree(work, ignore_errors=True)
    tiny_module(FAMILY).build(work, PRESET, r.seed)
    family = get_family(ModelConfig(path=str(work), max_sequence_length=MAX_SEQUENCE_LENGTH))

    combo_of = torch.arange(len(scenes.TRAIN)).repeat_interleave(r.images_per_combo)
    pixels = _pixels(scenes.render(scenes.TRAIN[c], seed=r.seed * 100_000 + i) for i, c in enumerate(combo_of.tolist()))
    vae = family.load_vae(CPU, torch.float32)
    train_vae(vae, pixels, r, log)
    normalise_latents(vae, pixels)
    vae_accuracy = reconstruction_accuracy(vae, scenes.COMBOS)
    log(f"judge on the VAE's reconstructions of every combination: {vae_accuracy:.3f}")
    vae.save_pretrained(work / "vae", safe_serialization=True)
    strip_build_path(work / "vae" / "config.json")
    vae_seconds = time.perf_counter() - started
    latents = torch.cat([family.encode_images(vae, pixels[i : i + 256]) for i in range(0, len(pixels), 256)])

    encoders = family.load_text_encoders(CPU, torch.float32)
    names, caption_table = captions_of(scenes.TRAIN, r)
    text = family.encode_captions(encoders, names)
    denoiser = family.load_denoiser(CPU, torch.float32)
    train_denoiser(family, denoiser, latents, combo_of, text, caption_table, r, log)
    denoiser.save_pretrained(work / family.denoiser_component, safe_serialization=True)
    strip_build_path(work / family.denoiser_component / "config.json")
    train_seconds = time.perf_counter() - started

    heldout = trained = None
    if r.eval_per_combo:
        heldout, _ = caption_accuracy(family, denoiser, vae, encoders, scenes.HELDOUT, r.eval_per_combo,
                                      r.sample_steps)
        trained, _ = caption_accuracy(family, denoiser, vae, encoders, scenes.TRAIN[::5], r.eval_per_combo,
                                      r.sample_steps)
        log(f"caption accuracy: held-out combinations {heldout:.3f}, trained ones (every 5th) {trained:.3f}")
    manifest = {
        "family": FAMILY, "preset": PRESET, "recipe": dataclasses.asdict(r), "threads": THREADS,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "seconds": {"vae": round(vae_seconds), "total_training": round(train_seconds),
                    "with_evaluation": round(time.perf_counter() - started)},
        "vae_reconstruction_accuracy": vae_accuracy,
        "caption_accuracy": {"heldout": heldout, "trained_sample": trained,
                             "samples_per_combo": r.eval_per_combo, "sample_steps": r.sample_steps},
        "sha256": sha256s(work),
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _move_into_place(work, out)  # the whole folder at once: never half a model
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.tinybase.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=MODEL, help="the model folder to write (default: the shipped one)")
    for field in dataclasses.fields(Recipe):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = p.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    manifest = build(args.out, recipe, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({"tiny_base": {k: manifest[k] for k in ("caption_accuracy", "seconds")}}))


if __name__ == "__main__":
    main()
