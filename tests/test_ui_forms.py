"""The UI's project layer (pipeline/ui/project.py), without a browser: a form saved into the config file
keeps the file's comments and is what load_config reads; a refused one is the CLI's one-line message with
the config key it names, and the file is left byte for byte; captions are written beside their image."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.ui import project, runs


def _project(tiny_assets, tmp_path):
    shutil.copytree(tiny_assets / "data", tmp_path / "data")
    path = project.new_project(tmp_path, "teapot", str(tiny_assets / "model"), str(tmp_path / "data/standard"))
    return path


def test_a_new_project_is_a_config_the_cli_loads(tiny_assets, tmp_path):
    path = _project(tiny_assets, tmp_path)
    cfg = load_config(path)
    assert cfg.model.path == str(tiny_assets / "model") and [c.type for c in cfg.concepts] == ["standard"]
    assert project.family(path) == "flux"
    with pytest.raises(UserError, match="exists already"):
        project.new_project(tmp_path, "teapot", str(tiny_assets / "model"), str(tmp_path / "data/standard"))


def test_settings_and_concepts_are_written_keeping_comments(tiny_assets, tmp_path):
    path = _project(tiny_assets, tmp_path)
    doc = project.read(path)
    project.add_concept(doc, str(tmp_path / "data/prior"), "prior", "2", "0.5")
    project.add_concept(doc, str(tmp_path / "data/heldout-prior"), "validation-prior", "1", "1")
    project.apply_settings(doc, {"model.path": str(tiny_assets / "model"), "optimizer.lr": "0.002", "lora.rank": "8",
                                 "validation.prompts": "a\n\nb\n", "concepts[0].folder": str(tmp_path / "data/standard"),
                                 "concepts[0].type": "standard", "concepts[0].repeats": "3",
                                 "concepts[0].loss_weight": "1"})
    project.save(path, doc)
    cfg = load_config(path)
    assert (cfg.optimizer.lr, cfg.lora.rank, cfg.validation.prompts) == (0.002, 8, ["a", "b"])
    assert [(c.type, c.prior, c.repeats, c.loss_weight) for c in cfg.concepts] == [
        ("standard", False, 3, 1.0), ("prior", False, 2, 0.5), ("validation", True, 1, 1.0)]
    assert "# Written by the UI" in path.read_text()  # the file's comments stay


@pytest.mark.parametrize("form, key, message", [
    ({"optimizer.lr": "-1"}, "optimizer.lr", "config key 'optimizer.lr' must be > 0, got -1.0"),
    ({"optimizer.lr": "fast"}, "optimizer.lr", "config key 'optimizer.lr' must be float, got 'fast'"),
    ({"train.dtype": "fp64"}, "train.dtype", "config key 'train.dtype' must be one of bf16, fp16, fp32, got 'fp64'"),
    ({"concepts[0].repeats": "0"}, "concepts[0].repeats", "config key 'concepts[0].repeats' must be > 0, got 0"),
    ({"concepts[0].type": "prior"}, "concepts", "config has no standard concept"),
    ({"concepts[0].folder": "nowhere"}, "concepts[0].folder", "concepts[0].folder: "),
])
def test_a_refused_form_names_its_key_and_leaves_the_file(tiny_assets, tmp_path, form, key, message):
    path = _project(tiny_assets, tmp_path)
    before = path.read_bytes()
    concept = {"concepts[0].folder": str(tmp_path / "data/standard"), "concepts[0].type": "standard",
               "concepts[0].repeats": "1", "concepts[0].loss_weight": "1"}
    doc = project.read(path)
    with pytest.raises(UserError) as e:
        project.apply_settings(doc, {"model.path": str(tiny_assets / "model"), **concept, **form})
        project.save(path, doc)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert project.error_key(str(e.value)) == key
    assert ".ui" not in str(e.value) and f".{path.name}." not in str(e.value)  # the file named, not the temporary
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_captions_are_listed_flagged_and_written_beside_the_image(tmp_path, tiny_assets):
    shutil.copytree(tiny_assets / "data/standard", tmp_path / "c")
    first = sorted((tmp_path / "c").glob("*.png"))[0]
    first.with_suffix(".txt").unlink()
    images, count = project.images(tmp_path / "c", ".txt")
    assert count == len(images) > 1 and images[0] == {"name": first.name, "caption": None}
    assert all(i["caption"] for i in images[1:])
    project.write_caption(first, ".txt", "  a photo of sks teapot  ")
    assert first.with_suffix(".txt").read_text() == "a photo of sks teapot\n"


def test_an_empty_field_is_the_key_s_default(tiny_assets, tmp_path):
    path = _project(tiny_assets, tmp_path)
    doc = project.read(path)
    project.apply_settings(doc, {"model.path": str(tiny_assets / "model"), "train.epochs": "", "data.resolution": ""})
    project.save(path, doc)
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.data.resolution) == (1, 512) and "resolution" not in path.read_text()


def test_a_runs_settings_are_a_diff_of_the_configs_the_runs_recorded(tiny_assets, tmp_path):
    path = _project(tiny_assets, tmp_path)
    cfg = load_config(path)
    out = Path(cfg.train.output_dir)
    now = json.loads(cfg.portable_json())
    older = json.loads(cfg.portable_json())
    older["lora"]["rank"], older["optimizer"]["lr"] = cfg.lora.rank + 4, 0.5
    # the run in the output folder: its LoRA file's metadata
    out.mkdir(parents=True)
    save_file({"w": np.zeros(1, np.float32)}, str(out / cfg.train.lora_name),
              metadata={"prior_lora.config": json.dumps(now)})
    # an earlier run stopped before it wrote its LoRA file: its newest checkpoint's state.json
    for step, config in ((1, now), (2, older)):
        folder = out / "previous" / "run-1" / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"step": step, "config": config}))
    (out / "previous" / "run-2").mkdir()  # stopped before its first checkpoint
    assert runs.run_names(cfg) == ["config", "current", "previous/run-2", "previous/run-1"]
    assert runs.settings_diff(cfg, "previous/run-1", "current") == [
        f"lora.rank {cfg.lora.rank + 4} -> {cfg.lora.rank}", f"optimizer.lr 0.5 -> {cfg.optimizer.lr}"]
    assert runs.settings_diff(cfg, "current", "config") == []
    assert runs.settings_diff(cfg, "previous/run-2", "current") == (
        "no config recorded for previous/run-2 (no LoRA file or checkpoint yet)")
    with pytest.raises(UserError, match="no run 'previous/run-3' in '"):
        runs.settings_diff(cfg, "previous/run-3", "current")
