"""Cache keys, weight fingerprints and the deterministic seed recipe.

Every key is a digest of everything that changes the entry, so a stale entry is never found: it simply
has another key. The recipes are documented in docs/cache-format.md ("Keys") so a user can recompute them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.atomic import replacing

CHUNK = 1 << 22


def digest(*parts) -> str:
    """Key of an entry: sha256 of the JSON list of its parts, first 32 hex digits."""
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def derive_seed(*parts) -> int:
    """A 63-bit seed: the first 8 bytes (big-endian) of sha256 of the JSON list of parts, top bit cleared."""
    text = json.dumps(list(parts), sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & (2**63 - 1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Fingerprints:
    """sha256 of files, remembered by (path, size, mtime, inode) in a JSON memo so that a 20 GB
    checkpoint is read once, not on every run. The memo only saves time; deleting it is safe."""

    def __init__(self, memo_path: Path):
        self.memo_path = Path(memo_path)
        try:
            self.memo = json.loads(self.memo_path.read_text())
        except (OSError, ValueError):  # missing or damaged: rebuilt as files are hashed again
            self.memo = {}
        if not isinstance(self.memo, dict):
            self.memo = {}
        self.dirty = False

    def file(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.memo.get(str(path.resolve()))
        if isinstance(hit, list) and len(hit) == 2 and hit[0] == stamp and isinstance(hit[1], str):
            return hit[1]
        found = sha256_file(path)
        self.memo[str(path.resolve())] = [stamp, found]
        self.dirty = True
        return found

    def folder(self, folder: Path) -> str:
        """Fingerprint of a model component folder: its config and weight files' contents, not its path."""
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(folder)
        return digest([[str(p.relative_to(folder)), self.file(p)] for p in files])

    def save(self) -> None:
        # only into a cache folder that exists: a command that reads (cache status) must not create one,
        # and the cache stage has created it, taking its lock, before it plans
        if not self.dirty or not self.memo_path.parent.is_dir():
            return
        try:
            with replacing(self.memo_path) as tmp:
                tmp.write_text(json.dumps(self.memo, indent=0))
        except OSError:  # a read-only or full cache folder: the memo only saves time, so go on without it
            pass
        self.dirty = False
