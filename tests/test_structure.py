"""The house's structure: a family is one package. No code outside `pipeline/families/` names a family
(in code, strings, docstrings or comments), except the embedded default's, which the config and the
demos name; a family lacking a capability is refused in one line that names what needed it."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import EmbeddedConfig
from pipeline.errors import UserError
from pipeline.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1] / "pipeline"
ALLOWED: set[str] = set()


def _spelled(name: str) -> re.Pattern:
    # the name in any case, as a word or inside an identifier (sdxl_tiny, SDXLFamily, HiDreamImagePipeline),
    # but not inside another word: no letter before it, and no lower-case letter after it (a family "wan"
    # must not be found in "swan" or "want", and must be in "WanPipeline")
    return re.compile(rf"(?<![A-Za-z])(?i:{re.escape(name)})(?![a-z])")


def test_no_family_is_named_outside_its_package():
    names = [n for n in FAMILIES if n != EmbeddedConfig().family]
    assert names, "the registry lists only the embedded default"
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("families/") or relative in ALLOWED:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"pipeline/{relative}:{number}: {line.strip()}" for n in names if _spelled(n).search(line)]
    assert not found, "family names outside pipeline/families/:\n" + "\n".join(found)


def test_the_pattern_finds_names_in_identifiers_and_not_in_other_words():
    pattern = _spelled("wan")
    assert all(pattern.search(t) for t in ["wan", "Wan's", "WanPipeline", "wan_tiny", "WAN2", "a Wan model"])
    assert not any(pattern.search(t) for t in ["swan", "want", "Wanted", "rowan"])


def test_a_family_without_a_capability_is_refused_in_one_line():
    import torch

    from pipeline.families.base import load_full_pipeline
    from pipeline.denoiser.lora import kohya_weights
    from pipeline.memory import activations

    bare = SimpleNamespace(name="bare", planning=None, lora_layout=None, sampling=None)
    calls = {"config key 'train.lora_format' = \"kohya\"": lambda: kohya_weights(None, bare, None),
             "plan-memory": lambda: activations(bare, {}, None, 1, 64, torch.float32, 0),
             "python -m pipeline sample": lambda: load_full_pipeline(bare, torch.device("cpu"), torch.float32)}
    for needed_by, call in calls.items():
        with pytest.raises(UserError) as e:
            call()
        assert needed_by in str(e.value) and "bare" in str(e.value) and "\n" not in str(e.value)
