"""Usable saves along the way: every checkpoint holds the run's LoRA file, which loads as the final one
does; the example configs checkpoint and validate; sample grids are labelled; `sample` takes a size and a
guidance scale."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.data.batches import load_inputs
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.families.base import load_full_pipeline
from pipeline.denoiser.lora import CHECKPOINT_LORA
from pipeline.data.plan import make_plan
from pipeline.train.stage import run_train

from conftest import CPU32, configure

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_each_checkpoint_holds_a_lora_file_that_loads(project):
    path, _ = project(dtype="fp32", max_steps=4, lr=1e-2)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    summary = run_train(cfg, progress=False)
    folder = project.root / "out" / "checkpoints" / "step-00000002"
    lora = folder / CHECKPOINT_LORA
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    with safe_open(summary["lora"], "pt") as f:
        final = f.metadata()
    assert meta["prior_lora.steps"] == "2" and final["prior_lora.steps"] == "4"
    assert {k: v for k, v in meta.items() if k != "prior_lora.steps"} == {
        k: v for k, v in final.items() if k != "prior_lora.steps"}  # the same file as the final save, at step 2
    # the same weights as the state --resume reads, under the pipeline's keys
    state, saved = load_file(folder / "lora.safetensors"), load_file(lora)
    assert saved.keys() == {f"transformer.{k}" for k in state}
    assert all(torch.equal(saved[f"transformer.{k}"], v) for k, v in state.items())

    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    inputs = load_inputs(plan, store, [(next(s for s in plan.training if s.prior), 0)])  # a cached draw
    outputs = []
    for weights in (None, folder, lora):  # the base model, the checkpoint folder, the file
        pipe = load_full_pipeline(plan.family, torch.device("cpu"), torch.float32)
        if weights is not None:
            pipe.load_lora_weights(str(weights))
            assert pipe.transformer.peft_config, "no LoRA keys were loaded"  # what "No LoRA keys associated" means
        with torch.no_grad():
            outputs.append(plan.family.predict(pipe.transformer, inputs.noisy, inputs.timesteps, inputs.cond, **CPU32))
    base, from_folder, from_file = outputs
    assert torch.equal(from_folder, from_file) and not torch.equal(from_file, base)


def test_example_configs_checkpoint_and_sample(tmp_path):
    for path in sorted((REPO / "configs").glob("*.example.toml")):
        cfg = load_config(path)
        assert cfg.train.checkpoint_every > 0 and cfg.train.keep_checkpoints > 0, path.name
        assert cfg.validation.prompts and cfg.validation.every > 0, path.name


def test_a_long_label_is_wrapped_whole():
    from PIL import ImageDraw, ImageFont

    from pipeline.train.validation import label, wrap

    text = "step 64: a photo of sks teapot on a wooden table in the golden afternoon light, photographed from above"
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(Image.new("RGB", (200, 200)))
    fits = lambda t: draw.textlength(t, font=font) <= 196  # noqa: E731
    lines = wrap(text, fits)
    assert len(lines) > 1 and " ".join(lines) == text and all(fits(line) for line in lines)
    # a word wider than a line is broken where it fills one, nothing dropped
    assert "".join(wrap("x" * 80, fits)) == "x" * 80 and all(fits(line) for line in wrap("x" * 80, fits))
    # drawn: the dark band holds several lines of text, not one line cut with "…"
    drawn = np.asarray(label(Image.new("RGB", (200, 200), (255, 255, 255)), text).convert("L"))
    dark_rows = int((np.median(drawn, axis=1) < 128).sum())
    assert dark_rows > 2 * 12 and dark_rows <= 100  # at least two lines; at most half the image


@pytest.mark.e2e
def test_sample_grids_are_labelled_with_prompt_and_step(project):
    path, _ = project(dtype="fp32", max_steps=2)
    path.write_text(path.read_text() + '\n[validation]\nprompts = ["a photo of sks teapot", "a teapot"]\nsteps = 1\n')
    cfg = load_config(path)
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    lines = [json.loads(x) for x in open(project.root / "out" / "validation.jsonl")]
    for line in lines:
        grid = Image.open(line["samples"])
        step = line["step"]
        labels = [f"step {step}: a photo of sks teapot", f"step {step}: a teapot"]
        assert json.loads(grid.text["prior_lora.labels"]) == labels
        assert grid.size == (2 * 64, 64)  # drawn on the images: the grid keeps its size
        band = np.asarray(grid.convert("L"))[54:, :]
        assert np.median(band) < 80  # the label's dark band along the bottom edge


@pytest.mark.e2e
def test_sample_takes_width_height_and_guidance(project, tmp_path):
    path, _ = project(dtype="fp32", max_steps=1)
    cfg = load_config(path)
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    grids = {}
    for guidance in ("1.0", "4.0"):
        out = tmp_path / f"g{guidance}.png"
        r = CliRunner().invoke(main, ["sample", "--config", str(path), "--prompt", "a teapot", "--steps", "2",
                                      "--width", "96", "--height", "64", "--guidance", guidance, "--out", str(out)])
        assert r.exit_code == 0, r.output
        grids[guidance] = Image.open(out)
        assert grids[guidance].size == (96, 64)
        assert json.loads(grids[guidance].text["prior_lora.labels"]) == ["step 1: a teapot"]
    # FLUX.1-dev's layout embeds the guidance: another value, another image
    assert not np.array_equal(np.asarray(grids["1.0"]), np.asarray(grids["4.0"]))
    r = CliRunner().invoke(main, ["sample", "--help"])
    assert all(opt in r.stdout for opt in ("--width", "--height", "--guidance"))
