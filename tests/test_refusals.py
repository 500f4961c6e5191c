"""What used to be a traceback or a silent trap is a one-line error (exit 2) or a one-line notice: an output
dir that is a file, a CUDA device torch does not have, --resume with a config that changes results, a
config without a standard concept, a batch size no bucket fills, and a shorter run over a longer one's
output (moved aside)."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from pipeline.cache.stage import run_cache
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.store.keys import sha256_file
from pipeline.train.stage import run_train

from conftest import configure


def _reseal(checkpoint_dir):
    """checksums.json rewritten for the checkpoint's files as they now are."""
    sums = {p.name: sha256_file(p) for p in sorted(checkpoint_dir.iterdir()) if p.name != "checksums.json"}
    (checkpoint_dir / "checksums.json").write_text(json.dumps(sums))


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    assert "Traceback" not in r.output and all(w in r.stderr for w in words), r.stderr


@pytest.mark.e2e
def test_an_output_dir_that_is_a_file_is_one_line(project):
    (project.root / "taken").write_text("not a folder")
    path, _ = project(out=project.root / "taken")
    one_line_error(cli("train", "--config", path), "train.output_dir", "taken' is a file, not a folder")
    path, _ = project(out=project.root / "taken" / "run")  # a file above it: mkdir would fail the same way
    one_line_error(cli("train", "--config", path), "train.output_dir", "taken' is a file", "(above '")


@pytest.mark.e2e
def test_a_cuda_device_without_cuda_is_refused_at_config_time(project, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch, whatever this one is
    path, _ = project()
    for table, value in (("train", "cuda"), ("cache", "cuda:1")):
        text = path.read_text()
        with pytest.raises(UserError) as e:
            configure(path, **{table: {"device": value}})
        message = str(e.value)
        assert f"config key '{table}.device' is '{value}'" in message and '"auto" or "cpu"' in message
        assert "\n" not in message and "config.toml" in message
        one_line_error(cli("cache", "--config", path), f"{table}.device")
        path.write_text(text)
    assert load_config(path).train.device == "auto"  # auto stays allowed: it picks the CPU here


@pytest.mark.e2e
def test_resume_with_a_changed_rank_names_the_changed_keys(project):
    path, _ = project(dtype="fp32", max_steps=4)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    state = json.loads((project.root / "out" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["config"]["lora"]["rank"] == 4  # the run's config, recorded for this check

    changed = configure(path, lora={"rank": 8}, optimizer={"lr": 0.01})
    with pytest.raises(UserError) as e:
        run_train(changed, progress=False, resume=True)
    message = str(e.value)
    assert "\n" not in message and "step-00000004" in message
    assert "lora.rank 4 -> 8" in message and "optimizer.lr 0.001 -> 0.01" in message
    assert "train without --resume to start over" in message and "lora.alpha" not in message
    one_line_error(cli("train", "--config", path, "--resume"), "lora.rank 4 -> 8")

    # a checkpoint from before configs were recorded: peft's size mismatch becomes one line too
    state_file = project.root / "out" / "checkpoints" / "step-00000004" / "state.json"
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "config"}))
    _reseal(state_file.parent)  # an intact checkpoint of that format (a checkpoint without checksums is damaged)
    with pytest.raises(UserError, match="does not fit this LoRA"):
        run_train(configure(path, lora={"rank": 8}, optimizer={"lr": 0.001}), progress=False, resume=True)

    # the run's length is not a result key: resuming to train longer is allowed
    state_file.write_text(json.dumps(state))
    _reseal(state_file.parent)
    longer = configure(path, lora={"rank": 4}, train={"max_steps": 6})
    assert run_train(longer, progress=False, resume=True)["steps"] == 6


@pytest.mark.e2e
def test_a_config_without_a_standard_concept_is_refused(project):
    path, _ = project()
    text = path.read_text()
    path.write_text(text.replace('/standard"\n', '/standard"\ntype = "validation"\n', 1))
    with pytest.raises(UserError) as e:
        load_config(path)
    assert "no standard concept" in str(e.value) and 'type = "standard"' in str(e.value) and "\n" not in str(e.value)

    path.write_text(text)  # a standard concept whose images are all unusable: refused by the plan
    for image in (project.root / "data" / "standard").glob("*.png"):
        image.write_bytes(b"")
    with pytest.raises(UserError, match="no usable images in any standard concept"):
        run_cache(load_config(path), progress=False)


@pytest.mark.e2e
def test_a_batch_size_no_bucket_fills_is_one_warning_with_the_real_sizes(project, capsys):
    _, cfg = project(dtype="fp32", batch=32)
    run_cache(cfg, progress=False)
    capsys.readouterr()
    run_train(cfg, progress=False)
    lines = [x for x in capsys.readouterr().err.splitlines() if "train.batch_size" in x]
    assert len(lines) == 1 and lines[0].startswith("warning: train.batch_size = 32 is larger than every bucket")
    shown = {int(n) for n in re.findall(r"\d+", lines[0].split("the real batch sizes are ")[1])}
    sizes = {r["n_standard"] + r["n_prior"] for r in map(json.loads, open(project.root / "out" / "metrics.jsonl"))}
    assert shown == sizes and max(sizes) < 32


@pytest.mark.e2e
def test_a_shorter_run_moves_the_longer_one_aside(project, capsys):
    path, _ = project(dtype="fp32", max_steps=6)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    capsys.readouterr()
    run_train(cfg, progress=False)
    assert "moved the earlier run" not in capsys.readouterr().err  # nothing there yet
    out = project.root / "out"
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004", "step-00000006"]

    shorter = configure(path, train={"max_steps": 4})
    run_train(shorter, progress=False)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train: moved the earlier run")]
    assert len(lines) == 1 and lines[0].endswith("(it went on to step 6, and this run ends at step 4)")
    # its checkpoints are this run's alone: a later run goes on from them, never from the longer run's step
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    (moved,) = (out / "previous").iterdir()
    assert sorted(p.name for p in (moved / "checkpoints").iterdir())[-1] == "step-00000006"
    assert (moved / cfg.train.lora_name).is_file() and (moved / "metrics.jsonl").is_file()


@pytest.mark.e2e
def test_a_prior_concept_equal_to_the_subject_is_refused_before_anything_is_cached(project):
    import shutil

    path, _ = project()
    copy = project.root / "data" / "copy"
    shutil.copytree(project.root / "data" / "standard", copy)
    path.write_text(path.read_text().replace(str(project.root / "data" / "prior"), str(copy)))
    r = cli("cache", "--config", path)
    one_line_error(r, f"concepts[1] (type = \"prior\", folder '{copy}')", "the same images with the same captions",
                   "concepts[0]")
    # refused while planning: no model loaded, no segment written (before, its priors were computed and
    # training only warned about the shared captions)
    assert not list((project.root / "cache").rglob("*.h5"))
