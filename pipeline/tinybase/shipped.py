"""The shipped tiny base: where it is, what it is, and its copy into an [embedded] model folder.

The folder pipeline/tinybase/model is a normal diffusers folder (trained by `make tiny-base`); its
manifest, MANIFEST inside it, lists every other file's sha256, the recipe and the measured accuracy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from pipeline.config import EmbeddedConfig

FAMILY = EmbeddedConfig().family  # the embedded default's family
PRESET = "base"  # its tiny builder's preset with the base's architecture; [embedded] preset = "base"
MODEL = Path(__file__).with_name("model")
MANIFEST = "tiny-base.json"
MAX_SEQUENCE_LENGTH = 16  # text tokens per caption, as configs/tiny-flux.toml's model.max_sequence_length


def manifest(folder: Path = MODEL) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def mismatches(folder: Path = MODEL) -> list[str]:
    """The files whose sha256 is not the manifest's, or that are missing or not listed (empty: intact)."""
    folder = Path(folder)
    listed = manifest(folder)["sha256"]
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    bad = sorted(found ^ set(listed))
    return bad + [name for name in sorted(found & set(listed))
                  if hashlib.sha256((folder / name).read_bytes()).hexdigest() != listed[name]]


def copy_to(path: Path) -> None:
    """Copy the shipped base to `path` (a temporary sibling renamed into place: never a half folder)."""
    bad = mismatches()
    if bad:
        raise ValueError(f"the shipped tiny base '{MODEL}' is damaged ({', '.join(bad)} not as in its {MANIFEST})")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(MODEL, tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
