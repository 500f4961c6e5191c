"""validation.compare_without_priors: the run trained again with its prior concepts at loss weight 0, both
runs' samples side by side in one labelled grid, and both runs' held-out scores in the summary."""

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.train.stage import run_train

from conftest import configure
from test_validation import with_validation


def comparing(project, **overrides):
    path, _ = with_validation(project, **overrides)
    path.write_text(path.read_text().replace("[validation]\n", "[validation]\ncompare_without_priors = true\n", 1))
    # a checkpoint at the end: run again, each run is complete (without one a run starts over)
    return configure(path, train={"checkpoint_every": 4})


@pytest.mark.e2e
def test_compare_without_priors_trains_both_and_shows_them_side_by_side(project):
    cfg = comparing(project, dtype="fp32", max_steps=4, lr=1e-2)
    run_cache(cfg, progress=False)
    summary = run_train(cfg, progress=False)
    out = Path(cfg.train.output_dir)
    other = out / "without-priors"
    grid = Image.open(summary["comparison"])
    prompts = cfg.validation.prompts
    assert summary["comparison"] == str(out / "comparison.png") and grid.size == (2 * 64, len(prompts) * 64)
    assert json.loads(grid.text["prior_lora.labels"]) == [f"{tag}: {p}" for p in prompts
                                                          for tag in ("with priors", "without priors")]
    # the same data, order and steps; the prior samples there but pulling with weight 0
    mine = [json.loads(x) for x in open(out / "metrics.jsonl")]
    theirs = [json.loads(x) for x in open(other / "metrics.jsonl")]
    assert [x["n_prior"] for x in theirs] == [x["n_prior"] for x in mine] and any(x["n_prior"] for x in mine)
    assert all(x["loss_prior"] in (None, 0.0) for x in theirs) and any(x["loss_prior"] for x in mine)
    a, b = load_file(summary["lora"]), load_file(summary["without_priors"]["lora"])
    assert a.keys() == b.keys() and any(not a[k].equal(b[k]) for k in a)
    last = json.loads((other / "validation.jsonl").read_text().splitlines()[-1])
    assert summary["without_priors"]["prior_drift"] == last["prior_drift"] > 0
    # again: both runs complete, nothing trained, the grid kept and reported
    again = run_train(cfg, progress=False)
    assert again["complete_already"] and again["comparison"] == summary["comparison"]
    assert again["without_priors"]["prior_drift"] == summary["without_priors"]["prior_drift"]


def test_compare_without_priors_needs_a_prior_concept(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "c.toml"
    path.write_text('[model]\npath = "m"\n[[concepts]]\nfolder = "data"\n[[concepts]]\nfolder = "data"\ntype = "prior"\n'
                    'loss_weight = 0.0\n[validation]\ncompare_without_priors = true\n')
    with pytest.raises(UserError, match=r"c.toml: config key 'validation.compare_without_priors' compares a run with its prior"):
        load_config(path)
