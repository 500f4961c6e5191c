"""Model families: FAMILIES is the only list of them. The stages never ask which family they run; no code
outside this folder names one (tests/test_structure.py), except the embedded default's.

A new family is one package here plus its name in FAMILIES:

- `<name>/adapter.py`: the family, a class on `base.FolderFamily` or `base.FlowMatchingFamily` implementing
  `base.Family` (what the cache and train stages need), exported as `FAMILY`. Its load_text_encoders goes
  through `base.text_encoder_loading` and `base.place_text_encoders` (model.text_encoder_quantize/_offload). Its methods are handed the
  denoiser's device and dtype and read its config from the model folder, never from the module, which
  may be wrapped (DDP, FSDP).
- `<name>/tiny.py`: its tiny random-weight model, `PRESETS` (with "default") and `build(path, preset, seed)`,
  from the shared parts in `tiny_parts.py`. tests/test_families.py runs the conformance suite on it.
- Its capabilities (`capabilities.py`), each one attribute of the family, None where it lacks it:
  - `planning` (`<name>/planning.py`): the memory planner's dry run, its public full-size configs (from
    `public_parts.py` where shared) and its rows of the memory table of docs/memory.md; without it plan-memory
    refuses the family and the memory table leaves it out.
  - `lora_layout` (`<name>/kohya.py`): the kohya/ComfyUI layout; without it train.lora_format = "kohya"
    is refused and the diffusers file keeps peft's names.
  - `sampling`: the diffusers pipeline that renders validation grids and `python -m pipeline sample`
    (`capabilities.PipelineSampling("<Pipeline class>")` where the cached conditioning goes in as it is).

This module is the registry alone: it imports no model library and nothing of the project, so the config
can check family names cheaply. Finding the family of a model folder is `load.py`'s.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = ("flux", "sdxl", "hidream", "flux2", "chroma", "qwenimage", "zimage")


def family_class(name: str) -> type:
    return importlib.import_module(f"pipeline.families.{name}.adapter").FAMILY


def tiny_module(name: str) -> ModuleType:
    """The family's tiny builder: PRESETS (name -> settings) and build(path, preset, seed)."""
    return importlib.import_module(f"pipeline.families.{name}.tiny")
