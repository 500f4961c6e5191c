"""Several processes (issue 11): both stages under `torchrun --standalone --nproc_per_node 2` on the CPU (gloo,
OMP_NUM_THREADS=1), against one process. The cache of 2 ranks is the cache of 1, also after a worker is
SIGKILLed mid-run; a second job is refused on every rank; 2 ranks train the LoRA 1 rank trains on the same
global batches, hold identical weights, and only rank 0 writes; an interrupted 2-rank run resumed ends
bitwise where an uninterrupted one does. The unit tests at the top need no launcher."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import configure
from pipeline import processes
from pipeline.store.lock import cache_lock
from pipeline.cache.stage import run_cache
from pipeline.store.store import HOST, writer_gone
from pipeline.errors import UserError
from pipeline.train import checkpoint

WORKER = Path(__file__).with_name("dist_train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(n: int, *args, **popen):
    """torchrun with n processes (a free port: --standalone), or plain python for n = 0."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n else [sys.executable]
    return subprocess.Popen([*launcher, *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def _run(n: int, *args) -> subprocess.CompletedProcess:
    proc = _launch(n, *args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _digests(cache_dir) -> dict:
    """(kind, key, dataset) -> sha256 of the stored bytes, over every segment."""
    out = {}
    for path in sorted(p for p in Path(cache_dir, "segments").glob("*.h5") if not p.name.startswith(".")):
        with h5py.File(path, "r") as f:
            for key in f:
                for name, ds in f[key].items():
                    out[(str(f.attrs["kind"]), key, name)] = hashlib.sha256(np.asarray(ds[()]).tobytes()).hexdigest()
    return out


# -- units --------------------------------------------------------------------------------------------
def _rank(rank: int, size: int) -> processes.OneProcess:
    """The share arithmetic of rank `rank` of `size`, without a process group."""
    procs = processes.OneProcess()
    procs.rank, procs.size = rank, size
    return procs


def test_shares_cover_a_batch_once():
    for n in range(0, 7):
        shares = [_rank(r, 3).slice(n) for r in range(3)]
        assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(n))


def test_launched_processes_that_each_run_alone_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    alone = types.SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO")
    with pytest.raises(UserError, match="started 2 processes .* but each runs alone"):
        processes.refuse_lonely(alone)


def test_a_lora_layer_without_a_gradient_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0](torch.ones(1, 2)).sum().backward()  # the second layer takes no part in the forward
    with pytest.raises(UserError, match="config key 'lora.targets': the LoRA on '1' gets no gradient"):
        processes.refuse_missing_gradients(model, "lora.targets")
    model[1](torch.ones(1, 2)).sum().backward()
    processes.refuse_missing_gradients(model, "lora.targets")


def test_a_temporary_of_another_host_is_never_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert writer_gone(f"{dead.pid}@{HOST}") and writer_gone(str(dead.pid))
    assert not writer_gone(f"{dead.pid}@another_machine")
    assert not writer_gone(f"{os.getpid()}@{HOST}")


def test_resuming_with_another_number_of_processes(project, tmp_path):
    _, cfg = project()
    (tmp_path / "state.json").write_text(json.dumps({"world_size": 2}))
    assert "only the rounding" in checkpoint.check_world(tmp_path, cfg, 1)
    assert checkpoint.check_world(tmp_path, cfg, 2) is None
    cfg = configure(Path(cfg.source), lora={"dropout": 0.1})
    with pytest.raises(UserError, match="run of 2 process.*lora.dropout = 0.1 .*resume with 2"):
        checkpoint.check_world(tmp_path, cfg, 1)


# -- under torchrun -----------------------------------------------------------------------------------
@pytest.fixture
def reference(project):
    """A config (one segment per batch of one) and its cache made by one process."""
    path, cfg = project(cache_batch=1, segment_mb=0)
    _, ref = project(name="ref.toml", cache=project.root / "ref-cache", cache_batch=1, segment_mb=0)
    run_cache(ref, progress=False)
    return path, cfg, _digests(ref.cache.dir)


@pytest.mark.slow
def test_two_ranks_cache_what_one_caches(reference):
    path, cfg, expected = reference
    done = _run(2, "-m", "pipeline", "cache", "--config", path, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digests(cfg.cache.dir) == expected
    summary = json.loads(done.stdout.strip().splitlines()[-1])["cache_summary"]  # rank 0 alone prints it
    assert done.stdout.count("cache_summary") == 1
    assert [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert all(r["latents_encoded"] > 0 for r in summary["ranks"])  # both did a share
    assert sum(r["priors_computed"] for r in summary["ranks"]) == summary["priors_computed"] > 0


@pytest.mark.slow
def test_a_worker_killed_mid_cache_and_a_rerun(reference):
    path, cfg, expected = reference
    segments, lock = Path(cfg.cache.dir) / "segments", Path(cfg.cache.dir) / ".lock-write"
    proc = _launch(2, "-m", "pipeline", "cache", "--config", path, "--quiet")
    deadline, victim, holder = time.time() + 120, None, ""
    while time.time() < deadline and proc.poll() is None and victim is None:
        done = [p for p in segments.glob("*.h5") if not p.name.startswith(".")] if segments.is_dir() else []
        if done:
            holder = lock.read_text()
            victim = int(done[0].name.split(".")[2])  # <kind>.<ns>.<pid>.<random>.h5: a worker's pid
        time.sleep(0.005)
    assert victim is not None, "no segment appeared"
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0  # the launcher stops the other worker too
    assert "a job of 2 processes" in holder  # rank 0 recorded the job in the lock
    partial = _digests(cfg.cache.dir)
    assert 0 < len(partial) < len(expected)
    done = _run(2, "-m", "pipeline", "cache", "--config", path, "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digests(cfg.cache.dir) == expected
    assert not list(segments.glob(".tmp*"))  # the killed workers' temporaries went


@pytest.mark.slow
def test_a_second_job_is_refused_on_every_rank(project):
    path, cfg = project()
    with cache_lock(cfg.cache.dir, "write"):  # another job holds the cache
        done = _run(2, "-m", "pipeline", "cache", "--config", path, "--quiet")
    assert done.returncode != 0
    # each rank's line; two ranks writing at once may share a line of stderr, so found by their text
    refusals = re.findall(r"error: cache directory .*? is busy: .*?run this again", done.stderr)
    assert len(refusals) == 2 and len(set(refusals)) == 1, done.stderr[-3000:]
    assert f"pid {os.getpid()}" in refusals[0]


@pytest.mark.slow
def test_cache_ranks_with_another_config_are_refused_before_any_work(project):
    path, cfg = project(dtype="bf16")
    done = _run(2, WORKER.with_name("dist_cache.py"), path, "--skew")
    assert done.returncode != 0
    refusals = re.findall(r"error: .*? would cache another config than rank 0 .*?config file and data", done.stderr)
    assert len(refusals) == 2 and len(set(refusals)) == 1, done.stderr[-3000:]
    assert "rank 1 (host" in refusals[0] and 'train.dtype "fp32" -> "bf16"' in refusals[0]
    assert not (Path(cfg.cache.dir) / "segments").exists() or not any((Path(cfg.cache.dir) / "segments").iterdir())


@pytest.mark.slow
def test_a_rank_that_dies_is_named_at_once(project):
    path, cfg = project(dtype="bf16")
    # torchrun stops the other ranks as soon as it sees one exit (every 0.1 s by default), which can be
    # before rank 0 has seen the broken barrier and said so (then torchrun's own report names rank 1):
    # a slower monitor lets rank 0's message through every time
    done = _run(2, "--monitor-interval=5", WORKER.with_name("dist_cache.py"), path, "--die")
    assert done.returncode != 0, done.stderr[-3000:]
    said = re.findall(r"error: (.*? stopped before finishing .*?run the same command again)", done.stderr)
    assert said and "rank 1 (host" in said[0] and "the latent phase" in said[0], done.stderr[-3000:]
    assert "did not finish" not in done.stderr


def _train(n: int, path, out: Path, *extra) -> dict[int, dict]:
    out.mkdir(exist_ok=True)
    done = _run(n, WORKER, path, out, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: load_file(str(out / f"rank-{r}.safetensors")) for r in range(max(n, 1))}


@pytest.fixture
def cached(project):
    path, cfg = project(dtype="fp32", epochs=2)
    run_cache(cfg, progress=False)
    return path, cfg


@pytest.mark.slow
def test_two_ranks_train_the_lora_one_trains(cached, tmp_path):
    path, cfg = cached
    configure(path, train={"gradient_accumulation": 2, "epochs": 1})  # no_sync on the first batch
    one = _train(0, path, tmp_path / "one")[0]
    metrics_one = (Path(cfg.train.output_dir) / "metrics.jsonl").read_text()
    two = _train(2, path, tmp_path / "two")
    metrics_two = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert one.keys() == two[0].keys()
    diff = max(float((one[k] - two[0][k]).abs().max()) for k in one)
    print(f"1 rank vs 2 ranks: max |LoRA difference| = {diff:.3g} over {len(one)} tensors")
    assert diff <= 1e-6
    assert max(float((one[k] - 0).abs().max()) for k in one if "lora_B" in k) > 1e-4  # it trained
    assert all(torch.equal(two[0][k], two[1][k]) for k in one)  # every rank holds the same weights
    assert not (tmp_path / "two" / "output-of-rank-1").exists()  # only rank 0 wrote
    # metrics.jsonl reads as one run: every step's losses and sample counts as one process had them
    for a, b in zip([json.loads(line) for line in metrics_one.splitlines()], metrics_two, strict=True):
        assert (a["step"], a["n_standard"], a["n_prior"]) == (b["step"], b["n_standard"], b["n_prior"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.slow
def test_ranks_with_another_config_are_refused(cached, tmp_path):
    path, cfg = cached
    (tmp_path / "skew").mkdir()
    done = _run(2, WORKER, path, tmp_path / "skew", "--skew")
    assert done.returncode != 0
    refusals = re.findall(r"error: .*? would train another run than rank 0 .*?config file and data", done.stderr)
    assert len(refusals) == 2 and len(set(refusals)) == 1, done.stderr[-3000:]
    assert "rank 1 (host" in refusals[0] and "optimizer.lr 0.002 -> 0.001" in refusals[0]
    assert not (Path(cfg.train.output_dir) / cfg.train.lora_name).exists()


@pytest.mark.slow
def test_an_interrupted_two_rank_run_resumed(cached, tmp_path):
    path, cfg = cached
    configure(path, lora={"dropout": 0.1}, train={"checkpoint_every": 2})  # dropout seeded by rank
    whole = _train(2, path, tmp_path / "whole")[0]
    checkpoints = Path(cfg.train.output_dir) / "checkpoints"
    for old in checkpoints.glob("step-*"):
        shutil.rmtree(old)
    (tmp_path / "cut").mkdir()
    proc = _launch(2, WORKER, path, tmp_path / "cut")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (checkpoints / "step-00000002").is_dir():
        time.sleep(0.005)
    for worker in psutil.Process(proc.pid).children(recursive=True):  # the launcher runs them in their own session
        worker.kill()
    proc.communicate(timeout=60)
    assert not (tmp_path / "cut" / "rank-0.safetensors").exists(), "the run ended before it was interrupted"
    resumed = _train(2, path, tmp_path / "cut", "--resume")
    assert all(torch.equal(whole[k], resumed[0][k]) for k in whole)
    assert all(torch.equal(resumed[0][k], resumed[1][k]) for k in whole)
