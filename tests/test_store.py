"""The HDF5 segment store: round trips, bf16, atomic segments, and what a crash leaves behind."""

import os
import resource

import h5py
import pytest
import torch

from pipeline.store.store import Store


def _entry(x):
    return ({"a": x}, {"note": "n"})


def test_round_trip_dtypes(tmp_path):
    store = Store(tmp_path)
    values = {
        "k32": torch.randn(2, 3),
        "k16": torch.randn(2, 3).half(),
        "kbf": torch.randn(2, 3).bfloat16(),
        "kint": torch.tensor(7, dtype=torch.int64),
    }
    store.write("kind/x", {k: _entry(v) for k, v in values.items()})
    reopened = Store(tmp_path)
    for k, v in values.items():
        tensors, attrs = reopened.read("kind/x", k)
        assert tensors["a"].dtype == v.dtype
        assert torch.equal(tensors["a"], v)
        assert attrs["note"] == "n"
    assert reopened.keys("kind/x") == set(values)
    assert reopened.shape("kind/x", "k32", "a") == (2, 3)


def test_segments_are_self_describing_hdf5(tmp_path):
    path = Store(tmp_path).write("latent", {"abc": _entry(torch.ones(4))})
    with h5py.File(path, "r") as f:
        assert f.attrs["kind"] == "latent"
        ds = f["abc"]["a"]
        assert ds.attrs["dtype"] == "float32" and len(ds.attrs["sha256"]) == 64


def test_unfinished_and_damaged_files_lose_only_themselves(tmp_path):
    store = Store(tmp_path)
    store.write("latent", {"good": _entry(torch.ones(4))})
    # what a kill -9 during a write leaves: a temporary of a dead writer, never indexed
    dead = tmp_path / "segments" / ".tmp.999999999.x.h5"
    dead.write_bytes(b"half an hdf5 file")
    # a file damaged some other way, with a final name
    (tmp_path / "segments" / "latent.bad.h5").write_bytes(b"\x89HDF garbage")
    again = Store(tmp_path)
    assert again.keys("latent") == {"good"}
    assert [p.name for p in again.unreadable] == ["latent.bad.h5"]
    again.write("latent", {"more": _entry(torch.zeros(4))})
    assert not dead.exists(), "stale temporaries of dead writers are removed"
    assert Store(tmp_path).keys("latent") == {"good", "more"}


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write("latent", {"good": _entry(torch.ones(4))})

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    try:
        store.write("latent", {"new": _entry(torch.ones(4))})
    except OSError:
        pass
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "segments").iterdir())
    assert len(names) == 1 and names[0].startswith("latent.")
    assert Store(tmp_path).keys("latent") == {"good"}


def _fds():
    return os.listdir("/proc/self/fd")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_open_files_are_bounded_and_indexing_holds_none(tmp_path):
    writer = Store(tmp_path)
    for i in range(20):
        writer.write("latent", {f"k{i}": _entry(torch.full((3,), float(i)))})
    base = len(_fds())
    store = Store(tmp_path, max_open=4)
    assert len(_fds()) == base
    for _ in range(2):
        for i in range(20):
            assert torch.equal(store.read("latent", f"k{i}")[0]["a"], torch.full((3,), float(i)))
            assert store.check("latent", f"k{i}") is None and store.shape("latent", f"k{i}", "a") == (3,)
            assert len(_fds()) <= base + 4
    store.close()
    assert len(_fds()) == base


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_a_full_file_table_closes_our_handles_and_reads_on(tmp_path):
    writer = Store(tmp_path)
    for i in range(40):
        writer.write("latent", {f"k{i}": _entry(torch.full((3,), float(i)))})
    store = Store(tmp_path, max_open=1000)  # a bound above what the OS allows: EMFILE comes first
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used, limit, free = set(map(int, _fds())), 0, 0
    while free < 4:  # a limit that leaves four descriptors free
        free, limit = free + (limit not in used), limit + 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        for i in range(40):
            assert store.check("latent", f"k{i}") is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(store._open) < 40  # the limit was hit, and handled
    store.close()
