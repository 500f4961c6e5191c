"""Segment files gather many batches (cache.segment_mb, cache.segment_seconds). However a run is split
into files (one per batch, by size, by time, cut short by a crash or by Ctrl-C) the finished cache is the
same bit for bit, because the batches themselves never change."""

import dataclasses

import pytest
import torch

from pipeline.cache import stage
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store


def _files(cache_dir):
    store = Store(cache_dir)
    out = {kind: len(paths) for kind, paths in store.segments_by_kind().items()}
    store.close()
    return out


def _contents(cache_dir):
    store = Store(cache_dir)
    out = {(kind, key): store.read(kind, key)[0] for kind in store.kinds() for key in store.keys(kind)}
    store.close()
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k, tensors in a.items():
        for name, t in tensors.items():
            assert torch.equal(b[k][name], t), (k, name)


@pytest.fixture
def reference(project):
    """A cache written a segment per batch, and the bytes of each batch of priors (shapes differ by bucket)."""
    _, cfg = project(name="ref.toml", cache=project.root / "ref-cache", segment_mb=0)
    run_cache(cfg, progress=False)
    contents = _contents(cfg.cache.dir)
    priors = [sum(t.numel() * t.element_size() for t in contents[("prior/bf16", k)].values())
              for k in sorted(k for kind, k in contents if kind == "prior/bf16")]
    return _files(cfg.cache.dir), contents, [sum(priors[i : i + 4]) for i in range(0, len(priors), 4)]


@pytest.mark.e2e
def test_a_segment_holds_many_batches_and_the_cache_is_the_same(project, reference):
    per_batch, expected, _ = reference
    assert per_batch["latent"] == 4 and per_batch["prior/bf16"] == 4  # 16 of each, batches of 4

    _, cfg = project()  # the default target, far above this whole cache: one file per kind
    run_cache(cfg, progress=False)
    assert _files(cfg.cache.dir) == dict.fromkeys(per_batch, 1)
    _assert_same(expected, _contents(cfg.cache.dir))

    _, by_time = project(name="time.toml", cache=project.root / "time-cache")
    by_time = dataclasses.replace(by_time, cache=dataclasses.replace(by_time.cache, segment_seconds=1e-9))
    run_cache(by_time, progress=False)  # every batch is older than that: a file per batch again
    assert _files(by_time.cache.dir) == per_batch
    _assert_same(expected, _contents(by_time.cache.dir))


@pytest.mark.e2e
@pytest.mark.parametrize("fault,kept,files", [(RuntimeError, 8, 2), (KeyboardInterrupt, 12, 3)])
def test_cut_short_while_batches_wait_the_rerun_gives_the_same_cache(project, reference, monkeypatch, fault, kept,
                                                                     files):
    _, expected, batch_bytes = reference
    # a prior segment is written once batches 1 and 2 are done; batch 3 alone stays below the target
    target = batch_bytes[0] + batch_bytes[1]
    assert batch_bytes[0] < target and batch_bytes[2] < target
    _, cfg = project(segment_mb=target / 2**20)
    load, prior_compute = stage.COMPUTE["prior"]
    calls = []

    def compute(*args):
        calls.append(1)
        if len(calls) == 4:  # batches 1, 2 are written, 3 waits: a crash loses it, Ctrl-C writes it first
            raise fault("cut short")
        return prior_compute(*args)

    monkeypatch.setitem(stage.COMPUTE, "prior", (load, compute))
    with pytest.raises(fault):
        run_cache(cfg, progress=False)
    monkeypatch.undo()
    assert len(Store(cfg.cache.dir).keys("prior/bf16")) == kept
    assert run_cache(cfg, progress=False)["priors_computed"] == 16 - kept
    _assert_same(expected, _contents(cfg.cache.dir))
    assert _files(cfg.cache.dir)["prior/bf16"] == files  # what was written before, then the rerun's own
