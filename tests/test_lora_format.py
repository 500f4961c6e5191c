"""The saved LoRA is a diffusers-format file that FluxPipeline loads with no missing or unexpected keys,
and the pipeline's denoiser then predicts exactly what the trained model predicts."""

import json

import torch
from diffusers import FluxPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from pipeline.cache_stage import run_cache
from pipeline.plan import make_plan
from pipeline.train_stage import train_lora


def _image(pipe):
    return pipe(
        prompt="a photo of sks teapot", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images


def test_lora_loads_in_flux_pipeline_and_matches_the_trained_model(project):
    # fp32: the pipeline casts a LoRA to its own dtype, so only there can equality be bitwise
    _, cfg = project(epochs=2, alpha=8.0, dtype="fp32")  # alpha != rank: the scale must survive the round trip
    run_cache(cfg, progress=False)
    trained, summary = train_lora(cfg, progress=False)
    plan = make_plan(cfg)

    with safe_open(summary["lora"], "pt") as f:
        file_keys = set(f.keys())
        meta = f.metadata()
        file_weights = {k: f.get_tensor(k) for k in file_keys}
    assert file_keys and all(k.startswith("transformer.") for k in file_keys)
    assert json.loads(meta["prior_lora.config"])["train"]["dtype"] == "fp32"
    assert meta["prior_lora.base_model"] == plan.denoiser_fp
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 8.0

    pipe = FluxPipeline.from_pretrained(plan.family.root, dtype=torch.float32)
    before = _image(pipe)
    pipe.load_lora_weights(summary["lora"], adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == file_keys  # nothing missing, nothing unexpected
    for k, v in loaded.items():
        assert torch.equal(v, file_weights[f"transformer.{k}"]), k
    assert pipe.transformer.peft_config["trained"].lora_alpha == 8.0
    after = _image(pipe)
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(after), atol=1e-3)

    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    text = {"prompt_embeds": torch.randn(2, 32, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    timesteps = torch.tensor([300.0, 800.0])
    trained.eval()
    with torch.no_grad():
        ours = plan.family.predict(trained, noisy, timesteps, text)
        theirs = plan.family.predict(pipe.transformer, noisy, timesteps, text)
    assert torch.equal(ours, theirs)
