"""Runs never mix (issue 13, items 3 and 4): checkpoints record a run id, the config and what the data and
the base model are; a fresh run into a folder holding another run's checkpoints is refused unless
--overwrite; two trainings into one folder cannot run at once; a damaged newest checkpoint is reported
and resume goes on from the newest intact one, with the LoRA an uninterrupted run gives."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.cache.stage import run_cache
from pipeline.errors import UserError
from pipeline.train import checkpoint
from pipeline.train.outdir import output_lock
from pipeline.train.stage import run_train

from conftest import configure

pytestmark = pytest.mark.e2e


def _run_ids(out):
    return {p.name: json.loads((p / "state.json").read_text())["run_id"] for p in checkpoint.all_checkpoints(out)}


def test_a_fresh_run_over_another_runs_checkpoints_needs_overwrite(project, capsys):
    path, _ = project(max_steps=4, dtype="fp32")
    first = configure(path, train={"checkpoint_every": 2, "keep_checkpoints": 0})
    run_cache(first, progress=False)
    run_train(first, progress=False)
    out = project.root / "out"
    ids = _run_ids(out)
    assert list(ids) == ["step-00000002"] and len(set(ids.values())) == 1

    # the same settings again (`make train` twice): allowed, and its checkpoints replace the old ones
    capsys.readouterr()
    run_train(first, progress=False)
    assert "train: replacing the run in" in capsys.readouterr().err
    again = _run_ids(out)
    assert list(again) == ["step-00000002"] and again != ids

    # another run's settings: refused in one line naming what differs; nothing is removed
    other = configure(path, lora={"rank": 8}, train={"checkpoint_every": 2, "keep_checkpoints": 0})
    with pytest.raises(UserError) as e:
        run_train(other, progress=False)
    message = str(e.value)
    assert "\n" not in message and "holds the checkpoints of another run" in message
    assert "lora.rank 4 -> 8" in message and "--overwrite" in message
    assert _run_ids(out) == again

    # --overwrite: the other run's checkpoints go first, so no --resume can pick up its step
    run_train(other, progress=False, overwrite=True)
    assert "removed the checkpoints of the earlier run" in capsys.readouterr().err
    final = _run_ids(out)
    assert list(final) == ["step-00000002"] and set(final.values()).isdisjoint(again.values())
    saved = checkpoint.saved_state(out / "checkpoints" / "step-00000002")
    assert saved["config"]["lora"]["rank"] == 8 and saved["data"] and saved["base_model"]

    # a resumed run keeps the run id of the checkpoint it goes on from
    longer = configure(path, lora={"rank": 8}, train={"checkpoint_every": 2, "keep_checkpoints": 0, "max_steps": 6})
    run_train(longer, progress=False, resume=True)
    assert set(_run_ids(out).values()) == set(final.values()) and len(_run_ids(out)) == 2
    with pytest.raises(UserError, match="give one"):
        run_train(longer, progress=False, resume=True, overwrite=True)


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
    assert [p.name for p in checkpoint.all_checkpoints(project.root / "out")] == ["step-00000002", "step-00000004"]

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
    with pytest.raises(UserError, match=r"no intact checkpoint in .* \(all 2 are damaged\)"):
        run_train(cfg, progress=False, resume=True)
