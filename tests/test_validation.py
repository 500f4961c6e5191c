"""Held-out validation concepts (deterministic loss, prior drift), sample grids from cached prompt
embeddings during training, and `python -m pipeline sample` afterwards."""

import json
from pathlib import Path

from PIL import Image
import pytest

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.sample import sample
from pipeline.train.stage import run_train

pytestmark = pytest.mark.e2e

HELD_OUT = """
[[concepts]]
folder = "{data}/heldout-standard"
type = "validation"

[[concepts]]
folder = "{data}/heldout-prior"
type = "validation"
prior = true

[validation]
prompts = ["a photo of sks teapot", "a photo of a teapot"]
every = 2
steps = 2
"""


def with_validation(project, **overrides):
    path, _ = project(**overrides)
    # the [[concepts]] arrays go before [cache]; TOML allows tables in any order after them
    text = path.read_text().replace("[cache]", HELD_OUT.format(data=project.root / "data") + "\n[cache]", 1)
    path.write_text(text)
    return path, load_config(path)


def test_validation_scores_and_samples_every_n_steps(project):
    _, cfg = with_validation(project, dtype="fp32", max_steps=5, lr=1e-2)
    cached = run_cache(cfg, progress=False)
    assert cached["validation_samples"] == 4 and cached["samples"] == 16
    summary = run_train(cfg, progress=False)
    lines = [json.loads(x) for x in open(Path(cfg.train.output_dir) / "validation.jsonl")]
    assert [x["step"] for x in lines] == [0, 2, 4, 5]  # the baseline, every 2 steps, the end
    assert lines[0]["prior_drift"] < 1e-10  # before any step the LoRA model is the base model
    assert lines[-1]["prior_drift"] > lines[0]["prior_drift"] and lines[-1]["val_loss"] > 0
    for x in lines:
        grid = Image.open(x["samples"])
        assert grid.size == (2 * 64, 64)  # two prompts, side by side
    assert summary["prior_drift"] == lines[-1]["prior_drift"] and summary["samples"] == lines[-1]["samples"]


def test_validation_scores_are_deterministic(project):
    _, cfg = with_validation(project, dtype="fp32")
    run_cache(cfg, progress=False)
    assert run_train(cfg, progress=False)["steps"] == 8  # one epoch of the 16 training images: none held out
    first = Path(cfg.train.output_dir, "validation.jsonl").read_text()
    first_grid = Path(cfg.train.output_dir, "samples", "step-000002.png").read_bytes()
    run_train(cfg, progress=False)
    assert Path(cfg.train.output_dir, "validation.jsonl").read_text() == first
    assert Path(cfg.train.output_dir, "samples", "step-000002.png").read_bytes() == first_grid


def test_training_without_the_prompt_embeddings_refuses(project):
    _, cfg = with_validation(project, max_steps=1)
    run_cache(cfg, progress=False)
    path = Path(cfg.source)
    path.write_text(path.read_text().replace('"a photo of a teapot"', '"a new prompt"'))
    with pytest.raises(UserError, match="text embeddings \\(1 missing\\)"):
        run_train(load_config(path), progress=False)


def test_sample_command_renders_with_the_saved_lora(project, tmp_path):
    _, cfg = with_validation(project, max_steps=1)
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    out = sample(cfg, None, ["sks teapot", "a teapot", "a cup"], str(tmp_path / "s.png"), steps=2)
    assert Image.open(out).size == (3 * 64, 64)
    with pytest.raises(UserError, match="--lora: '.*missing.safetensors' does not exist"):
        sample(cfg, str(tmp_path / "missing.safetensors"), ["x"], None)


def test_auto_held_out_prior_images_report_drift_from_the_cache_as_it_was(project):
    from conftest import configure
    from test_plan_warnings import more_priors

    path, _ = project(dtype="fp32", max_steps=2)
    more_priors(project, 20)
    before = run_cache(configure(path, data={"auto_hold_out": 0}), progress=False)
    assert before["validation_samples"] == 0 and before["prior_samples"] == 20
    cfg = configure(path, data={"auto_hold_out": 0.05})
    cached = run_cache(cfg, progress=False)
    # the held-out images are prior images the cache already holds: nothing new is computed
    assert cached["validation_samples"] == 2 and cached["prior_samples"] == 18
    assert all(cached[k] == 0 for k in ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed"))
    trained = run_train(cfg, progress=False)
    assert trained["prior_drift"] is not None and trained["val_loss"] is None
    rows = [json.loads(x) for x in open(Path(cfg.train.output_dir) / "validation.jsonl")]
    assert rows[0]["step"] == 0 and rows[0]["prior_drift"] < 1e-8  # the base model's own prediction at step 0
