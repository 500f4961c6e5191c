"""The noise policy and the options that change a draw: standard samples draw afresh every step
(reproducibly), prior samples keep their cached draws, repeated copies get distinct variants; the
per-family defaults; timestep shift, noise offset and input perturbation in the prior key with a zero
step-0 prior loss; SDXL's prediction_type override; min-SNR without NaN."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pipeline.data.batches import load_inputs
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.config import ModelConfig, TrainConfig
from pipeline.data.draws import fresh_seeds
from pipeline.errors import UserError
from pipeline.families import family_class
from pipeline.data.plan import make_plan
from pipeline.train.epochs import epoch_batches
from pipeline.train.stage import run_train

from conftest import configure

COMPUTED = ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed")


def _counts(summary):
    return tuple(summary[k] for k in COMPUTED)


def _family(name, root, **model):
    return family_class(name)(root, ModelConfig(path=str(root), **model))


@pytest.mark.e2e
def test_standard_samples_draw_afresh_and_reproducibly_prior_samples_keep_their_draws(project):
    path, cfg = project(dtype="fp32")
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    standard = next(s for s in plan.training if not s.prior)
    assert not store.has("noise", standard.noise_keys[0])  # nothing cached for a standard sample's draws
    items = [(standard, 0)] * 3
    seeds = [fresh_seeds(cfg, 0, 0), fresh_seeds(cfg, 0, 1), fresh_seeds(cfg, 1, 0)]
    a, again = load_inputs(plan, store, items, seeds), load_inputs(plan, store, items, seeds)
    assert torch.equal(a.noisy, again.noisy) and torch.equal(a.timesteps, again.timesteps)  # reproducible
    assert not torch.equal(a.noise[0], a.noise[1]) and not torch.equal(a.noise[0], a.noise[2])  # fresh per position, step
    prior = next(s for s in plan.training if s.prior)
    cached = load_inputs(plan, store, [(prior, 1)])
    entry = store.read("noise", prior.noise_keys[1])[0]
    assert cached.timesteps[0] == entry["timestep"]
    # two identical runs give identical losses; the standard losses are not those of the cached draws' era
    first = [json.loads(x)["loss"] for x in open(run_train(cfg, progress=False)["metrics"])]
    second_cfg = configure(path, train={"output_dir": str(project.root / "again")})
    assert [json.loads(x)["loss"] for x in open(run_train(second_cfg, progress=False)["metrics"])] == first


@pytest.mark.e2e
def test_repeated_copies_get_distinct_variants(project):
    path, _ = project(variants=4)
    text = path.read_text().replace('type = "prior"\n', 'type = "prior"\nrepeats = 2\n')
    path.write_text(text)
    cfg = configure(path)
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    shapes = {s.latent_keys[0]: store.shape("latent", s.latent_keys[0], "latent") for s in plan.samples}
    for epoch, expected in ((0, {0, 1}), (1, {2, 3}), (2, {0, 1})):
        seen: dict = {}
        for batch in epoch_batches(plan, shapes, epoch):
            for s, v in batch:
                seen.setdefault(s.path, []).append(v)
        priors = [v for s in plan.training if s.prior for v in [seen[s.path]]]
        assert all(sorted(v) == sorted(expected) for v in priors), (epoch, priors)  # two copies, two variants
        assert all(v == [epoch % 4] for s in plan.training if not s.prior for v in [seen[s.path]])


def test_per_family_defaults(tiny_family_model):
    flux, schnell = tiny_family_model("flux"), tiny_family_model("flux-schnell")
    hidream, sdxl = tiny_family_model("hidream"), tiny_family_model("sdxl")
    assert _family("flux", flux).max_sequence_length == 512  # FLUX.1-dev's pipeline default
    assert _family("flux", schnell).max_sequence_length == 256  # schnell's
    assert _family("hidream", hidream).max_sequence_length == 128  # HiDreamImagePipeline's
    assert _family("sdxl", sdxl).max_sequence_length == 77  # CLIP's, fixed
    assert _family("flux", flux, max_sequence_length=64).max_sequence_length == 64
    assert _family("flux", flux).default_timestep_sampling == "logit_normal"
    assert _family("hidream", hidream).default_timestep_sampling == "uniform"


def test_hidream_draws_reach_the_low_noise_end(project, tiny_family_model):
    _, cfg = project(model=tiny_family_model("hidream"), timestep_sampling="auto")
    plan = make_plan(cfg)
    sigmas = torch.stack([plan.draws.timestep((8, 8), seed)[1] for seed in range(2000)])
    # uniform over the shift-3 table: P(sigma < 0.2) = 0.2 / (3 - 2 * 0.2) ~ 7.7%; logit-normal on top of
    # the shift would give well under 1%
    assert 0.05 < (sigmas < 0.2).float().mean() < 0.11


def test_fixed_and_resolution_dependent_shift_are_the_schedulers(tiny_family_model):
    flux = _family("flux", tiny_family_model("flux"))
    timesteps, sigmas = flux.shifted_table(3.0, None)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)  # a fixed-shift table, as diffusers builds it
    assert torch.allclose(sigmas, reference.sigmas, atol=1e-6) and torch.allclose(timesteps, reference.timesteps)
    # as FluxPipeline at inference: sigmas 1 .. 1/n shifted with mu from the number of 2x2 patches
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = flux.scheduler()
    for hw in ((8, 8), (64, 64)):
        c = scheduler.config
        mu = calculate_shift(hw[0] // 2 * hw[1] // 2, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                             c.max_shift)
        inference = FlowMatchEulerDiscreteScheduler.from_config(c)
        inference.set_timesteps(sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=mu)  # FluxPipeline's sigmas, 1000 steps
        assert torch.allclose(flux.shifted_table(0.0, hw)[1], inference.sigmas[:-1].float(), atol=1e-5)
    assert not torch.allclose(flux.shifted_table(0.0, (8, 8))[1], flux.shifted_table(0.0, (64, 64))[1])


@pytest.mark.e2e
@pytest.mark.parametrize("option", [{"shift": 3.0}, {"dynamic_shift": True}, {"noise_offset": 0.1},
                                    {"input_perturbation": 0.1}], ids=lambda o: next(iter(o)))
def test_each_draw_option_is_in_the_prior_key_and_step0_prior_loss_stays_zero(project, option):
    path, cfg = project(dtype="fp32", max_steps=1, batch=4)
    base = run_cache(cfg, progress=False)
    changed = configure(path, cache=option)
    s = run_cache(changed, progress=False)
    n = base["priors_computed"]
    assert _counts(s) == (0, 0, n, n)  # the prior draws and their predictions, nothing else
    assert _counts(run_cache(changed, progress=False)) == (0, 0, 0, 0)
    first = json.loads(open(run_train(changed, progress=False)["metrics"]).readline())
    assert first["n_prior"] > 0 and first["loss_prior"] <= 1e-10 * first["loss_standard"]


@pytest.mark.e2e
def test_input_perturbation_moves_the_input_not_the_target(project):
    path, _ = project(dtype="fp32")
    cfg = configure(path, cache={"input_perturbation": 0.5})
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    prior = next(s for s in plan.training if s.prior)
    x = load_inputs(plan, store, [(prior, 0)])
    plain = plan.family.noisy_input(x.latents, x.noise, x.timesteps, x.sigmas)
    assert not torch.allclose(x.noisy, plain)  # the input carries the perturbation
    assert torch.equal(plan.family.target(x.latents, x.noise, x.timesteps), x.noise - x.latents)  # the target not


def test_shift_is_for_flow_models_only(project, tiny_family_model):
    path, _ = project(model=tiny_family_model("sdxl"))
    with pytest.raises(UserError, match="config key 'cache.shift' is for flow-matching models"):
        make_plan(configure(path, cache={"shift": 3.0}))
    with pytest.raises(UserError, match="exclude each other"):
        make_plan(configure(project(name="f.toml")[0], cache={"shift": 3.0, "dynamic_shift": True}))
    with pytest.raises(UserError, match="config key 'model.prediction_type' is for epsilon/v-prediction models"):
        make_plan(configure(project(name="g.toml")[0], model={"prediction_type": "v_prediction"}))


@pytest.mark.e2e
def test_sdxl_prediction_type_override_changes_the_target_not_the_priors(project, tiny_family_model):
    path, cfg = project(model=tiny_family_model("sdxl"), dtype="fp32")
    run_cache(cfg, progress=False)
    v = configure(path, model={"prediction_type": "v_prediction"})
    assert _counts(run_cache(v, progress=False)) == (0, 0, 0, 0)  # a prior is the UNet's own output either way
    eps_family, v_family = make_plan(cfg).family, make_plan(v).family
    g = torch.Generator().manual_seed(0)
    latents, noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10., 900.])
    assert torch.equal(eps_family.target(latents, noise, t), noise)
    assert torch.equal(v_family.target(latents, noise, t), v_family.scheduler().get_velocity(latents, noise, t.long()))
    assert run_train(v, progress=False)["steps"] > 0


def test_min_snr_has_no_nan_at_zero_terminal_snr(tiny_family_model, tmp_path):
    root = tmp_path / "zsnr"
    shutil.copytree(tiny_family_model("sdxl") / "scheduler", root / "scheduler")
    config = root / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rescale_betas_zero_snr": True}))
    train = TrainConfig(loss_weighting="min_snr", min_snr_gamma=5.0)
    t = torch.tensor([0.0, 500.0, 999.0])
    for kind in ("epsilon", "v_prediction"):
        weights = _family("sdxl", root, prediction_type=kind).loss_weights(train, t, None)
        assert torch.isfinite(weights).all(), (kind, weights)
    eps = _family("sdxl", root, prediction_type="epsilon").loss_weights(train, t, None)
    assert eps[-1] == 1.0  # the limit of min(snr, gamma) / snr at snr = 0
