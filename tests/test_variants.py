"""Aspect-ratio buckets, and flip and caption dropout as per-variant choices made at cache time: each
prior is the base model's prediction for exactly the input the training step feeds."""

import pytest
import torch

from pipeline.data.batches import load_inputs
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.data.images import load_image
from pipeline.data.plan import make_plan
from pipeline.settings import TORCH_DTYPES
from pipeline.train.epochs import epoch_batches
from pipeline.train.stage import run_train

from conftest import CPU32, configure

pytestmark = pytest.mark.e2e

# the synthetic images are 80x80, 96x72 and 72x96 (width x height): three buckets at 64 px
BUCKETS = {"48x80": 4, "64x64": 6, "80x48": 6}


def test_images_go_to_the_nearest_bucket_and_batches_stay_in_one(project):
    path, _ = project(batch=4, max_steps=3)
    cfg = configure(path, data={"resolution": 64})
    summary = run_cache(cfg, progress=False)
    assert summary["images_per_bucket"] == BUCKETS
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    shapes = {}
    for s in plan.samples:
        latent = store.read("latent", s.latent_keys[0])[0]
        h, w = s.bucket
        assert latent["latent"].shape[-2:] == (h // 8, w // 8)  # the VAE's factor 8
        with_ratio = s.bucket[1] / s.bucket[0]
        oh, ow = latent["original_size"].tolist()
        assert abs(ow / oh - with_ratio) < 0.35  # nearest bucket: aspect kept roughly
        shapes[s.latent_keys[0]] = tuple(latent["latent"].shape)
    for batch in epoch_batches(plan, shapes, 0):
        assert len({shapes[s.latent_keys[0]] for s, _ in batch}) == 1
    assert run_train(cfg, progress=False)["images_per_bucket"] == BUCKETS


def test_without_buckets_every_image_is_square(project):
    path, _ = project()
    cfg = configure(path, data={"resolution": 64, "buckets": False})
    assert run_cache(cfg, progress=False)["images_per_bucket"] == {"64x64": 16}


def test_flip_and_caption_dropout_are_cached_per_variant_and_priors_match(project):
    path, _ = project(variants=4, dtype="fp32", cache_batch=1, max_steps=2)
    cfg = configure(path, data={"resolution": 64, "flip_probability": 0.5, "caption_dropout": 0.5})
    summary = run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    flips = [f for s in plan.samples for f in s.flips]
    dropped = [c == "" for s in plan.samples for c in s.captions]
    assert 0 < sum(flips) < len(flips) and 0 < sum(dropped) < len(dropped)  # both drawn, per variant
    # each distinct latent once (flipped and not), each distinct caption once: "" a single entry
    assert summary["latents_encoded"] == len({k for s in plan.samples for k in s.latent_keys})
    assert summary["texts_encoded"] == len({c for s in plan.samples for c in s.captions})

    sample = next(s for s in plan.samples if s.prior and any(s.flips) and "" in s.captions)
    vae = plan.family.load_vae(torch.device("cpu"), torch.float32)
    for v in range(4):
        expected = plan.family.encode_images(vae, load_image(sample.path, sample.bucket, sample.flips[v])[None])[0]
        assert torch.equal(store.read("latent", sample.latent_keys[v])[0]["latent"], expected)
    # the cached prior of every variant equals a fresh forward on that variant's (flipped, dropped) input
    model = plan.family.load_denoiser(torch.device("cpu"), TORCH_DTYPES["fp32"])
    for v in range(4):
        inputs = load_inputs(plan, store, [(sample, v)])
        noisy, timesteps, cond = inputs.noisy, inputs.timesteps, inputs.cond
        with torch.no_grad():
            fresh = plan.family.predict(model, noisy, timesteps, cond, **CPU32)[0]
        assert torch.equal(store.read("prior/fp32", plan.prior_key(sample, v))[0]["prediction"], fresh)
    first = run_train(cfg, progress=False)
    assert first["steps"] == 2


def test_turning_flip_on_recomputes_only_the_flipped_latents_and_their_priors(project):
    path, _ = project(variants=4)
    cfg = configure(path, data={"resolution": 64})
    run_cache(cfg, progress=False)
    cfg = configure(path, data={"resolution": 64, "flip_probability": 0.5})
    plan = make_plan(cfg)
    flipped = sum(f for s in plan.samples for f in s.flips)
    flipped_priors = sum(f for s in plan.samples if s.prior for f in s.flips)
    again = run_cache(cfg, progress=False)
    assert (again["latents_encoded"], again["texts_encoded"], again["noise_computed"]) == (
        len({s.latent_keys[v] for s in plan.samples for v in range(4) if s.flips[v]}), 0, 0)
    assert again["priors_computed"] == flipped_priors and flipped > flipped_priors
