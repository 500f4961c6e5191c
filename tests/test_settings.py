"""Resolve and refuse once (pipeline/settings.py): every refusal that combines keys, or a key with the model
family, the machine or the launcher, comes from `resolve` as one line, before any model loads or any cache
work: a min-SNR weighting on a flow model no longer passes the config check, caches, loads the model and
fails at the first step."""

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.families import family_class
from pipeline.families.base import FolderFamily
from pipeline.settings import resolve

from conftest import configure


def _nothing_loads(monkeypatch):
    """Any model load fails the test: a refusal must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    for name in ("load_vae", "load_text_encoders", "load_denoiser"):
        monkeypatch.setattr(FolderFamily, name, refuse)


def test_resolve_gives_the_devices_dtypes_numerics_and_processes(project):
    _, cfg = project(dtype="fp32")
    s = resolve(cfg, "train")
    assert s.family.name == "flux" and s.processes == "one"
    assert s.device == torch.device("cpu") and s.dtype == torch.float32 and s.encoder_dtype == torch.float32
    assert s.numerics["device"] == "cpu" and s.prior_device == torch.device("cpu")


@pytest.mark.parametrize("tables, words", [
    ({"train": {"loss_weighting": "min_snr"}}, ["train.loss_weighting", "none, sigma_sqrt, cosmap", "flux"]),
    ({"train": {"lora_format": "kohya"}, "lora": {"use_dora": True}}, ["train.lora_format", "DoRA"]),
    ({"optimizer": {"name": "adamw8bit"}}, ["adamw8bit", "CUDA"]),
    ({"data": {"resolution": 72}}, ["data.resolution", "multiple of 16"]),
    ({"data": {"resolution": None, "resolutions": [64, 72]}}, ["data.resolutions", "multiples of 16", "72"]),
])
def test_cross_key_refusals_come_before_any_model_or_cache_work(project, monkeypatch, tables, words):
    path, _ = project()
    cfg = configure(path, **tables)
    _nothing_loads(monkeypatch)
    with pytest.raises(UserError) as e:
        resolve(cfg, "cache")
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    for stage in ("cache", "train"):
        r = CliRunner().invoke(main, [stage, "--config", str(path)])
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and all(w in r.stderr for w in words), r.stderr
    assert not (project.root / "cache" / "segments").exists()  # nothing was cached


def test_a_flow_models_keys_on_another_family_are_refused_by_resolve(project, tiny_family_model):
    path, _ = project(model=tiny_family_model("sdxl"))
    for tables, key in (({"cache": {"shift": 3.0}}, "cache.shift"), ({"train": {"blocks_to_swap": 2}}, "train.blocks_to_swap"),
                        ({"train": {"loss_weighting": "cosmap"}}, "train.loss_weighting")):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            resolve(configure(path, **tables), "train")
        configure(path, cache={"shift": 0.0}, train={"blocks_to_swap": 0, "loss_weighting": "none"})


def test_under_a_launcher_the_process_setup_is_chosen_once(project, monkeypatch):
    path, _ = project()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve(configure(path), "cache").processes == "ddp"
    assert resolve(configure(path, train={"fsdp": True}), "train").processes == "fsdp"
    assert resolve(configure(path, train={"fsdp": True}), "cache").processes == "ddp"  # priors: the whole model
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an accelerate config's distributed_type FSDP
    assert resolve(configure(path, train={"fsdp": False}), "train").processes == "fsdp"
    with pytest.raises(UserError, match="'train.fsdp' works with optimizer.name"):
        resolve(configure(path, optimizer={"name": "prodigy"}), "train")
    with pytest.raises(UserError, match="'train.fsdp' works with train.ema = false only"):
        resolve(configure(path, optimizer={"name": "adamw"}, train={"ema": True}), "train")
    configure(path, train={"ema": False})
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="'train.device' is 'cuda:1', but 2 processes each need their own GPU"):
        resolve(configure(path, optimizer={"name": "adamw"}, train={"device": "cuda:1"}), "train")


def test_a_family_without_a_capability_a_key_needs_is_refused_by_resolve(project, monkeypatch):
    path, _ = project()
    flux = family_class("flux")
    monkeypatch.setattr(flux, "lora_layout", None)
    monkeypatch.setattr(flux, "sampling", None)
    resolve(configure(path), "train")  # neither key asks for them
    with pytest.raises(UserError, match="'train.lora_format' = \"kohya\": the flux family has no"):
        resolve(configure(path, train={"lora_format": "kohya"}), "train")
    configure(path, train={"lora_format": "diffusers"})
    path.write_text(path.read_text() + '[validation]\nprompts = ["a teapot"]\n')
    with pytest.raises(UserError, match="'validation.prompts': the flux family has no"):
        resolve(load_config(path), "train")
