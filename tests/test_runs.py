"""Runs never mix, and nothing is lost (issues 13 and 24): checkpoints record a run id, the config and what
the data and the base model are; a run into a folder holding another run (another dtype, an added image,
no checkpoint to go on from, or --restart) moves every file of that run to previous/ and deletes nothing;
two trainings into one folder cannot run at once; a damaged newest checkpoint is reported and resume goes
on from the newest intact one, with the LoRA an uninterrupted run gives."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from click.testing import CliRunner

from pipeline.cache.stage import run_cache
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.train import checkpoint
from pipeline.train.outdir import output_lock
from pipeline.train.stage import run_train

from conftest import configure

pytestmark = pytest.mark.e2e


def _run_ids(out):
    return {p.name: json.loads((p / "state.json").read_text())["run_id"] for p in checkpoint.all_checkpoints(out)}


def _files(folder):
    """Every file under `folder` (relative path -> bytes), the lock and earlier runs left out."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock" and "previous" not in p.relative_to(folder).parts}


def _moved_to(err, out):
    """The folder the one "moved the earlier run" line names."""
    lines = [x for x in err.splitlines() if "moved the earlier run" in x]
    assert len(lines) == 1, err
    match = re.search(rf"train: moved the earlier run in '{re.escape(str(out))}' to '([^']+)' \((.*)\)$", lines[0])
    assert match, lines[0]
    return Path(match.group(1)), match.group(2)


def test_another_dtype_moves_the_earlier_run_aside_and_deletes_nothing(project, capsys):
    path, _ = project(max_steps=4, dtype="fp32")
    first = configure(path, train={"checkpoint_every": 2, "keep_checkpoints": 0})
    run_cache(first, progress=False)
    run_train(first, progress=False)
    out = project.root / "out"
    before, ids = _files(out), _run_ids(out)
    assert list(ids) == ["step-00000002", "step-00000004"] and len(set(ids.values())) == 1  # the last step too

    # `make train DTYPE=bf16` after `make train DTYPE=fp32`: no refusal, no flag, nothing deleted
    bf16 = configure(path, train={"dtype": "bf16"})
    run_cache(bf16, progress=False)
    capsys.readouterr()
    summary = run_train(bf16, progress=False)
    moved, why = _moved_to(capsys.readouterr().err, out)
    assert summary["resumed_from_step"] is None and summary["steps"] == 4
    assert why == 'it differs in train.dtype "fp32" -> "bf16"'
    old_id = next(iter(ids.values()))
    assert moved.parent == out / "previous" and re.fullmatch(rf"\d{{8}}T\d{{6}}Z-{old_id[:8]}", moved.name)
    assert _files(moved) == before  # the whole earlier run, byte for byte: LoRA, metrics, checkpoints
    now = _run_ids(out)
    assert list(now) == ["step-00000002", "step-00000004"] and set(now.values()).isdisjoint(ids.values())
    assert checkpoint.saved_state(out / "checkpoints" / "step-00000004")["config"]["train"]["dtype"] == "bf16"
    assert sorted(p.name for p in (out / "previous").iterdir()) == [moved.name]

    # and back: the bf16 run goes aside beside the fp32 one
    run_train(first, progress=False)
    assert len(list((out / "previous").iterdir())) == 2


def test_an_added_image_moves_the_earlier_run_aside(project, capsys):
    path, _ = project(max_steps=2)
    cfg = configure(path, train={"checkpoint_every": 1})
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    out = project.root / "out"
    before = _files(out)
    standard = project.root / "data" / "standard"
    image = sorted(standard.glob("*.png"))[0]
    Image.open(image).transpose(Image.FLIP_TOP_BOTTOM).save(standard / "added.png")
    (standard / "added.txt").write_text(image.with_suffix(".txt").read_text())
    run_cache(cfg, progress=False)
    capsys.readouterr()
    assert run_train(cfg, progress=False)["resumed_from_step"] is None
    moved, why = _moved_to(capsys.readouterr().err, out)
    assert why == "it differs in the training images or captions (their content)"
    assert _files(moved) == before


def test_restart_starts_over_and_keeps_the_earlier_run(project, capsys):
    path, _ = project(max_steps=4, dtype="fp32")
    cfg = configure(path, train={"checkpoint_every": 2, "keep_checkpoints": 0})
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    out = project.root / "out"
    before, ids = _files(out), _run_ids(out)
    capsys.readouterr()
    summary = run_train(cfg, progress=False, restart=True)  # the same settings, yet from step 0
    moved, why = _moved_to(capsys.readouterr().err, out)
    assert why == "starting over (--restart)" and summary["resumed_from_step"] is None
    assert _files(moved) == before and set(_run_ids(out).values()).isdisjoint(ids.values())
    with pytest.raises(UserError, match="give one"):
        run_train(cfg, progress=False, resume=True, restart=True)


def test_a_run_without_checkpoints_is_moved_aside_by_the_next(project, capsys):
    path, cfg = project(max_steps=2)  # train.checkpoint_every = 0: no checkpoint, not even of the last step
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    out = project.root / "out"
    assert not (out / "checkpoints").exists()
    before = _files(out)
    capsys.readouterr()
    run_train(cfg, progress=False)
    moved, why = _moved_to(capsys.readouterr().err, out)
    assert why == "it has no intact checkpoint to go on from" and _files(moved) == before
    lora_sha = hashlib.sha256(before[cfg.train.lora_name]).hexdigest()
    assert moved.name.endswith("-" + lora_sha[:8])  # without a recorded run id: its LoRA's sha256


def test_a_folder_holding_the_config_is_not_moved(project):
    path, _ = project(max_steps=1, out=project.root)  # output_dir: the project's own folder
    cfg = load_config(path)
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    with pytest.raises(UserError) as e:
        run_train(cfg, progress=False, restart=True)
    assert "holds the config file" in str(e.value) and "\n" not in str(e.value)
    assert path.is_file() and not (project.root / "previous").exists()


def test_resume_refuses_changed_data(project):
    path, _ = project(max_steps=4)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    image = sorted((project.root / "data" / "standard").glob("*.png"))[0]
    pixels = Image.open(image).convert("RGB")
    pixels.putpixel((0, 0), tuple(255 - c for c in pixels.getpixel((0, 0))))
    pixels.save(image)
    run_cache(cfg, progress=False)
    with pytest.raises(UserError, match=r"cannot resume .*the training images or captions \(their content\)"):
        run_train(cfg, progress=False, resume=True)


def test_a_second_training_into_one_output_dir_is_refused(project):
    path, cfg = project(max_steps=1)
    run_cache(cfg, progress=False)
    with output_lock(project.root / "out"):  # what a running training holds
        with pytest.raises(UserError) as e:
            run_train(cfg, progress=False)
    assert "\n" not in str(e.value) and "is in use by another training (pid" in str(e.value)
    assert not (project.root / "out" / cfg.train.lora_name).exists()
    run_train(cfg, progress=False)  # the lock went with its holder


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(project, capsys):
    path, _ = project(max_steps=6, dtype="fp32")
    cfg = configure(path, train={"checkpoint_every": 2, "keep_checkpoints": 0})
    run_cache(cfg, progress=False)
    expected = load_file(run_train(cfg, progress=False)["lora"])
    root = project.root / "out" / "checkpoints"
    assert [p.name for p in checkpoint.all_checkpoints(project.root / "out")] == [
        "step-00000002", "step-00000004", "step-00000006"]
    shutil.rmtree(root / "step-00000006")  # as a run stopped after step 5 leaves it

    state = root / "step-00000004" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of the optimizer's state: a disk error, a bad copy
    state.write_bytes(bytes(data))
    capsys.readouterr()
    resumed = run_train(cfg, progress=False, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint '" + str(root / "step-00000004") + "' is damaged (state.safetensors does not match" in err
    assert resumed["resumed_from_step"] == 2
    got = load_file(resumed["lora"])
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    for p in checkpoint.all_checkpoints(project.root / "out"):
        (p / "lora.safetensors").unlink()
    with pytest.raises(UserError, match=r"no intact checkpoint in .* \(all 3 are damaged\)"):
        run_train(cfg, progress=False, resume=True)


def test_messages_name_makes_variables_under_make_and_options_on_the_command_line(project):
    path, cfg = project(max_steps=2)
    configure(path, train={"checkpoint_every": 1})
    make = {"PIPELINE_VIA_MAKE": "1"}  # what the Makefile sets on the commands it runs

    def train(*args, env=None, code=2):
        r = CliRunner().invoke(main, ["train", "--config", str(path), "--quiet", *args], env=env)
        assert r.exit_code == code, r.output
        return r.stderr

    # nothing cached yet: the command that caches it
    assert train(env=make).endswith(f"for this config: run make cache CONFIG={path}\n")
    assert train().endswith(f"for this config: run python -m pipeline cache --config {path}\n")
    assert train("--resume", "--restart", env=make) == (
        "error: RESUME=1 goes on with the run in train.output_dir and RESTART=1 starts over: give one\n")
    assert "error: --resume goes on with the run in train.output_dir and --restart" in train("--resume", "--restart")
    run_cache(configure(path), progress=False)
    out = project.root / "out"
    assert train("--resume", env=make).endswith("to resume from: train without RESUME=1\n")
    assert train("--resume").endswith("to resume from: train without --resume\n")
    train(env=make, code=0)
    assert "nothing to do; raise train.max_steps to train on, or train with RESTART=1 to start over" in train(env=make, code=0)
    assert "or train with --restart to start over" in train(code=0)
    moved = train("--overwrite", code=0)  # the former name of --restart
    assert f"train: moved the earlier run in '{out}' to '{out / 'previous'}" in moved and "(starting over (--restart))" in moved
