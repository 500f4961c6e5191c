"""A content-addressed store of keyed arrays in HDF5 segment files. It knows nothing of models.

Layout: `<root>/segments/*.h5`. Each segment file holds entries of one kind (root attribute `kind`,
e.g. "latent", "text", "noise", "prior/bf16"); each entry is a top-level group named by its key, holding
datasets and attributes. A segment is written under a temporary name, flushed, fsynced and renamed into
place, so a file with a final name is always complete: a crash (kill -9, power loss) can only lose the
segment being written, never finished work. Segments are never modified after the rename, so readers
need no lock. The index is rebuilt at open by listing the segments; several processes can each write
their own segments into the same directory (file names carry the pid and a random part).

bfloat16 has no HDF5/numpy type: such arrays are stored as their raw uint16 bits, with the dataset
attribute `dtype = "bfloat16"`. Every dataset carries a `sha256` attribute of its bytes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.errors import UserError

Entry = tuple[dict[str, torch.Tensor], dict]  # (tensors by name, attributes)


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # np.array keeps 0-d scalars 0-d (ascontiguousarray would not)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.segments = self.root / "segments"
        self._index: dict[tuple[str, str], Path] = {}
        self._open: dict[Path, h5py.File] = {}
        self.unreadable: list[Path] = []
        self.refresh()

    # -- reading -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the index from the complete segment files on disk."""
        self.close()
        self._index.clear()
        self.unreadable = []
        if not self.segments.is_dir():
            return
        for path in sorted(p for p in self.segments.glob("*.h5") if not p.name.startswith(".")):
            try:
                with h5py.File(path, "r", locking=False) as f:
                    kind = f.attrs["kind"]
                    for key in f.keys():
                        self._index.setdefault((kind, key), path)
            except Exception:  # noqa: BLE001 - a foreign or damaged file must not stop the rest
                self.unreadable.append(path)

    def has(self, kind: str, key: str) -> bool:
        return (kind, key) in self._index

    def keys(self, kind: str) -> set[str]:
        return {k for (kd, k) in self._index if kd == kind}

    def kinds(self) -> set[str]:
        return {kd for (kd, _) in self._index}

    def _file(self, path: Path) -> h5py.File:
        f = self._open.get(path)
        if f is None:
            f = self._open[path] = h5py.File(path, "r", locking=False)
        return f

    def read(self, kind: str, key: str) -> Entry:
        path = self._index.get((kind, key))
        if path is None:
            raise KeyError(f"{kind}/{key}")
        try:
            group = self._file(path)[key]
            tensors = {n: from_numpy(d[()], d.attrs.get("dtype", "")) for n, d in group.items()}
            return tensors, dict(group.attrs)
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"cache file '{path}' is damaged ({e}): delete it and run make cache") from None

    def shape(self, kind: str, key: str, name: str) -> tuple[int, ...]:
        """A dataset's shape without reading its data."""
        return tuple(self._file(self._index[(kind, key)])[key][name].shape)

    def bytes_on_disk(self) -> int:
        if not self.segments.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.segments.glob("*.h5") if not p.name.startswith("."))

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    # -- writing -------------------------------------------------------------------------------
    def write(self, kind: str, entries: dict[str, Entry]) -> Path | None:
        """Write entries as one new segment, atomically. Returns its path (None when empty)."""
        if not entries:
            return None
        self.segments.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        tag = f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp = self.segments / f".tmp.{os.getpid()}.{tag}.h5"
        final = self.segments / f"{kind.replace('/', '-')}.{tag}.h5"
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                f.attrs["kind"] = kind
                for key, (tensors, attrs) in entries.items():
                    group = f.create_group(key)
                    for name, value in attrs.items():
                        group.attrs[name] = value
                    for name, tensor in tensors.items():
                        array, dtype = to_numpy(tensor)
                        ds = group.create_dataset(name, data=array)
                        ds.attrs["dtype"] = dtype
                        ds.attrs["sha256"] = hashlib.sha256(array.tobytes()).hexdigest()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.segments)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for key in entries:
            self._index.setdefault((kind, key), final)
        return final

    def _remove_stale_temporaries(self) -> None:
        # A temporary whose writer is gone is a segment that was never finished; its entries were
        # never in the index, so removing it loses nothing.
        for tmp in self.segments.glob(".tmp.*.h5"):
            pid = int(tmp.name.split(".")[2]) if tmp.name.split(".")[2].isdigit() else -1
            if pid != os.getpid() and not _pid_alive(pid):
                tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
