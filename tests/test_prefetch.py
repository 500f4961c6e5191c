"""The prefetcher (train.prefetch): the next step's batches read in a worker process change nothing in a
run, its errors surface at the step that needed the batch, as they were raised, and it leaves no worker
behind. Also the Store it reads from: safe to read from two threads at once."""

import json
import threading
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import configure
from pipeline.cache.stage import run_cache
from pipeline.store.store import AccessError, Store
from pipeline.errors import UserError
from pipeline.train import prefetch as prefetch_module
from pipeline.train import step as step_module
from pipeline.train.stage import run_train


def _readers() -> list:
    """The prefetch workers still alive: child processes of this one (torch's DataLoader forks them)."""
    return [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != "zombie"]


def test_store_reads_from_two_threads_at_once(tmp_path):
    # one open handle at most: without the lock, one thread closes the file the other is reading from
    store = Store(tmp_path)
    for i in range(4):
        store.write("latent", {f"k{i}": ({"x": torch.full((64, 64), float(i))}, {})})
    store = Store(tmp_path, max_open=1)
    errors = []

    def read(n):
        try:
            for j in range(200):
                i = (j + n) % 4
                assert torch.equal(store.read("latent", f"k{i}")[0]["x"], torch.full((64, 64), float(i)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == []


@pytest.mark.e2e
def test_prefetched_run_equals_reading_in_the_step(project, monkeypatch):
    """Priors cached, gradient accumulation and validation (the main thread reads the store while the reader
    does): the LoRA and every metric bitwise those of a run that reads in the step."""
    runs = {}
    for name in ("prefetched", "in_step"):
        path, _ = project(name=f"{name}.toml", out=project.root / name, dtype="fp32", epochs=2)
        held_out = f'[[concepts]]\nfolder = "{project.root}/data/heldout-prior"\ntype = "validation"\nprior = true\n\n'
        path.write_text(path.read_text().replace("[cache]\n", held_out + "[cache]\n") + "\n[validation]\nevery = 3\n")
        cfg = configure(path, train={"gradient_accumulation": 2})
        if name == "prefetched":
            run_cache(cfg, progress=False)
        else:  # the reader still runs, but the step reads for itself
            monkeypatch.setattr(prefetch_module.Prefetcher, "take", lambda self, step, group: None)
        summary = run_train(cfg, progress=False)
        runs[name] = (load_file(summary["lora"]),
                      [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in open(summary["metrics"])])
        assert _readers() == []
    (lora, metrics), (lora_in_step, metrics_in_step) = runs["prefetched"], runs["in_step"]
    assert len(metrics) == 8 and metrics == metrics_in_step
    assert lora.keys() == lora_in_step.keys()
    assert all(torch.equal(lora[k], lora_in_step[k]) for k in lora)


def _damaged(kind, key):
    return UserError(f"cache file 'x.h5' is damaged ({kind}/{key}): delete it and run make cache")


def _refused(kind, key):  # an error with more than a message: it must cross from the worker whole
    return AccessError(f"cannot read cache file 'x.h5' ({kind}/{key}): too many open files", Path("x.h5"), 24)


@pytest.mark.e2e
@pytest.mark.parametrize("error", [_damaged, _refused])
def test_a_read_error_surfaces_at_its_step_and_stops_the_reader(project, monkeypatch, error):
    _, cfg = project(dtype="fp32")
    run_cache(cfg, progress=False)
    real_read, real_step, computed = prefetch_module.read_batch, step_module.train_step, []

    class Damaged:
        def read(self, kind, key):
            raise error(kind, key)

    def read_batch(plan, store, items, mode, step, first):  # step 3's batch: its first read fails
        return real_read(plan, Damaged() if step == 3 else store, items, mode, step, first)

    def train_step(*args, **kwargs):
        computed.append(kwargs["read"].step)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(prefetch_module, "read_batch", read_batch)
    monkeypatch.setattr(step_module, "train_step", train_step)
    with pytest.raises(UserError, match="is damaged|cannot read") as raised:
        run_train(cfg, progress=False)
    assert type(raised.value) is type(error("k", "k"))
    if error is _refused:
        assert (raised.value.path, raised.value.errno) == (Path("x.h5"), 24)
    assert computed == [0, 1, 2]  # steps 0-2 ran; step 3 stopped where it needed its batch
    assert _readers() == []


@pytest.mark.e2e
def test_the_reader_is_gone_after_a_run_and_after_an_interrupt(project, monkeypatch):
    _, cfg = project(dtype="fp32", max_steps=3)
    run_cache(cfg, progress=False)
    assert run_train(cfg, progress=False)["steps"] == 3
    assert _readers() == []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(step_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, progress=False, overwrite=True)
    assert _readers() == []
