"""kill -9 at twenty points of a cache run: every rerun goes on without redoing finished work, and the
final cache equals an uninterrupted run's bit for bit. Runs are progressive (each rerun is killed again
further on) so twenty kill points cost twenty process starts, not forty."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.cache.stage import run_cache
from pipeline.store.store import Store

pytestmark = pytest.mark.slow


def _segments(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5") if not p.name.startswith(".")} if folder.is_dir() else {}


def _contents(cache_dir):
    store = Store(cache_dir)
    out = {(kind, key): store.read(kind, key)[0] for kind in store.kinds() for key in store.keys(kind)}
    store.close()
    return out


def test_kill_9_at_twenty_points(project):
    _, reference = project(name="ref.toml", cache=project.root / "ref-cache", cache_batch=1, variants=8)
    run_cache(reference, progress=False)
    expected = _contents(reference.cache.dir)

    # a segment per batch (segment_mb = 0): 16 latent + 10 text + 1 noise + 64 prior segments
    path, cfg = project(cache_batch=1, variants=8, segment_mb=0)
    folder = project.root / "cache" / "segments"
    rng = random.Random(0)
    kills, before = 0, {}
    while kills < 20:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "cache", "--config", str(path), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = len(before) + 1
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(_segments(folder)) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.02))  # sometimes just after a rename, sometimes in the middle of a write
        if proc.poll() is not None:
            break  # the run finished before this kill point: the cache is complete
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        after = _segments(folder)
        # nothing finished is lost or rewritten: every earlier segment is still there, untouched
        assert all(after.get(name) == stamp for name, stamp in before.items())
        before = after
    assert kills == 20, f"the run completed after only {kills} kill points"

    partial = _contents(cfg.cache.dir)
    summary = run_cache(cfg, progress=False)
    recomputed = sum(summary[k] for k in ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed"))
    assert recomputed == len(expected) - len(partial)  # only what was missing
    final = _contents(cfg.cache.dir)
    assert final.keys() == expected.keys()
    for k, tensors in expected.items():
        for name, t in tensors.items():
            assert torch.equal(final[k][name], t), (k, name)
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]
