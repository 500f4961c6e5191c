"""Stage 1: run the frozen base model once and store latents, text embeddings, noise seeds and
timesteps, and for every prior sample the base model's own prediction, keyed by the train dtype.

Each phase computes only what is missing. Work is done in chunks of fixed composition (all needed
keys sorted, cut every cache.batch_size), and each chunk is written as one atomic segment: a crash
loses at most the chunk in flight, and a rerun recomputes exactly the same chunks with the same
batch composition, so the finished cache equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import errno
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.batches import load_inputs
from pipeline.config import Config, check_paths
from pipeline.data import BadImage, prepare_image
from pipeline.errors import UserError
from pipeline.lock import cache_lock
from pipeline.objective import draw_timestep_index
from pipeline.plan import BAD_IMAGE, TORCH_DTYPES, Plan, Sample, make_plan, pick_device, timestep_scheme
from pipeline.store import Store


def ensure_embedded(cfg: Config) -> None:
    """For configs with an [embedded] table: build the tiny model and synthetic data where missing."""
    if cfg.embedded is None:
        return
    from pipeline import tiny  # only the embedded configs need it

    try:
        tiny.ensure_embedded(Path(cfg.model.path), [Path(c.folder) for c in cfg.concepts], cfg.embedded.family,
                             cfg.embedded.preset)
    except (ValueError, FileExistsError) as e:
        raise UserError(f"[embedded]: {e}") from None


def _chunks(keys: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(keys), size):
        yield keys[i : i + size]


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Phase:
    """One kind of entry: which keys are needed, which are missing, and computing missing chunks."""

    def __init__(self, store: Store, kind: str, needed: dict[str, object], batch: int, progress: bool):
        self.store, self.kind, self.batch, self.progress = store, kind, batch, progress
        self.order = sorted(needed)
        self.needed = needed
        self.missing = [k for k in self.order if not store.has(kind, k)]
        self.computed = 0

    def run(self, load: Callable[[], object], compute: Callable[[object, list], dict], unit: str) -> None:
        if not self.missing:
            return
        model = load()
        todo = [chunk for chunk in _chunks(self.order, self.batch) if any(not self.store.has(self.kind, k) for k in chunk)]
        with tqdm(total=len(self.missing), desc=self.kind, unit=unit, disable=not self.progress) as bar:
            for chunk in todo:
                entries = compute(model, [self.needed[k] for k in chunk])
                # entries may lack keys whose input turned out unusable (a bad image)
                fresh = {k: e for k, e in entries.items() if not self.store.has(self.kind, k)}
                try:
                    self.store.write(self.kind, fresh)
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left" not in str(e):
                        raise
                    raise UserError(
                        f"disk full writing the cache in '{self.store.root}': every finished segment is kept "
                        f"({self.computed} new {self.kind} entries this run); free space and run the same command again"
                    ) from None
                self.computed += len(fresh)
                bar.update(len(fresh))
        del model  # before the next phase loads its model: only one is ever resident
        _release_memory()

    @property
    def reused(self) -> int:
        return len(self.order) - len(self.missing)  # present before this run


def run_cache(cfg: Config, progress: bool = True) -> dict:
    """Compute every missing cache entry the config needs. Returns the summary it prints.
    Refuses (UserError) while another cache run, prune or repair writes the same directory."""
    with cache_lock(cfg.cache.dir, "write"):
        return _run_cache(cfg, progress)


def _run_cache(cfg: Config, progress: bool) -> dict:
    start = time.perf_counter()
    ensure_embedded(cfg)
    check_paths(cfg)
    plan = make_plan(cfg)
    family = plan.family
    store = Store(cfg.cache.dir)
    plan.drop_bad(store)
    device = pick_device(cfg.cache.device)
    enc_dtype = TORCH_DTYPES[cfg.model.encoder_dtype]
    batch = cfg.cache.batch_size

    latents = Phase(store, "latent", plan.latent_jobs(), batch, progress)
    latents.run(lambda: family.load_vae(device, enc_dtype), lambda vae, jobs: _latent_entries(plan, store, vae, jobs), "img")
    plan.drop_bad(store)  # images found undecodable just now

    texts = Phase(store, "text", plan.text_jobs(), batch, progress)
    texts.run(
        lambda: family.load_text_encoders(device, enc_dtype),
        lambda enc, captions: {
            plan.text_key(c): (t, {"caption": c}) for c, t in zip(captions, family.encode_captions(enc, captions))
        },
        "caption",
    )

    noise_needed = {s.noise_keys[v]: (s, v) for s in plan.samples for v in range(cfg.cache.variants)}
    noises = Phase(store, "noise", noise_needed, 256, progress)
    noises.run(lambda: family.timestep_table(), lambda table, items: _noise_entries(cfg, family, table, items), "draw")

    # with prior_mode = "online" training computes the prior targets itself: none to cache
    cached_priors = cfg.train.prior_mode == "cached"
    prior_needed = {
        plan.prior_key(s, v): (s, v) for s in plan.samples if s.prior and cached_priors for v in range(cfg.cache.variants)
    }
    priors = Phase(store, plan.prior_kind(), prior_needed, batch, progress)
    priors.run(
        lambda: family.load_denoiser(device, TORCH_DTYPES[cfg.train.dtype]),
        lambda model, items: _prior_entries(plan, store, model, items),
        "pred",
    )

    summary = {
        "samples": len(plan.training),
        "prior_samples": sum(s.prior for s in plan.training),
        "validation_samples": len(plan.held_out),
        "images_per_bucket": plan.bucket_counts(),
        "variants": cfg.cache.variants,
        "dtype": cfg.train.dtype,
        "latents_encoded": latents.computed,
        "latents_reused": latents.reused,
        "texts_encoded": texts.computed,
        "texts_reused": texts.reused,
        "noise_computed": noises.computed,
        "noise_reused": noises.reused,
        "priors_computed": priors.computed,
        "priors_reused": priors.reused,
        "bytes_on_disk": store.bytes_on_disk(),
        # files that could not be read (damaged or foreign); their entries, if needed, were recomputed
        "unreadable_segments": [str(p) for p in store.unreadable],
        "skipped_images": plan.skipped,
        "seconds": round(time.perf_counter() - start, 2),
    }
    store.close()
    return summary


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


def _noise_entries(cfg: Config, family, table, items: list[tuple[Sample, int]]) -> dict:
    timesteps, sigmas = table
    c, scheme = cfg.cache, timestep_scheme(cfg, family)
    out = {}
    for s, v in items:
        g = torch.Generator("cpu").manual_seed(s.timestep_seeds[v])
        i = draw_timestep_index(g, len(timesteps), scheme, c.logit_mean, c.logit_std, c.mode_scale)
        out[s.noise_keys[v]] = (
            {
                "seed": torch.tensor(s.seeds[v], dtype=torch.int64),
                "timestep": timesteps[i].reshape(()).float(),
                "sigma": sigmas[i].reshape(()).float(),
            },
            {"content_key": s.content_key, "variant": v},
        )
    return out


@torch.no_grad()
def _prior_entries(plan: Plan, store: Store, model, items: list[tuple[Sample, int]]) -> dict:
    out = {}
    # Chunks are cut from sorted keys; a forward needs one latent shape, so split by shape.
    by_shape: dict[tuple, list] = {}
    for s, v in items:
        shape = store.shape("latent", s.latent_keys[v], "latent")
        by_shape.setdefault(shape, []).append((s, v))
    for group in by_shape.values():
        _, _, noisy, timesteps, text, _ = load_inputs(plan, store, group)
        pred = plan.family.predict(model, noisy, timesteps, text).cpu()
        for (s, v), p in zip(group, pred):
            out[plan.prior_key(s, v)] = (
                {"prediction": p.clone()},
                {"latent_key": s.latent_keys[v], "text_key": s.text_keys[v], "noise_key": s.noise_keys[v], "variant": v,
                 "dtype": plan.dtype, "denoiser": plan.denoiser_fp},
            )
    return out
