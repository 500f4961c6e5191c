"""FLUX.1-schnell's layout (no guidance embedding, unshifted scheduler) end to end on its tiny model:
the guidance value is not in the prior key, and a trained LoRA loads in its FluxPipeline."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from test_lora_format import predictions

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.data.plan import make_plan
from pipeline.train.stage import train_lora

COMPUTED = ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-flux-schnell.toml"


def test_embedded_schnell_config_and_model(tiny_schnell):
    cfg = load_config(CONFIG)
    assert (cfg.embedded.family, cfg.embedded.preset) == ("flux", "schnell")
    assert cfg.model.path.endswith("cache/tiny-flux-schnell/model")
    config = json.loads((tiny_schnell / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_schnell, subfolder="scheduler")
    assert not scheduler.config.use_dynamic_shifting and scheduler.config.shift == 1.0


@pytest.mark.e2e
def test_schnell_ignores_guidance_and_its_lora_loads(project, tiny_schnell):
    _, cfg = project(model=tiny_schnell, dtype="fp32", max_steps=3, lr=1e-2)
    first = run_cache(cfg, progress=False)
    assert first["priors_computed"] == 16  # 8 prior images x 2 variants
    plan = make_plan(cfg)
    assert plan.family.prediction_settings() == {}

    _, guided = project("guided.toml", model=tiny_schnell, dtype="fp32", max_steps=3, lr=1e-2, guidance=3.5)
    again = run_cache(guided, progress=False)
    assert {k: again[k] for k in COMPUTED} == dict.fromkeys(COMPUTED, 0)  # nothing depends on it
    sample = next(s for s in plan.samples if s.prior)
    assert make_plan(guided).prior_key(sample, 1) == plan.prior_key(sample, 1)

    trained, summary = train_lora(guided, progress=False)
    assert summary["steps"] == 3
    pipe = FluxPipeline.from_pretrained(tiny_schnell, dtype=torch.float32)
    pipe.load_lora_weights(summary["lora"], adapter_name="trained")
    ours, theirs = predictions(plan.family, trained, pipe.transformer)
    assert torch.equal(ours, theirs)
    image = pipe(prompt="a photo of sks teapot", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                 max_sequence_length=32, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
