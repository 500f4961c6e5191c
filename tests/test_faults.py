"""Faults: a full disk while caching, damaged or foreign files in the cache, Ctrl-C while training.
Each ends in a one-line message, keeps what was finished, and a rerun completes."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.errors import UserError


@pytest.mark.e2e
def test_disk_full_keeps_finished_segments_and_the_rerun_completes(project, monkeypatch):
    _, cfg = project(segment_mb=0)  # a segment per batch
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):  # the 6th segment hits a full disk while it is being flushed
        calls["n"] += 1
        if calls["n"] == 6 * 2:  # each segment: fsync of the file, then of its directory
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(UserError, match="disk full writing the cache in .* every finished segment is kept"):
        run_cache(cfg, progress=False)
    monkeypatch.undo()
    segments = cfg.cache.dir + "/segments"
    assert not [n for n in os.listdir(segments) if n.startswith(".tmp")], "no half-written file is left"
    kept = Store(cfg.cache.dir)
    assert not kept.unreadable and 0 < len(kept.keys("latent")) + len(kept.keys("text"))
    again = run_cache(cfg, progress=False)  # space freed
    assert again["latents_reused"] + again["texts_reused"] > 0 and again["priors_computed"] == 16
    assert run_cache(cfg, progress=False)["priors_computed"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_training_never_shows_an_hdf5_traceback(project, damage):
    path, cfg = project()
    run_cache(cfg, progress=False)
    seg = cfg.cache.dir + "/segments"
    victim = sorted(n for n in os.listdir(seg) if n.startswith("latent."))[0]
    if damage == "truncated":
        with open(os.path.join(seg, victim), "r+b") as f:
            f.truncate(100)
    else:
        os.remove(os.path.join(seg, victim))
        with open(os.path.join(seg, "notes.h5"), "w") as f:
            f.write("not an hdf5 file\n")
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(path), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert "missing" in r.stderr and "run python -m pipeline cache --config " in r.stderr
    if damage == "truncated":
        assert f"cache file '{os.path.join(seg, victim)}' cannot be read" in r.stderr


@pytest.mark.slow
def test_ctrl_c_while_training_exits_cleanly_and_quickly(project):
    path, cfg = project(epochs=50)
    run_cache(cfg, progress=False)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config", str(path), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(cfg.train.output_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # a guard against a hang, not a speed check
    assert proc.returncode == 130 and err.strip() == (
        "interrupted: no LoRA was written; the cache is untouched and checkpoints, if any, are kept "
        "(training again with the same settings goes on from the newest)"
    )
    assert all(json.loads(line)["step"] >= 0 for line in open(metrics))  # complete lines only
