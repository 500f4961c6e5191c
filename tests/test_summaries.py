"""Honest summaries: the progress bar and final_loss are the standard loss (the prior loss beside it) over
recent steps, not the last batch's; after --resume the summary covers the whole run; printed tables read
as text (sizes in MB, no Python reprs) while the JSON line keeps the values; the cache says in words what
it computed."""

import json
import shutil

import pytest
from click.testing import CliRunner

from pipeline.data.kinds import in_words
from pipeline.cache.stage import run_cache
from pipeline.cli import _human, main
from pipeline.train.sinks import ProgressSink
from pipeline.train.stage import run_train

from conftest import configure

LOSS_KEYS = ("final_loss", "final_loss_prior", "last_epoch_loss_standard", "last_epoch_loss_prior")


def metrics(root):
    return [json.loads(x) for x in open(root / "out" / "metrics.jsonl")]


def test_the_bar_shows_recent_standard_and_prior_loss_not_the_last_batch():
    bar = ProgressSink(total=4, initial=0, enabled=False, window=3)
    for standard, prior in ((0.5, None), (0.3, 0.002), (0.4, 0.004)):
        bar.step({"loss": 0.0, "loss_standard": standard, "loss_prior": prior})
    assert bar.postfix() == {"standard": "0.4000", "prior": "0.0030"}
    bar.step({"loss": 0.001, "loss_standard": None, "loss_prior": 0.001})  # a batch of prior samples only
    assert bar.postfix() == {"standard": "0.3500", "prior": "0.0023"}  # the standard loss is not 0.001
    resumed = ProgressSink(total=4, initial=2, enabled=False, window=3,
                           history=[{"loss_standard": 1.0, "loss_prior": None}])
    resumed.step({"loss_standard": 0.0, "loss_prior": 0.5})
    assert resumed.postfix() == {"standard": "0.5000", "prior": "0.5000"}  # the steps before a resume count


@pytest.mark.e2e
def test_final_loss_is_the_standard_loss_over_the_last_epochs_steps(project):
    _, cfg = project(dtype="fp32", epochs=2)
    run_cache(cfg, progress=False)
    summary = run_train(cfg, progress=False)
    rows = metrics(project.root)
    window = rows[-8:]  # 16 training images, batch 2: 8 steps an epoch
    mean = lambda key: round(sum(r[key] for r in window if r[key] is not None)  # noqa: E731
                             / sum(r[key] is not None for r in window), 6)
    assert summary["final_loss"] == mean("loss_standard") and summary["final_loss_prior"] == mean("loss_prior")
    assert summary["final_loss_prior"] < summary["final_loss"]
    assert summary["last_epoch_loss_standard"] == mean("loss_standard")  # here the last epoch is that window


@pytest.mark.e2e
def test_the_summary_after_resume_covers_the_whole_run(project):
    path, _ = project(dtype="fp32", max_steps=6)
    cfg = configure(path, train={"checkpoint_every": 4})
    run_cache(cfg, progress=False)
    whole = run_train(cfg, progress=False)
    assert whole["resumed_from_step"] is None
    shutil.rmtree(project.root / "out" / "checkpoints" / "step-00000006")  # as a run stopped after step 5 leaves it
    resumed = run_train(cfg, progress=False, resume=True)  # goes on from step 4: steps 4 and 5 again
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6 and resumed["epochs"] == whole["epochs"]
    assert {k: resumed[k] for k in LOSS_KEYS} == {k: whole[k] for k in LOSS_KEYS}
    assert len(metrics(project.root)) == 6


def test_printed_values_are_for_people():
    assert _human("bytes_on_disk", 1_234_567) == "1.2 MB" and _human("bytes_on_disk", 612_300) == "612.3 KB"
    assert _human("bytes_on_disk", 3 * 10**9) == "3.0 GB" and _human("final_loss", None) == "-"
    assert _human("images_per_bucket", {"64x64": 10, "80x64": 6}) == "64x64: 10, 80x64: 6"
    assert _human("skipped_images", []) == "-" and _human("seconds", 2.5) == "2.5 s"
    assert _human("final_loss", 0.12345678901) == "0.123457"


@pytest.mark.e2e
def test_the_tables_have_no_python_reprs_and_the_json_keeps_the_values(project):
    path, _ = project(dtype="fp32", max_steps=2)
    runner = CliRunner()
    for args in (["cache"], ["train"]):
        r = runner.invoke(main, [*args, "--config", str(path), "--quiet"])
        assert r.exit_code == 0, r.output
        *table, last = r.stdout.strip().splitlines()
        text = "\n".join(table)
        assert not any(s in text for s in ("None", "{", "[]", "'")), text
        summary = next(iter(json.loads(last).values()))
        if args == ["cache"]:
            assert isinstance(summary["bytes_on_disk"], int) and "bytes_on_disk" in text and " KB" in text
            assert "images_per_bucket" in text and summary["images_per_bucket"]
        else:
            assert summary["skipped_images"] == [] and summary["resumed_from_step"] is None


@pytest.mark.e2e
def test_the_cache_says_in_words_what_it_computed(project):
    path, _ = project()
    runner = CliRunner()
    first = runner.invoke(main, ["cache", "--config", str(path), "--quiet"]).stdout
    assert ("cache: done: everything was computed (16 latents, 10 text embeddings, 16 noise seeds and timesteps, "
            "16 priors for bf16)") in first
    again = runner.invoke(main, ["cache", "--config", str(path), "--quiet"]).stdout
    assert "cache: nothing to compute, everything is cached" in again
    fp32 = runner.invoke(main, ["cache", "--config", str(path), "--quiet", "--dtype", "fp32"]).stdout
    assert "cache: done: only priors for fp32 were computed (16); everything else was reused" in fp32
    partial = {"dtype": "bf16", "latents_encoded": 1, "latents_reused": 15, "texts_encoded": 0, "texts_reused": 10,
               "noise_computed": 2, "noise_reused": 30, "priors_computed": 2, "priors_reused": 14}
    assert in_words(partial) == ("done: computed 1 of 16 latents, 2 of 32 noise seeds and timesteps, "
                                 "2 of 16 priors for bf16; everything else was reused")
