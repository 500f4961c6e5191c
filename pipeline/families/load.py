"""Which family a model is: a local diffusers folder (or a hub id resolved to its snapshot), its family
detected from model_index.json, and the family object over it."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import HUB_ID, ModelConfig
from pipeline.errors import UserError
from pipeline.families import FAMILIES, family_class
from pipeline.families.base import Family


def resolve_model(path: str) -> Path:
    """A local folder, or a hub id resolved to its downloaded snapshot (downloaded when the hub answers)."""
    local = Path(path)
    if local.exists():
        return local
    if not HUB_ID.match(path):
        raise UserError(f"model.path: '{path}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local hub cache; try the hub itself
        pass
    try:
        return Path(snapshot_download(path))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: all end here
        raise UserError(
            f"model.path: '{path}' is neither a local folder (relative to the config file) nor a hub model that "
            f"could be fetched ({type(e).__name__}): download it first (hf download {path} --local-dir DIR) "
            f"and set model.path = \"DIR\""
        ) from None


def detect_family(root: Path) -> str:
    index = root / "model_index.json"
    if not index.is_file():
        raise UserError(f"model.path: '{root}' is not a diffusers folder (no model_index.json)")
    cls = json.loads(index.read_text()).get("_class_name", "")
    for name in FAMILIES:
        if cls in family_class(name).pipeline_classes:
            return name
    raise UserError(f"model.path: '{root}' holds a {cls}, which no family here handles ({', '.join(FAMILIES)})")


def get_family(cfg: ModelConfig) -> Family:
    root = resolve_model(cfg.path)
    name = detect_family(root) if cfg.family == "auto" else cfg.family
    if name not in FAMILIES:
        raise UserError(f"config key 'model.family' must be auto or one of {', '.join(FAMILIES)}, got {name!r}")
    return family_class(name)(root, cfg)
