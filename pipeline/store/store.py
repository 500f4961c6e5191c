"""A content-addressed store of keyed arrays in HDF5 segment files. It knows nothing of models.

Layout: `<root>/segments/*.h5`. Each segment file holds entries of one kind (root attribute `kind`,
e.g. "latent", "text", "noise", "prior/bf16"); each entry is a top-level group named by its key, holding
datasets and attributes. A segment is written under a temporary name, flushed, fsynced and renamed into
place, so a file with a final name is always complete: a crash (kill -9, power loss) can only lose the
segment being written, never finished work. Segments are never modified after the rename, so readers
need no lock. The index is rebuilt at open by listing the segments; several processes can each write
their own segments into the same directory (file names carry the pid and a random part; a temporary's
name also carries the host, so that no machine removes another's temporary that is still being written).

bfloat16 has no HDF5/numpy type: such arrays are stored as their raw uint16 bits, with the dataset
attribute `dtype = "bfloat16"`. Every dataset carries a `sha256` attribute of its bytes.

Removing entries (`drop`) keeps segments immutable: a segment holding a dropped entry is replaced by a new
segment with the entries it keeps, copied verbatim, and is unlinked only after the new one is in place.
A crash in between leaves a key in two complete segments, which readers tolerate (the first one wins).

Open files are bounded: at most `max_open` segments are held open for reading (least recently used
ones are closed), so a cache of thousands of segments works under a small `ulimit -n`. An error the
operating system reports (an errno: the open-file limit, permissions, a read-only, full or failing disk)
says nothing about a file's bytes, so it is raised as AccessError and never counted as damage: only a
checksum mismatch or a file that is not a segment of ours (not HDF5, truncated, no `kind`) is damage.

Reading is safe from several threads (training reads the next step's batches in a background thread while
validation reads in the main one): the set of open handles is guarded by one lock, held for a whole read so
that no thread closes a handle another is reading from. h5py serialises its calls anyway, so the lock costs
nothing a second thread could have gained. Writing and removing are for one thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import resource
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.atomic import HOST, pid_alive, writer_gone, writer_tag  # noqa: F401 (re-exported)
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


MAX_OPEN = 64  # segment files held open for reading, at most (fewer under a low open-file limit)
# HDF5's metadata cache per open file, fixed. Its adaptive default grows towards 32 MiB, and the process
# by several times that, for each file in which a verify or a training epoch visits thousands of entries.
METADATA_CACHE = 4 * 2**20

# What to do about each errno the OS may give; any other errno is an environmental error too.
_HINTS = {
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
    errno.ENFILE: "the system's open-file table is full: close other programs",
    errno.EACCES: "check the permissions of the file and its folder",
    errno.EPERM: "check the permissions of the file and its folder",
    errno.EROFS: "the filesystem is mounted read-only",
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "the disk quota is exhausted: free space",
    # an I/O error is the disk's or filesystem's verdict, not the bytes': removing files on a failing disk
    # and rewriting them onto it helps nothing, and on network filesystems EIO is often transient
    errno.EIO: "the disk or filesystem reported an I/O error: check it (e.g. dmesg)",
    errno.ENOENT: "another process removed it after this one indexed the cache",
}


class DamagedEntry(UserError):
    """An entry whose bytes no longer match their checksum."""


class AccessError(UserError):
    """The OS refused a cache file. Not damage: nothing is deleted because of it."""

    def __init__(self, message: str, path: Path, errno_: int):
        super().__init__(message)
        self.path, self.errno = path, errno_

    def __reduce__(self):  # rebuilt whole where the prefetch worker's error is raised (pickle passes only args)
        return type(self), (str(self), self.path, self.errno)


def os_errno(e: BaseException) -> int | None:
    """The errno of an error the operating system reported, else None. h5py sets it when a system call
    failed (open, read, write) and leaves it None for a file that is not HDF5 or is truncated; some HDF5
    messages carry it only in their text ("errno = 5")."""
    if not isinstance(e, OSError):
        return None
    if e.errno is not None:
        return e.errno
    found = re.search(r"errno = (\d+)", str(e))
    return int(found.group(1)) if found and int(found.group(1)) else None


def access_error(path: Path, e: OSError, doing: str = "read cache file") -> AccessError:
    n = os_errno(e)
    name = errno.errorcode.get(n, f"errno {n}")
    hint = _HINTS.get(n, "fix that")
    return AccessError(f"cannot {doing} '{path}': {os.strerror(n)} ({name}); {hint}, then run the same command "
                       f"again. This is not damage: no cache file is removed for it", path, n)


def _default_max_open() -> int:
    # a quarter of the soft limit leaves the rest to torch, the model files and the OS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_OPEN if soft == resource.RLIM_INFINITY else max(1, min(MAX_OPEN, soft // 4))


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Reading an entry of `path`: the system's refusal (an errno) is an AccessError, anything else damage."""
    try:
        yield
    except AccessError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        if os_errno(e):
            raise access_error(path, e) from None
        raise UserError(f"cache file '{path}' is damaged ({e}): run `python -m pipeline cache verify --repair` with "
                        "this config, which removes the file and recomputes what this config used of it") from None


class Store:
    def __init__(self, root: str | Path, max_open: int | None = None):
        self.root = Path(root)
        self.segments = self.root / "segments"
        self.max_open = max_open or _default_max_open()
        self._index: dict[tuple[str, str], Path] = {}
        self._segs: dict[Path, tuple[str, list[str]]] = {}  # segment -> (kind, its keys)
        self._open: OrderedDict[Path, h5py.File] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()  # over _open and every read through it (see the module docstring)
        self.unreadable: list[Path] = []  # files with a final name that are not segments of ours
        self.refresh()

    # -- reading -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rebuild the index from the complete segment files on disk. Each file is closed again at once,
        so indexing any number of segments holds at most one open. Raises AccessError when the OS
        refuses a file: counting it unreadable would let prune and repair delete a healthy file."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        self.close()
        self._index.clear()
        self._segs.clear()
        self.unreadable = []
        if not self.segments.is_dir():
            return
        for path in sorted(p for p in self.segments.glob("*.h5") if not p.name.startswith(".")):
            try:
                with self._h5(path) as f:
                    kind = str(f.attrs["kind"])
                    self._segs[path] = (kind, list(f.keys()))
            except AccessError as e:
                if e.errno == errno.ENOENT:
                    continue  # removed since the listing (a prune replacing it): it is simply not there
                raise
            except Exception as e:  # noqa: BLE001 - a foreign or damaged file must not stop the rest
                if os_errno(e):
                    raise access_error(path, e) from None
                self.unreadable.append(path)
                continue
            for key in self._segs[path][1]:
                self._index.setdefault((kind, key), path)

    def has(self, kind: str, key: str) -> bool:
        return (kind, key) in self._index

    def keys(self, kind: str) -> set[str]:
        return {k for (kd, k) in self._index if kd == kind}

    def kinds(self) -> set[str]:
        return {kd for (kd, _) in self._index}

    def segment_of(self, kind: str, key: str) -> Path | None:
        """The segment an entry is read from (a key in several segments is read from the first)."""
        return self._index.get((kind, key))

    def segments_by_kind(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for path, (kind, _) in self._segs.items():
            out.setdefault(kind, []).append(path)
        return out

    def _h5(self, path: Path) -> h5py.File:
        """Open a segment for reading. AccessError when the OS refuses; OSError when it is not ours."""
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as e:
            if os_errno(e) in (errno.EMFILE, errno.ENFILE) and self._open:
                self.close()  # our own handles may be what fills the table: let them go, try once more
                return self._h5(path)
            if os_errno(e):
                raise access_error(path, e) from None
            raise
        _fix_metadata_cache(f)
        return f

    def _file(self, path: Path) -> h5py.File:
        """The open handle of a segment, through a least-recently-used set of at most max_open."""
        f = self._open.get(path)
        if f is not None:
            self._open.move_to_end(path)
            return f
        f = self._h5(path)
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1].close()
        self._open[path] = f
        return f

    def read(self, kind: str, key: str) -> Entry:
        """An entry's tensors and attributes, each dataset checked against the sha256 it was written with:
        nothing damaged on disk since (a flipped bit, bytes written into it) is ever returned. A mismatch is
        DamagedEntry, naming the file and the entry."""
        path = self._index.get((kind, key))
        if path is None:
            raise KeyError(f"{kind}/{key}")
        with self._lock, _reading(path):
            group = self._file(path)[key]
            raw = {n: (np.asarray(d[()]), d.attrs.get("dtype", ""), d.attrs.get("sha256")) for n, d in group.items()}
            attrs = dict(group.attrs)
        # hashed outside the lock (hashlib lets go of the GIL): another thread's read need not wait for it
        for name, (array, _, sha) in raw.items():
            if hashlib.sha256(array.tobytes() if not array.flags.c_contiguous else array).hexdigest() != sha:
                raise DamagedEntry(f"cache entry {kind}/{key} in '{path}' is damaged (dataset '{name}' does not match "
                                   "its sha256): nothing was computed from it; run `python -m pipeline cache verify "
                                   "--repair` with this config, which recomputes exactly the damaged entries")
        return {n: from_numpy(a, dtype) for n, (a, dtype, _) in raw.items()}, attrs

    def attrs(self, kind: str, key: str) -> dict:
        """An entry's attributes, without reading its datasets."""
        path = self._index[(kind, key)]
        with self._lock, _reading(path):
            return dict(self._file(path)[key].attrs)

    def check(self, kind: str, key: str) -> str | None:
        """None when every dataset of the entry reads back with the sha256 it was written with, else
        why not. The hash is over the stored numpy bytes (bf16 as uint16 bits), exactly as `write` made it."""
        path = self._index.get((kind, key))
        if path is None:
            return "missing"
        try:
            with self._lock:
                for name, ds in self._file(path)[key].items():
                    raw = np.asarray(ds[()]).tobytes()
                    if hashlib.sha256(raw).hexdigest() != ds.attrs.get("sha256"):
                        return f"sha256 mismatch in dataset '{name}'"
        except AccessError:
            raise
        except Exception as e:  # noqa: BLE001 - a read failure the OS did not report: the file is broken
            if os_errno(e):
                raise access_error(path, e) from None
            return f"read error: {e}"
        return None

    def layout(self, kind: str, key: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each dataset's (shape, stored dtype name) without reading its data."""
        path = self._index[(kind, key)]
        with self._lock, _reading(path):
            return {n: (tuple(d.shape), str(d.attrs.get("dtype", d.dtype))) for n, d in self._file(path)[key].items()}

    def shape(self, kind: str, key: str, name: str) -> tuple[int, ...]:
        """A dataset's shape without reading its data."""
        with self._lock:
            return tuple(self._file(self._index[(kind, key)])[key][name].shape)

    def bytes_on_disk(self) -> int:
        if not self.segments.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.segments.glob("*.h5") if not p.name.startswith("."))

    def release(self, path: Path) -> None:
        """Close a segment's handle now (a reader done with that file)."""
        with self._lock:
            f = self._open.pop(path, None)
            if f is not None:
                f.close()

    def forget_handles(self) -> None:
        """In a forked process: leave the parent's open files alone (they are the parent's, and HDF5's state
        of them is not this process's to use) and open its own from here on. The index stays."""
        self._inherited = list(self._open.values())  # kept, never used: nothing here touches the parent's
        self._open = OrderedDict()
        self._lock = threading.RLock()  # a lock the parent held while forking would stay held here

    def close(self) -> None:
        with self._lock:
            for f in self._open.values():
                f.close()
            self._open.clear()

    # -- writing -------------------------------------------------------------------------------
    def write(self, kind: str, entries: dict[str, Entry]) -> Path | None:
        """Write entries as one new segment, atomically. Returns its path (None when empty)."""
        if not entries:
            return None

        def fill(f: h5py.File) -> None:
            for key, (tensors, attrs) in entries.items():
                group = f.create_group(key)
                for name, value in attrs.items():
                    group.attrs[name] = value
                for name, tensor in tensors.items():
                    array, dtype = to_numpy(tensor)
                    ds = group.create_dataset(name, data=array)
                    ds.attrs["dtype"] = dtype
                    ds.attrs["sha256"] = hashlib.sha256(array.tobytes()).hexdigest()

        final = self._write_segment(kind, fill)
        self._segs[final] = (kind, list(entries))
        for key in entries:
            self._index.setdefault((kind, key), final)
        return final

    def _write_segment(self, kind: str, fill) -> Path:
        """Create a segment under a temporary name, let `fill` write it, fsync, rename into place."""
        self.segments.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        tag = f"{time.time_ns()}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp = self.segments / f".tmp.{writer_tag()}.{tag}.h5"
        final = self.segments / f"{kind.replace('/', '-')}.{tag}.h5"
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                f.attrs["kind"] = kind
                fill(f)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.segments)
        except BaseException:
            with contextlib.suppress(OSError):  # e.g. a read-only disk: the error that got us here says more
                tmp.unlink(missing_ok=True)
            raise
        return final

    def drop(self, kind: str, keys, dry_run: bool = False) -> dict:
        """Remove these entries of one kind from every segment holding them. A segment that keeps some
        entries is first rewritten (kept entries copied verbatim, stale checksums included, so damage
        stays visible) and only then unlinked: a crash never loses a kept entry. Kept entries that cannot
        be copied were unreadable already; they are reported as `lost`. Returns counts and bytes."""
        drop = set(keys)
        hit = [p for p, (kd, ks) in self._segs.items() if kd == kind and drop & set(ks)]
        # a key also held by an untouched segment need not be copied again (crash leftovers)
        elsewhere = {k for p, (kd, ks) in self._segs.items() if kd == kind and p not in hit for k in ks}
        present = {k for p in hit for k in self._segs[p][1]} & drop
        out = {"removed": len(present), "lost": [], "segments_rewritten": 0, "segments_removed": 0, "estimate": 0}
        for path in hit:
            seg_keys = self._segs[path][1]
            gone = [k for k in seg_keys if k in drop]
            keep = [k for k in dict.fromkeys(seg_keys) if k not in drop and k not in elsewhere]
            out["estimate"] += path.stat().st_size if not keep else self._stored_bytes(path, gone)
            if dry_run:
                continue
            self.close()  # h5py must not hold the file we are about to replace
            if keep:
                copied: list[str] = []

                def fill(f, path=path, keep=keep, copied=copied):
                    with self._h5(path) as src:
                        for k in keep:
                            try:
                                src.copy(src[k], f, name=k)
                                copied.append(k)
                            except Exception as e:  # noqa: BLE001 - unreadable: nothing usable to keep
                                if os_errno(e):  # but a refusal of the OS is no reason to give it up
                                    raise access_error(path, e) from None
                                out["lost"].append(k)
                                if k in f:  # a half-copied group
                                    del f[k]

                try:
                    self._write_segment(kind, fill)
                except OSError as e:  # the replacement could not be written: the old segment stays
                    if not os_errno(e):
                        raise
                    raise access_error(self.segments, e, "write a segment in") from None
                elsewhere.update(copied)
                out["segments_rewritten"] += 1
            else:
                out["segments_removed"] += 1
            path.unlink(missing_ok=True)
        if not dry_run and hit:
            _fsync_dir(self.segments)
            self.refresh()
        return out

    def remove_unreadable(self, dry_run: bool = False) -> int:
        """Delete segment files that cannot be opened at all (they hold nothing usable). Returns bytes."""
        size = sum(p.stat().st_size for p in self.unreadable if p.exists())
        if not dry_run:
            for p in self.unreadable:
                p.unlink(missing_ok=True)
            self.unreadable = []
        return size

    def _stored_bytes(self, path: Path, keys: list[str]) -> int:
        """Bytes the datasets of these entries take in a segment: the estimate of what dropping them frees."""
        try:
            with self._h5(path) as f:
                return sum(ds.id.get_storage_size() for k in keys for ds in f[k].values())
        except AccessError:
            raise
        except Exception:  # noqa: BLE001 - an estimate only
            return 0

    def _remove_stale_temporaries(self) -> None:
        # A temporary whose writer is gone is a segment that was never finished; its entries were
        # never in the index, so removing it loses nothing.
        for tmp in self.segments.glob(".tmp.*.h5"):
            if writer_gone(tmp.name.split(".")[2]):
                tmp.unlink(missing_ok=True)


def _fix_metadata_cache(f: h5py.File) -> None:
    config = f.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = config.min_size = config.max_size = METADATA_CACHE
    config.incr_mode = config.flash_incr_mode = config.decr_mode = 0  # H5C_*_off: the size stays put
    f.id.set_mdc_config(config)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
