"""Model families: FAMILIES is the only list of them. The stages never ask which family they run; no code
outside this folder names one (tests/test_structure.py), except the embedded default's.

A new family is one package here plus its name in FAMILIES:

- `<name>/adapter.py`: the family, a class on `base.FolderFamily` or `base.FlowMatchingFamily` implementing
  `base.Family` (what the cache and train stages need), exported as `FAMILY`. Its methods are handed the
  denoiser's device and dtype and read its config from the model folder, never from the module, which
  may be wrapped (DDP, FSDP).
- `<name>/tiny.py`: its tiny random-weight model, `PRESETS` (with "default") and `build(path, preset, seed)`,
  from the shared parts in `tiny_parts.py`. tests/test_families.py runs the conformance suite on it.
- Its capabilities (`capabilities.py`), each one attribute of the family, None where it lacks it:
  - `planning` (`<name>/planning.py`): the memory planner's dry run, its public full-size configs (from
    `public_parts.py` where shared) and its rows of the README's memory table; without it plan-memory
    refuses the family and the memory table leaves it out.
  - `lora_layout` (`<name>/kohya.py`): the kohya/ComfyUI layout; without it train.lora_format = "kohya"
    is refused and the diffusers file keeps peft's names.
  - `sampling`: the diffusers pipeline that renders validation grids and `python -m pipeline sample`
    (`capabilities.PipelineSampling("<Pipeline class>")` where the cached conditioning goes in as it is).

This module imports no model library, so the config can check family names cheaply.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.config import HUB_ID, ModelConfig
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.families.base import Family

FAMILIES = ("flux", "sdxl", "hidream")


def family_class(name: str) -> type:
    return importlib.import_module(f"pipeline.families.{name}.adapter").FAMILY


def tiny_module(name: str) -> ModuleType:
    """The family's tiny builder: PRESETS (name -> settings) and build(path, preset, seed)."""
    return importlib.import_module(f"pipeline.families.{name}.tiny")


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
