"""Shared fixtures: the tiny Flux model is built once per session; each test gets its own copy of the
synthetic images, its own cache directory and a config writer.

Tests come in three tiers, run in this order: unit tests (unmarked: no stage runs end to end; `make
test-fast` runs only these), `e2e` (a stage runs in this process) and `slow` (a subprocess runs the CLI,
is interrupted or killed); then `ui` (the web UI driven in headless Chromium). `make test` runs them all."""

import os

# Under pytest-xdist (make test runs one worker per core): one torch thread per worker, and for the
# processes a test starts, so that workers do not fight over the cores. Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import shutil
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from diffusers import FluxTransformer2DModel

from pipeline import tiny
from pipeline.config import load_config
from pipeline.families import FAMILIES, tiny_module
from pipeline.families.flux import tiny as flux_tiny

CPU32 = {"device": torch.device("cpu"), "dtype": torch.float32}  # where the tests run a family's forward

TEMPLATE = """
[model]
path = "{model}"
max_sequence_length = 32
guidance = {guidance}

[data]
resolution = {resolution}

[[concepts]]
folder = "{data}/standard"

[[concepts]]
folder = "{data}/prior"
type = "prior"

[cache]
dir = "{cache}"
variants = {variants}
batch_size = {cache_batch}
segment_mb = {segment_mb}
seed = {cache_seed}
timestep_sampling = "{timestep_sampling}"
logit_mean = {logit_mean}

[lora]
rank = {rank}
alpha = {alpha}

[optimizer]
lr = {lr}

[train]
dtype = "{dtype}"
batch_size = {batch}
epochs = {epochs}
max_steps = {max_steps}
output_dir = "{out}"
prior_mode = "{prior_mode}"
"""


def pytest_collection_modifyitems(items):
    # unit tests first, so a broken basic fails fast; the sort is stable, so files keep their order
    tier = lambda item: (3 if item.get_closest_marker("ui") else 2 if item.get_closest_marker("slow")  # noqa: E731
                         else 1 if item.get_closest_marker("e2e") else 0)
    items.sort(key=tier)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    flux_tiny.build(root / "model")
    tiny.build_synthetic_concepts(root / "data")
    return root


@pytest.fixture(scope="session")
def tiny_schnell(tiny_family_model):
    """The tiny model in FLUX.1-schnell's layout (no guidance embedding); pass it as project(model=...)."""
    return tiny_family_model("flux-schnell")


@pytest.fixture
def project(tiny_assets, tmp_path):
    """A writable copy of the data, and `write(**overrides) -> (config path, Config)`."""
    shutil.copytree(tiny_assets / "data", tmp_path / "data")

    def write(name="config.toml", **overrides):
        values = dict(
            model=tiny_assets / "model", data=tmp_path / "data", cache=tmp_path / "cache", out=tmp_path / "out",
            variants=2, cache_batch=4, segment_mb=256, lr=1e-3, alpha=4.0, rank=4, guidance=1.0, resolution=64, cache_seed=0,
            timestep_sampling="logit_normal", logit_mean=0.0, dtype="bf16", batch=2, epochs=1, max_steps=0, prior_mode="cached",
        )
        values.update(overrides)
        path = Path(tmp_path / name)
        path.write_text(TEMPLATE.format(**values))
        return path, load_config(path)

    write.root = tmp_path
    return write


def configure(path, **tables):
    """Add keys to tables of a written config: configure(path, train={"x": 1}); a key given as None is removed."""
    out, table = [], None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            table = line.strip("[] ")
            out.append(line)
            out += [f"{k} = {json.dumps(v)}" for k, v in tables.get(table, {}).items() if v is not None]
        elif not (table in tables and line.split("=")[0].strip() in tables[table]):
            out.append(line)  # a key given anew replaces the template's
    path.write_text("\n".join(out) + "\n")
    return load_config(path)


# every family's tiny model, and each further layout its builder offers ("bench" is for timings only; "base"
# is the trained tiny base's architecture, the default's code path at other widths: test_tinybase.py):
# the models the conformance suite (test_families.py) runs on
TINY_MODELS = [name if preset == "default" else f"{name}-{preset}"
               for name in FAMILIES for preset in tiny_module(name).PRESETS if preset not in ("bench", "base")]


@pytest.fixture(scope="session")
def tiny_family_model(tiny_assets, tmp_path_factory):
    """"family" or "family-preset" -> the folder of its tiny model, built once per session on first use."""
    built = {"flux": tiny_assets / "model"}

    def get(name):
        if name not in built:
            built[name] = tmp_path_factory.mktemp(f"tiny-{name}") / "model"
            family, _, preset = name.partition("-")
            tiny_module(family).build(built[name], preset or "default")
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_flux_double_only(tiny_assets, tmp_path_factory):
    """The tiny model without single blocks. diffusers' kohya converter splits a single block's linear1 at
    FLUX.1's widths (3 x 3072 + 12288), so only a real-size model's single blocks load from kohya's layout;
    test_kohya_layout_at_flux1_widths covers them."""
    root = tmp_path_factory.mktemp("double-only") / "model"
    shutil.copytree(tiny_assets / "model", root)
    config = FluxTransformer2DModel.load_config(root / "transformer")
    torch.manual_seed(0)
    FluxTransformer2DModel.from_config({**config, "num_single_layers": 0}).save_pretrained(root / "transformer")
    return root
