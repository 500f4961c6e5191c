"""The HDF5 segment store: round trips, bf16, atomic segments, and what a crash leaves behind."""

import os

import h5py
import torch

from pipeline.cache.store import Store


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
