"""Writes that matter are atomic: the file is written under a temporary name beside its final one and
renamed into place, so a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """The temporary to write `path` through (`.name.pid` + suffix: a writer's own, and named so that a
    later run can tell a dead writer's leftover); renamed over `path` when the block ends, and removed
    when it fails (a full disk leaves nothing behind)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
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
