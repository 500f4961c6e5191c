"""How the cache stage computes each kind of entry (the registry is pipeline/data/kinds.py): the model that
computes it, loaded once per phase, and one chunk of entries from it. COMPUTE holds one entry per kind
that a model computes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pipeline import quantize
from pipeline.data.batches import load_inputs
from pipeline.denoiser.model import Denoiser, forward
from pipeline.store.store import Entry, Store
from pipeline.data.images import BadImage, prepare_image
from pipeline.denoiser.build import build_denoiser
from pipeline.data.plan import BAD_IMAGE, Plan, Sample
from pipeline.settings import TORCH_DTYPES


def _latent_entries(plan: Plan, store: Store, vae, jobs: list[tuple[Sample, int]]) -> dict:
    by_size: dict[tuple, list] = {}  # a VAE batch needs one size; chunks are cut from sorted keys
    bad = {}
    for s, v in jobs:
        try:
            # the variant's flip and crop (data.random_crop); its geometry carries the crop's real offsets
            pixels, geometry = prepare_image(s.path, s.bucket, s.flips[v], s.crops[v] if s.crops else None)
            by_size.setdefault(s.bucket, []).append((s, v, pixels, geometry))
        except BadImage as e:
            if plan.cfg.data.on_bad_image == "fail":
                plan.skip(s.path, str(e))  # raises UserError
            # the verdict is cached by content, so neither a rerun nor training decodes this file again;
            # plan.drop_bad leaves the image out (with its warning) after this phase
            bad[s.content_key] = ({}, {"reason": str(e), "image": str(s.path)})
    store.write(BAD_IMAGE, bad)
    out = {}
    for group in by_size.values():
        latents = plan.family.encode_images(vae, torch.stack([g[2] for g in group]))
        for (s, v, _, geometry), z in zip(group, latents):
            datasets = {"latent": z, **{k: torch.tensor(g, dtype=torch.int64) for k, g in geometry.items()}}
            out[s.latent_keys[v]] = (datasets, {"image": str(s.path), "content_key": s.content_key,
                                                "flipped": s.flips[v], "bucket": list(s.bucket)})
    return out


def _text_entries(plan: Plan, store: Store, encoders, captions: list[str]) -> dict:
    encoded = plan.family.encode_captions(encoders, captions)
    return {plan.text_key(c): (t, {"caption": c}) for c, t in zip(captions, encoded)}


def _noise_entries(plan: Plan, store: Store, _, items: list[tuple[Sample, int]]) -> dict:
    out = {}
    for s, v in items:
        # the latent's size only where the shift depends on it: a shape read per entry is file I/O
        hw = store.shape("latent", s.latent_keys[v], "latent")[1:] if plan.cfg.cache.dynamic_shift else None
        timestep, sigma = plan.draws.timestep(hw, s.timestep_seeds[v])
        out[s.noise_keys[v]] = (
            {"seed": torch.tensor(s.seeds[v], dtype=torch.int64), "timestep": timestep, "sigma": sigma},
            {"content_key": s.content_key, "variant": v},
        )
    return out


def _prior_entries(plan: Plan, store: Store, denoiser: Denoiser, items: list[tuple[Sample, int]]) -> dict:
    out = {}
    # The training forward runs with autograd on (the LoRA's parameters need gradients); a backend whose
    # kernels differ by that (quantize.GRAD_SENSITIVE) gets its prior computed the same way. Elsewhere the
    # result is the same without, and no activations are kept.
    grad = plan.quantize in quantize.GRAD_SENSITIVE
    attribute = quantize.attribute(plan.numerics)
    # Chunks are cut from sorted keys; a forward needs one latent shape, so split by shape.
    by_shape: dict[tuple, list] = {}
    for s, v in items:
        shape = store.shape("latent", s.latent_keys[v], "latent")
        by_shape.setdefault(shape, []).append((s, v))
    for group in by_shape.values():
        inputs = load_inputs(plan, store, group)
        with torch.set_grad_enabled(grad):
            pred = forward(plan.family, denoiser, inputs).detach().cpu()
        for (s, v), p in zip(group, pred):
            out[plan.prior_key(s, v)] = (
                {"prediction": p.clone()},
                {"latent_key": s.latent_keys[v], "text_key": s.text_keys[v], "noise_key": s.noise_keys[v], "variant": v,
                 "dtype": plan.dtype, "denoiser": plan.denoiser_fp, "numerics": attribute},
            )
    return out


def _load_denoiser(plan: Plan, device: torch.device) -> Denoiser:
    # the model exactly as training builds it (quantized, with the zero-initialised LoRA, in train mode, placed
    # as train.blocks_to_swap places it), so the prior is its step-0 prediction whatever the backend does
    # differently in eval mode or without a LoRA; the swap changes where weights wait, never what is computed
    return build_denoiser(plan.cfg, plan.family, device, TORCH_DTYPES[plan.dtype], checks=False)[0]


def _encoder_dtype(plan: Plan) -> torch.dtype:
    return TORCH_DTYPES[plan.cfg.model.encoder_dtype]


# kind name -> (the model that computes it, from (plan, device); one chunk's entries, from (plan, store, model, jobs))
COMPUTE: dict[str, tuple[Callable[[Plan, torch.device], Any], Callable[[Plan, Store, Any, list], dict[str, Entry]]]] = {
    "latent": (lambda plan, device: plan.family.load_vae(device, _encoder_dtype(plan)), _latent_entries),
    "text": (lambda plan, device: plan.family.load_text_encoders(device, _encoder_dtype(plan)), _text_entries),
    "noise": (lambda plan, device: None, _noise_entries),
    "prior": (_load_denoiser, _prior_entries),
}
