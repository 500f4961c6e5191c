"""Every input that changes a cache entry is in its key: change one input alone and exactly the entries
that depend on it are recomputed, no others (counted). A hyperparameter sweep recomputes nothing."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.train.stage import run_train

pytestmark = pytest.mark.e2e

N, N_PRIOR, CAPTIONS, K = 16, 8, 10, 2  # the synthetic data set; variants in the test config


def _perturb(model_dir, component):
    weights = next((model_dir / component).glob("*.safetensors"))
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1e-2
    save_file(state, weights, metadata={"format": "pt"})


def _computed(summary):
    return tuple(summary[k] for k in ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed"))


# (what changes, config overrides, model component to perturb, expected (latents, texts, noise, priors))
CASES = [
    ("resolution", {"resolution": 48}, None, (N, 0, N_PRIOR * K, N_PRIOR * K)),
    ("VAE weights", {}, "vae", (N, 0, 0, N_PRIOR * K)),
    ("CLIP weights", {}, "text_encoder", (0, CAPTIONS, 0, N_PRIOR * K)),
    ("T5 weights", {}, "text_encoder_2", (0, CAPTIONS, 0, N_PRIOR * K)),
    ("denoiser weights", {}, "transformer", (0, 0, 0, N_PRIOR * K)),
    ("train dtype", {"dtype": "fp32"}, None, (0, 0, 0, N_PRIOR * K)),
    ("guidance", {"guidance": 3.5}, None, (0, 0, 0, N_PRIOR * K)),
    ("cache seed", {"cache_seed": 7}, None, (0, 0, N_PRIOR * K, N_PRIOR * K)),
    ("timestep distribution", {"timestep_sampling": "uniform"}, None, (0, 0, N_PRIOR * K, N_PRIOR * K)),
    ("timestep setting", {"logit_mean": 0.5}, None, (0, 0, N_PRIOR * K, N_PRIOR * K)),
    ("one more variant", {"variants": K + 1}, None, (0, 0, N_PRIOR, N_PRIOR)),
]


@pytest.fixture
def cached(project, tiny_assets):
    """A copy of the tiny model and a cache filled for the base config."""
    model = project.root / "model"
    shutil.copytree(tiny_assets / "model", model)
    _, cfg = project(model=model)
    run_cache(cfg, progress=False)
    return project, model


@pytest.mark.parametrize("what,overrides,component,expected", CASES, ids=[c[0] for c in CASES])
def test_changing_one_input_recomputes_exactly_its_dependents(cached, what, overrides, component, expected):
    project, model = cached
    if component:
        _perturb(model, component)
    _, cfg = project(name="changed.toml", model=model, **overrides)
    assert _computed(run_cache(cfg, progress=False)) == expected, what


def test_a_setting_the_timestep_scheme_does_not_use_recomputes_nothing(project):
    run_cache(project(timestep_sampling="uniform")[1], progress=False)
    _, cfg = project(name="changed.toml", timestep_sampling="uniform", logit_mean=0.5)
    assert _computed(run_cache(cfg, progress=False)) == (0, 0, 0, 0)


def test_a_hyperparameter_sweep_shares_one_cache_with_no_recomputation(project):
    _, base = project()
    run_cache(base, progress=False)
    segments = sorted(p.name for p in (project.root / "cache" / "segments").iterdir())
    for i, overrides in enumerate([{"lr": 1e-4, "rank": 8, "max_steps": 3}, {"lr": 5e-3, "rank": 2, "max_steps": 5}]):
        _, cfg = project(name=f"sweep{i}.toml", out=project.root / f"out{i}", **overrides)
        assert _computed(run_cache(cfg, progress=False)) == (0, 0, 0, 0)
        assert run_train(cfg, progress=False)["steps"] == overrides["max_steps"]
    assert sorted(p.name for p in (project.root / "cache" / "segments").iterdir()) == segments
    assert len(Store(base.cache.dir).keys("prior/bf16")) == N_PRIOR * K
