"""End to end on the tiny Flux model: what the cache stage computes and reuses, and how training
consumes it (one forward per batch, prior target = cached prediction, refusal on a missing dtype)."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import FluxTransformer2DModel

from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.errors import UserError
from pipeline.data.plan import make_plan
from pipeline.train.stage import run_train

COMPUTED = ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed")


def computed(summary):
    return {k: summary[k] for k in COMPUTED}


@pytest.mark.e2e
def test_cache_computes_once_then_reuses_everything(project):
    _, cfg = project()
    first = run_cache(cfg, progress=False)
    plan = make_plan(cfg)
    n, n_prior = len(plan.samples), sum(s.prior for s in plan.samples)
    captions = len({s.caption for s in plan.samples})
    assert (n, n_prior) == (16, 8)
    assert computed(first) == {"latents_encoded": n, "texts_encoded": captions, "noise_computed": 2 * n_prior,
                               "priors_computed": 2 * n_prior}
    again = run_cache(cfg, progress=False)
    assert computed(again) == dict.fromkeys(COMPUTED, 0)
    assert again["priors_reused"] == 2 * n_prior and again["bytes_on_disk"] == first["bytes_on_disk"]


@pytest.mark.e2e
def test_train_writes_lora_and_metrics(project):
    _, cfg = project(epochs=2)
    run_cache(cfg, progress=False)
    summary = run_train(cfg, progress=False)
    lines = [json.loads(x) for x in open(summary["metrics"])]
    assert summary["steps"] == len(lines) == 16  # 16 samples, batch 2, 2 epochs
    for key in ("step", "loss", "loss_standard", "loss_prior", "n_standard", "n_prior", "lr", "seconds"):
        assert key in lines[0]
    assert [x["variant"] for x in lines] == [0] * 8 + [1] * 8  # epoch e uses variant e mod K
    assert sum(x["n_prior"] for x in lines) == 16 and sum(x["n_standard"] for x in lines) == 16


@pytest.mark.e2e
def test_cached_prior_equals_a_fresh_forward(project):
    """Recompute one prior by hand with diffusers alone (no cache code) from the stored seed and timestep."""
    from diffusers import AutoencoderKL, FluxPipeline

    from pipeline.data.images import load_image

    _, cfg = project(cache_batch=1)  # batch composition 1 everywhere, so equality is bitwise
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    sample = next(s for s in plan.samples if s.prior)
    variant = 1
    prior = store.read("prior/bf16", plan.prior_key(sample, variant))[0]["prediction"]
    noise_entry = store.read("noise", sample.noise_keys[variant])[0]
    seed, t = int(noise_entry["seed"]), noise_entry["timestep"]

    root = plan.family.root
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    with torch.no_grad():
        z = vae.encode(load_image(sample.path, 64)[None]).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    pipe = FluxPipeline.from_pretrained(root, transformer=None, vae=None)
    embeds, pooled, text_ids = pipe.encode_prompt(sample.caption, prompt_2=None, max_sequence_length=32)
    noise = torch.randn(z.shape[1:], generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)[None]
    sigma = t / 1000
    x_t = (1 - sigma) * z + sigma * noise
    b, c, h, w = x_t.shape
    transformer = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", dtype=torch.bfloat16)
    with torch.no_grad():
        out = transformer(
            hidden_states=FluxPipeline._pack_latents(x_t.bfloat16(), b, c, h, w),
            timestep=t.reshape(1).bfloat16() / 1000,
            guidance=torch.full([1], 1.0),
            pooled_projections=pooled.bfloat16(),
            encoder_hidden_states=embeds.bfloat16(),
            txt_ids=text_ids.bfloat16(),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.bfloat16),
            return_dict=False,
        )[0]
    fresh = FluxPipeline._unpack_latents(out, h, w, 1)[0]
    assert prior.dtype == torch.bfloat16
    assert torch.equal(prior, fresh)


@pytest.mark.e2e
def test_step0_prior_loss_is_zero_and_standard_loss_is_not(project):
    for dtype, tol in (("fp32", 1e-10), ("bf16", 1e-4)):
        _, cfg = project(dtype=dtype, max_steps=1, batch=4)
        run_cache(cfg, progress=False)
        run_train(cfg, progress=False)
        first = json.loads(open(cfg.train.output_dir + "/metrics.jsonl").readline())
        assert first["n_prior"] > 0 and first["n_standard"] > 0, first
        assert first["loss_standard"] > 0.1
        assert first["loss_prior"] <= tol * first["loss_standard"], (dtype, first)


class ForwardCounter:
    def __init__(self):
        self.calls = 0

    def __enter__(self):
        def hook(module, args):
            # the memory planner's dry runs on meta tensors (nothing computed) are not forwards
            if isinstance(module, FluxTransformer2DModel) and next(module.parameters()).device.type != "meta":
                self.calls += 1

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.e2e
def test_one_denoiser_forward_per_batch(project):
    _, cfg = project(epochs=1)
    run_cache(cfg, progress=False)
    with ForwardCounter() as cached:
        steps = run_train(cfg, progress=False)["steps"]
    assert steps == 8 and cached.calls == steps
    # the peers' way for comparison: an extra forward for every batch holding a prior sample
    _, online = project(name="online.toml", prior_mode="online")
    with ForwardCounter() as peers:
        run_train(online, progress=False)
    lines = [json.loads(x) for x in open(online.train.output_dir + "/metrics.jsonl")]
    assert peers.calls == steps + sum(x["n_prior"] > 0 for x in lines) > steps


@pytest.mark.slow
def test_dtype_change_recomputes_priors_only_and_training_refuses_a_missing_dtype(project):
    path, cfg = project()
    run_cache(cfg, progress=False)
    _, fp32 = project(dtype="fp32")
    s = run_cache(fp32, progress=False)
    assert computed(s) == {"latents_encoded": 0, "texts_encoded": 0, "noise_computed": 0, "priors_computed": 16}
    store = Store(cfg.cache.dir)
    assert len(store.keys("prior/bf16")) == len(store.keys("prior/fp32")) == 16  # side by side
    _, fp16 = project(dtype="fp16")
    with pytest.raises(UserError, match="priors for fp16 are not cached .* run python -m pipeline cache --config .* --dtype fp16"):
        run_train(fp16, progress=False)
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(path), "--dtype", "fp16"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "priors for fp16 are not cached" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.e2e
def test_training_refuses_priors_of_another_model(project, tiny_assets, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, cfg = project()
    run_cache(cfg, progress=False)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_assets / "model", other)
    weights = next((other / "transformer").glob("*.safetensors"))
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    _, changed = project(name="other.toml", model=other)
    with pytest.raises(UserError, match="priors for bf16 are not cached"):
        run_train(changed, progress=False)
    s = run_cache(changed, progress=False)  # same VAE and text encoders: only the priors are new
    assert computed(s) == {"latents_encoded": 0, "texts_encoded": 0, "noise_computed": 0, "priors_computed": 16}


@pytest.mark.e2e
def test_editing_one_image_or_caption_recomputes_that_sample_only(project):
    _, cfg = project()
    run_cache(cfg, progress=False)
    plan = make_plan(cfg)
    target = next(s for s in plan.samples if s.prior)
    image = target.path
    from PIL import Image

    with Image.open(image) as im:
        im = im.convert("RGB")
        im.putpixel((0, 0), (0, 255, 0))
        im.save(image)
    s = run_cache(cfg, progress=False)
    assert computed(s) == {"latents_encoded": 1, "texts_encoded": 0, "noise_computed": 2, "priors_computed": 2}
    image.with_suffix(".txt").write_text("a photo of a completely new teapot caption")
    s = run_cache(cfg, progress=False)
    assert computed(s) == {"latents_encoded": 0, "texts_encoded": 1, "noise_computed": 0, "priors_computed": 2}


def cache_contents(cache_dir):
    store = Store(cache_dir)
    out = {}
    for kind in store.kinds():
        for key in store.keys(kind):
            out[(kind, key)] = store.read(kind, key)[0]
    store.close()
    return out


@pytest.mark.slow
def test_ctrl_c_and_kill_9_mid_cache_then_rerun_equals_an_uninterrupted_run(project):
    import os
    import signal
    import time

    # batch 1, 4 variants, a segment per batch: 59 segments, so both interruptions land with work still left,
    # even on a busy machine
    path, cfg = project(cache_batch=1, variants=4, segment_mb=0)
    reference_path, reference = project(name="ref.toml", cache=project.root / "ref-cache", cache_batch=1, variants=4)
    run_cache(reference, progress=False)
    expected = cache_contents(reference.cache.dir)

    segments = project.root / "cache" / "segments"
    # Ctrl-C at the first finished segment, then kill -9 part-way through the rest
    for threshold, sig in ((1, signal.SIGINT), (12, signal.SIGKILL)):
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "cache", "--config", str(path), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if segments.is_dir() and len([p for p in segments.glob("*.h5") if not p.name.startswith(".")]) >= threshold:
                break
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and err.strip().startswith("interrupted: every finished cache segment is kept")
            assert "Traceback" not in err
    before = cache_contents(cfg.cache.dir)
    assert 0 < len(before) < len(expected)
    s = run_cache(cfg, progress=False)
    assert sum(computed(s).values()) == len(expected) - len(before)  # nothing complete is recomputed
    after = cache_contents(cfg.cache.dir)
    assert after.keys() == expected.keys()
    for k, tensors in expected.items():
        for name, t in tensors.items():
            assert torch.equal(after[k][name], t), (k, name)


@pytest.mark.e2e
def test_online_prior_mode_caches_no_priors_and_trains(project):
    _, cfg = project(prior_mode="online")
    s = run_cache(cfg, progress=False)
    assert s["priors_computed"] == 0 and s["latents_encoded"] == 16
    assert run_train(cfg, progress=False)["steps"] == 8


@pytest.mark.e2e
def test_online_prior_mode_draws_prior_samples_fresh(project):
    """Online priors draw like the peers do: a fresh noise and timestep every step, from (train seed, step,
    position), never the cached draw (cached priors keep it: test_cached_prior_equals_a_fresh_forward)."""
    from pipeline.data.draws import fresh_seeds
    from pipeline.train.step import read_batch

    _, cfg = project(prior_mode="online")
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    for s in [s for s in plan.samples if s.prior][:2]:  # one per batch: their buckets may differ
        draw = store.read("noise", s.noise_keys[0])[0]
        online, later = (read_batch(plan, store, [(s, 0)], "online", step=step, first=1).inputs for step in (3, 4))
        assert not torch.equal(online.noise, plan.draws.noise(int(draw["seed"]), online.latents.shape)[0])
        noise_seed, timestep_seed = fresh_seeds(cfg, 3, 1)
        assert online.timesteps[0] == plan.draws.timestep(tuple(online.latents.shape[2:]), timestep_seed)[0]
        assert torch.equal(online.noise, plan.draws.noise(noise_seed, online.latents.shape)[0])
        assert not torch.equal(online.noise, later.noise)  # another step, another draw
    store.close()
