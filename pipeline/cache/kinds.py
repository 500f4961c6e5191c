"""The kinds of cache entry, in one registry (KINDS). Each kind says which keys a plan needs, how to load
the model that computes them and how to compute one chunk, and what the summaries call it. The cache
stage computes them in this order; `cache status`, `verify` and `prune`, and training's check that the
cache is complete, all read this list, so a new kind is one entry here and nothing else forgets it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import quantize
from pipeline.batches import Denoiser, forward, load_inputs
from pipeline.cache.store import Entry, Store
from pipeline.config import Config
from pipeline.data import BadImage, prepare_image
from pipeline.errors import UserError
from pipeline.plan import BAD_IMAGE, Plan, Sample
from pipeline.settings import TORCH_DTYPES


@dataclass(frozen=True)
class Kind:
    name: str  # the store's kind; with per_dtype, stored as "<name>/<plan.numerics_label>" ("prior/bf16-int8")
    label: str  # what messages call it ("the cache lacks <label> ...")
    jobs: Callable[[Plan, bool], dict[str, Any]]  # (plan, keep_unused) -> key: what computing it needs
    counts: tuple[str, str] = ("", "")  # summary keys: (computed this run, present before)
    unit: str = ""  # progress-bar unit
    # the model that computes it, from (plan, device); None: written as a by-product of another kind
    load: Callable[[Plan, torch.device], Any] | None = None
    compute: Callable[[Plan, Store, Any, list], dict[str, Entry]] | None = None  # (plan, store, model, jobs)
    chunk: Callable[[Config], int] = lambda cfg: cfg.cache.batch_size  # entries per batch (the unit of work)
    # computed by the denoiser in the train dtype (and model.quantize): one set of entries per dtype and
    # quantization, side by side; the denoiser runs on the device type training uses (pipeline.plan.prior_device)
    per_dtype: bool = False

    def store_kind(self, plan: Plan) -> str:
        return f"{self.name}/{plan.numerics_label}" if self.per_dtype else self.name


# -- computing one chunk of each kind ------------------------------------------------------------------
def _latent_entries(plan: Plan, store: Store, vae, jobs: list[tuple[Sample, bool]]) -> dict:
    by_size: dict[tuple, list] = {}  # a VAE batch needs one size; chunks are cut from sorted keys
    bad = {}
    for s, flip in jobs:
        try:
            pixels, geometry = prepare_image(s.path, s.bucket, flip)
            by_size.setdefault(s.bucket, []).append((s, flip, pixels, geometry))
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
        for (s, flip, _, geometry), z in zip(group, latents):
            key = s.latent_keys[s.flips.index(flip)]
            datasets = {"latent": z, **{k: torch.tensor(v, dtype=torch.int64) for k, v in geometry.items()}}
            out[key] = (datasets, {"image": str(s.path), "content_key": s.content_key, "flipped": flip,
                                   "bucket": list(s.bucket)})
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
    from pipeline.train.setup import build_denoiser

    return build_denoiser(plan, device, checks=False)[0]


def _prior_jobs(plan: Plan, keep_unused: bool) -> dict:
    # with prior_mode = "online" training computes the prior targets itself: none to cache, but prune
    # keeps what is there (keep_unused), since switching back to "cached" must not cost a recompute
    if plan.cfg.train.prior_mode != "cached" and not keep_unused:
        return {}
    return {plan.prior_key(s, v): (s, v) for s, v in plan.cached_draws() if s.prior}


def _encoder_dtype(plan: Plan) -> torch.dtype:
    return TORCH_DTYPES[plan.cfg.model.encoder_dtype]


KINDS: tuple[Kind, ...] = (
    Kind("latent", "latents", lambda plan, keep: plan.latent_jobs(), ("latents_encoded", "latents_reused"), "img",
         load=lambda plan, device: plan.family.load_vae(device, _encoder_dtype(plan)), compute=_latent_entries),
    # what the latent phase found undecodable, by content: kept as long as the image is in the config
    Kind(BAD_IMAGE, "verdicts on undecodable images", lambda plan, keep: dict.fromkeys(plan.bad)),
    Kind("text", "text embeddings", lambda plan, keep: plan.text_jobs(), ("texts_encoded", "texts_reused"), "caption",
         load=lambda plan, device: plan.family.load_text_encoders(device, _encoder_dtype(plan)), compute=_text_entries),
    Kind("noise", "noise seeds and timesteps", lambda plan, keep: plan.noise_jobs(), ("noise_computed", "noise_reused"),
         "draw", load=lambda plan, device: None, compute=_noise_entries, chunk=lambda cfg: 256),
    Kind("prior", "priors", _prior_jobs, ("priors_computed", "priors_reused"), "pred", load=_load_denoiser,
         compute=_prior_entries, per_dtype=True),
)
COMPUTED = tuple(k for k in KINDS if k.compute is not None)


def needed_keys(plan: Plan, keep_unused: bool = False) -> dict[str, set[str]]:
    """store kind -> the keys this config uses (with keep_unused: also what it keeps without using)."""
    return {k.store_kind(plan): set(k.jobs(plan, keep_unused)) for k in KINDS}


def computed(summary: dict) -> int:
    """Entries a cache run computed, from its summary."""
    return sum(summary[k.counts[0]] for k in COMPUTED)


def in_words(summary: dict) -> str:
    """What a cache run computed and what it reused, from its summary, as a sentence for people (the title
    of the printed table; the JSON line keeps the counts)."""
    counts = []  # (what it is called, computed, total)
    for k in COMPUTED:
        n, total = summary[k.counts[0]], summary[k.counts[0]] + summary[k.counts[1]]
        if total:
            counts.append((f"{k.label} for {numerics_words(summary['dtype'], summary.get('quantize', 'none'))}"
                           if k.per_dtype else k.label, n, total))
    done = [(name, n, total) for name, n, total in counts if n]
    if not done:
        return "nothing to compute, everything is cached"
    part = lambda name, n, total: f"{n} {name}" if n == total else f"{n} of {total} {name}"  # noqa: E731
    if len(done) == len(counts) and all(n == total for _, n, total in done):
        return f"done: everything was computed ({', '.join(part(*c) for c in done)})"
    if len(done) == 1:
        name, n, total = done[0]
        return f"done: only {name} were computed ({n if n == total else f'{n} of {total}'}); everything else was reused"
    return f"done: computed {', '.join(part(*c) for c in done)}; everything else was reused"


def numerics_words(dtype: str, scheme: str) -> str:
    """"bf16", or "bf16 with model.quantize = int8": what a set of priors was computed in, for messages."""
    return dtype if scheme == "none" else f"{dtype} with model.quantize = {scheme}"


def why_priors_missing(plan: Plan, store: Store, sample: int = 16) -> str:
    """What differs between the numerics this config needs and those of the cached priors it cannot use
    (their `numerics` attribute: scheme, device type, library versions), read from a few of them: "" when
    nothing differs (the priors are missing for other reasons: new images, another model)."""
    kind, needed = plan.prior_kind(), set(_prior_jobs(plan, False))
    now = quantize.describe(plan.numerics)
    found = []
    for key in sorted(store.keys(kind) - needed)[:sample]:
        recorded = store.attrs(kind, key).get("numerics")
        what = (quantize.differences(json.loads(recorded), now) if recorded is not None
                else "their numerics are not recorded (cached by an earlier version of this program)")
        if what and what not in found:
            found.append(what)
    return f"the cached {kind} entries were computed with other numerics: {'; '.join(found)}" if found else ""


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-flux.toml"  # the Makefile's default


def fix_command(cfg: Config, dtype: str | None = None) -> str:
    """The commands that cache what this config lacks: make's, and the plain CLI's."""
    source = Path(cfg.source)
    shown = source.relative_to(Path.cwd()) if source.is_relative_to(Path.cwd()) else source
    make = "make cache" + ("" if source == DEFAULT_CONFIG else f" CONFIG={shown}") + (f" DTYPE={dtype}" if dtype else "")
    cli = f"python -m pipeline cache --config {shown}" + (f" --dtype {dtype}" if dtype else "")
    return f"{make} (or: {cli})"


def check_complete(plan: Plan, store: Store) -> None:
    """Refuse, with the command that fixes it, unless every entry a training run reads is present."""
    cfg = plan.cfg
    missing = {k: sum(not store.has(k.store_kind(plan), key) for key in k.jobs(plan, False)) for k in COMPUTED}
    parts = [f"{k.label} ({n} missing)" for k, n in missing.items() if n and not k.per_dtype]
    if parts and store.unreadable:
        raise UserError(
            f"cache file '{store.unreadable[0]}' cannot be read ({len(store.unreadable)} such files; damaged or not "
            f"ours) and the cache lacks {', '.join(parts)}: delete the file(s), then run {fix_command(cfg)}"
        )
    if parts:
        raise UserError(f"the cache lacks {', '.join(parts)} for this config: run {fix_command(cfg)}")
    for k, n in missing.items():
        if n and k.per_dtype:
            why = why_priors_missing(plan, store)
            raise UserError(
                f"{k.label} for {numerics_words(plan.dtype, plan.quantize)} are not cached ({n} of "
                f"{len(k.jobs(plan, False))} missing for this model and data{'; ' + why if why else ''}): "
                f"run {fix_command(cfg, plan.dtype)}"
            )
