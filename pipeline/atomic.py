"""Writes that matter are atomic: the file is written under a temporary name beside its final one and
renamed into place, so a reader sees the old file or the whole new one, never half of one. A temporary's
name says who writes it (pid and host), so that a later run removes only what a dead writer left."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"  # no dots or dashes: safe in file names


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_tag() -> str:
    """Who writes a temporary, for its file name: pid and host. Several machines may write into one cache (a
    network filesystem), and a pid says nothing about a process on another machine."""
    return f"{os.getpid()}@{HOST}"


def writer_gone(tag: str) -> bool:
    """Whether the process named in a temporary's file name (`pid@host`, or a bare pid from before hosts were
    named) is gone, so that what it left half-written can be removed: never our own, never a live one, never
    one on another machine (it cannot be asked), and nothing when the name has no pid."""
    pid, _, host = tag.partition("@")
    if host and host != HOST:
        return False
    return pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """The temporary to write `path` through (`.name.pid@host` + suffix: a writer's own, and named so that
    a later run can tell a dead writer's leftover); renamed over `path` when the block ends, and removed
    when it fails (a full disk leaves nothing behind)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{writer_tag()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:  # a full disk: name the file the user knows, not our temporary
        if e.filename not in (str(tmp), tmp):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        with contextlib.suppress(OSError):  # on a read-only folder, even removing a file that is not there fails
            tmp.unlink(missing_ok=True)
