"""Tag shuffling, random crops and several resolutions: each a per-variant (or per-resolution) cached input,
keyed so that changing it recomputes exactly what it changes, and every prior still the base model's
prediction for exactly the input training feeds (the step-0 prior loss stays zero)."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.cache.stage import run_cache
from pipeline.data.batches import load_inputs
from pipeline.data.images import prepare_image
from pipeline.data.plan import make_plan
from pipeline.data.variants import crop_offsets, shuffle_tags
from pipeline.store.store import Store
from pipeline.train.epochs import epoch_batches
from pipeline.train.stage import run_train

from conftest import configure

N, N_PRIOR, K = 16, 8, 2  # the synthetic data set (standard and prior concepts); variants in the test config


def _computed(summary):
    return tuple(summary[k] for k in ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed"))


def _as_tags(root: Path) -> None:
    """The synthetic captions as comma-separated tags: 'a photo of a teapot' -> 'a, photo, of, a, teapot'."""
    for caption in (root / "data").glob("*/*.txt"):
        caption.write_text(", ".join(caption.read_text().split()) + "\n")


def test_shuffle_tags_keeps_the_leading_tags_and_draws_the_rest_from_the_seed():
    caption = "sks, teapot , red,, table, photo, side view"
    tags = ["sks", "teapot", "red", "table", "photo", "side view"]
    orders = {shuffle_tags(caption, 2, seed) for seed in range(20)}
    assert len(orders) > 1  # the rest is shuffled, by the seed
    for seed in range(20):
        out = shuffle_tags(caption, 2, seed)
        assert out == shuffle_tags(caption, 2, seed)  # deterministic
        assert out.split(", ")[:2] == tags[:2] and sorted(out.split(", ")) == sorted(tags)
    assert shuffle_tags(caption, 6, 3) == ", ".join(tags)  # every tag kept: only the spacing is made regular
    assert shuffle_tags("a photo of sks teapot", 0, 3) == "a photo of sks teapot"  # one tag: as it was


def test_crop_offsets_are_drawn_inside_the_resized_image():
    seen = set()
    for seed in range(50):
        top, left = crop_offsets((80, 60), (48, 80), seed)  # resized (width, height), bucket (height, width)
        assert 0 <= top <= 12 and left == 0
        seen.add(top)
    assert len(seen) > 3 and crop_offsets((64, 64), (64, 64), 1) == (0, 0)


@pytest.mark.e2e
def test_shuffling_tags_recomputes_only_texts_and_the_priors_whose_caption_changed(project):
    path, _ = project(variants=K)
    _as_tags(project.root)
    base = configure(path)
    run_cache(base, progress=False)
    before = make_plan(base)
    old_texts = {k for s in before.samples for k in s.text_keys}
    old_priors = {before.prior_key(s, v) for s in before.samples if s.prior for v in range(K)}
    for data in ({"shuffle_tags": True}, {"shuffle_tags": True, "keep_tokens": 2}):
        cfg = configure(path, data=data)
        plan = make_plan(cfg)
        # a prior is new where its variant's caption is one not cached before (a shuffle can give back an
        # order seen before: then its text and prior are found)
        new_priors = {plan.prior_key(s, v) for s in plan.samples if s.prior for v in range(K)} - old_priors
        assert all(plan.prior_key(s, v) in old_priors for s in plan.samples if s.prior for v in range(K)
                   if s.text_keys[v] in old_texts)
        new_texts = {k for s in plan.samples for k in s.text_keys} - old_texts
        assert new_priors and new_texts
        assert _computed(run_cache(cfg, progress=False)) == (0, len(new_texts), 0, len(new_priors))
        store = Store(cfg.cache.dir)
        for s in plan.samples:
            for v in range(K):
                shuffled = store.read("text", s.text_keys[v])[1]["caption"]
                assert shuffled == s.captions[v] and sorted(shuffled.split(", ")) == sorted(s.caption.split(", "))
                kept = data.get("keep_tokens", 0)
                assert shuffled.split(", ")[:kept] == s.caption.split(", ")[:kept]
        old_texts |= new_texts
        old_priors |= new_priors
    assert any(s.captions[0] != s.caption for s in plan.samples)


@pytest.mark.e2e
def test_random_crop_recomputes_only_latents_and_their_priors_and_conditions_on_the_real_offsets(project):
    path, _ = project(variants=K, dtype="fp32", cache_batch=1)  # a VAE batch of one: compared bit for bit below
    base = configure(path)
    run_cache(base, progress=False)
    cfg = configure(path, data={"random_crop": True})
    plan = make_plan(cfg)
    latents = {k for s in plan.samples for k in s.latent_keys}
    assert _computed(run_cache(cfg, progress=False)) == (len(latents), 0, 0, N_PRIOR * K)
    store = Store(cfg.cache.dir)
    vae = plan.family.load_vae(torch.device("cpu"), torch.float32)
    # an image with room to move in its bucket (96x72 in the 80x48 bucket: resized to 80x60)
    sample = next(s for s in plan.samples if s.prior and len(set(s.crops)) > 1)
    for v in range(K):
        entry = store.read("latent", sample.latent_keys[v])[0]
        pixels, geometry = prepare_image(sample.path, sample.bucket, False, sample.crops[v])
        assert tuple(entry["crop_top_left"].tolist()) == sample.crops[v] == geometry["crop_top_left"]
        assert torch.equal(entry["latent"], plan.family.encode_images(vae, pixels[None])[0])
    assert sum(s.crops[v] != (0, 0) for s in plan.samples for v in range(K)) > 0
    # turning it off again finds the centre-cropped latents and their priors cached
    assert _computed(run_cache(base, progress=False)) == (0, 0, 0, 0)


@pytest.mark.e2e
def test_adding_a_resolution_computes_only_its_entries_and_batches_keep_one_shape(project):
    path, _ = project(variants=K, batch=4, max_steps=2)
    base = configure(path)  # data.resolution = 64
    run_cache(base, progress=False)
    same = configure(path, data={"resolution": None, "resolutions": [64]})
    assert _computed(run_cache(same, progress=False)) == (0, 0, 0, 0)  # the one resolution: the same keys
    cfg = configure(path, data={"resolution": None, "resolutions": [64, 48]})
    assert _computed(run_cache(cfg, progress=False)) == (N, 0, N_PRIOR * K, N_PRIOR * K)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    assert len(plan.samples) == 2 * N and cfg.data.resolution == 64
    shapes = {s.latent_keys[0]: store.shape("latent", s.latent_keys[0], "latent") for s in plan.samples}
    assert len(set(shapes.values())) > 3  # the buckets of both resolutions
    for epoch in range(2):
        for batch in epoch_batches(plan, shapes, epoch):
            assert len({shapes[s.latent_keys[v]] for s, v in batch}) == 1
    summary = run_train(cfg, progress=False)
    assert summary["steps"] == 2 and sum(summary["images_per_bucket"].values()) == 2 * N


@pytest.mark.e2e
def test_step0_prior_loss_is_zero_with_every_variant_option_on(project):
    path, _ = project(variants=K, dtype="fp32", batch=4, max_steps=1)
    _as_tags(project.root)
    cfg = configure(path, data={"resolution": None, "resolutions": [48, 64], "shuffle_tags": True, "keep_tokens": 1,
                                "random_crop": True, "flip_probability": 0.5, "caption_dropout": 0.2},
                    train={"gradient_accumulation": 32})  # the whole epoch in step 0: both resolutions' priors
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    first = json.loads(open(cfg.train.output_dir + "/metrics.jsonl").readline())
    assert first["n_prior"] == 2 * N_PRIOR and first["n_standard"] == 2 * (N - N_PRIOR)
    assert first["loss_standard"] > 0.1
    assert first["loss_prior"] <= 1e-10 * first["loss_standard"], first


@pytest.mark.e2e
def test_sdxl_is_conditioned_on_each_variants_random_crop_and_starts_at_zero_prior_loss(project, tiny_family_model):
    path, _ = project(model=tiny_family_model("sdxl"), variants=K, dtype="fp32", batch=4, max_steps=1)
    cfg = configure(path, data={"random_crop": True}, train={"gradient_accumulation": 8})
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    sample = next(s for s in plan.samples if s.prior and len(set(s.crops)) > 1)
    for v in range(K):  # the micro-conditioning the UNet gets: the variant's real crop offsets
        cond = load_inputs(plan, store, [(sample, v)]).cond
        assert tuple(cond["crop_top_left"][0].tolist()) == sample.crops[v]
    run_train(cfg, progress=False)
    first = json.loads(open(cfg.train.output_dir + "/metrics.jsonl").readline())
    assert first["n_prior"] == N_PRIOR and first["loss_prior"] <= 1e-10 * first["loss_standard"], first


def test_with_several_resolutions_an_image_is_held_out_at_every_resolution_or_none(project):
    from test_plan_warnings import more_priors

    path, _ = project()
    more_priors(project, 20)
    cfg = configure(path, data={"resolution": None, "resolutions": [48, 64], "auto_hold_out": 0.15})
    plan = make_plan(cfg)
    held = {s.path for s in plan.held_out}
    assert len(held) == 3 and len(plan.held_out) == 6  # 15% of 20 images, each at both resolutions
    assert not any(s.path in held for s in plan.training)
