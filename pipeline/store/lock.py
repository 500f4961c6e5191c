"""Advisory locks on a cache directory (flock; released by the kernel when a process dies, so a
crash never leaves a stale lock).

Segments are immutable and a cache run only adds new ones, so a cache run may go on while training
reads: training indexes the segments once at its start and never sees a half-written file. What must
not overlap:
  - two writers (two cache runs, or prune/repair): `.lock-write`, exclusive;
  - a writer that deletes (prune, repair) and a reader (training): `.lock-read`, shared by readers,
    exclusive for deleters;
  - training starting while a cache run is still writing what it needs: training checks `.lock-write`.
Every conflict refuses at once with a one-line message naming the other process; nothing waits.

A reader needs no write access: it opens an existing lock file read-only (flock works on any open file),
and where the lock file is missing and cannot be made (a read-only cache: a read-only mount, or a
folder the user may not write), it reads unlocked, since no cache run or prune can be writing a
folder nobody can write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def take(path: Path, exclusive: bool, refusal: str, job: str = ""):
    """Take the lock without waiting, or raise UserError(refusal + who holds it). A shared lock on a
    folder where the lock file cannot be made: None (see the module's docstring). job: who takes it, for
    another job's refusal (a job of several processes: rank 0 holds the lock for all of them)."""
    if not exclusive and not path.parent.is_dir():
        return None  # no cache there yet: nothing to read, and a reader must not create the folder
    try:
        fh = open(path) if not exclusive and path.is_file() else _create(path)
    except OSError as e:
        if e.errno not in UNWRITABLE:
            raise
        if exclusive:
            raise UserError(f"cannot write '{path.parent}' ({e.strerror}): this command writes there; make it "
                            "writable, or point the config at a folder you can write") from None
        return None
    try:
        fcntl.flock(fh, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UserError(f"{refusal} ({_holder(path)}); wait for it to finish, then run this again") from None
    if exclusive:  # say who holds it, for the message another process will print
        fh.seek(0)
        fh.truncate()
        fh.write(f"{job or f'pid {os.getpid()} on {socket.gethostname()}'}: {' '.join(sys.argv)[:200]}")
        fh.flush()
    return fh


def _create(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+")


@contextlib.contextmanager
def cache_lock(cache_dir: str | Path, mode: str, job: str = "") -> Iterator[None]:
    """mode: "write" (cache stage), "delete" (prune, repair) or "read" (training); job: who holds it
    (processes.job(); "": this process)."""
    root = Path(cache_dir)
    write_lock, read_lock = root / ".lock-write", root / ".lock-read"
    busy = f"cache directory '{root}' is busy:"
    held = []
    try:
        if mode in ("write", "delete"):
            held.append(take(write_lock, True, f"{busy} another cache run, prune or repair is writing it", job))
        if mode == "delete":
            held.append(take(read_lock, True, f"{busy} a training run is reading it", job))
        if mode == "read":
            # a cache run still writing may be computing entries this run needs: refuse rather than race
            writing = take(write_lock, False, f"{busy} a cache run is writing it")
            if writing is not None:
                writing.close()
            held.append(take(read_lock, False, f"{busy} a prune or repair is changing it"))
        yield
    finally:
        for fh in reversed([h for h in held if h is not None]):
            if mode != "read":  # clear our stamp so a later refusal never names a finished process
                fh.seek(0)
                fh.truncate()
            fh.close()
