"""A tiny random-weight Z-Image model, built locally and saved as a normal diffusers folder that
ZImagePipeline.from_pretrained loads: a ZImageTransformer2DModel with one refiner block of each kind,
FLUX.1's VAE at the tiny size, and a 2-layer Qwen3 (the pipeline takes the penultimate layer's hidden
state) with the tokenizer and chat template of the tiny FLUX.2 klein (Qwen3's, as the pipeline applies it
with thinking enabled: the user message, then the assistant's turn)."""

from __future__ import annotations

from pathlib import Path

from pipeline.families import tiny_parts
from pipeline.families.flux.tiny import FLUX_VAE
from pipeline.families.flux2.tiny import qwen_tokenizer

PRESETS = {
    # a ~0.4M-parameter transformer (most of it the timestep MLP, 1024 wide at every size): seconds per test
    "default": dict(dim=32, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, axes_dims=[4, 6, 6],
                    text_width=16),
    # a few million parameters: timings mean something
    "bench": dict(dim=128, n_heads=4, n_kv_heads=4, n_layers=4, n_refiner_layers=2, axes_dims=[8, 12, 12],
                  text_width=64),
}


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight ZImagePipeline at `path` (replacing a previous build there)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = tiny_parts.check_target(path, preset, PRESETS)
    p = dict(PRESETS[preset])
    d = p.pop("text_width")
    tokenizer = qwen_tokenizer()

    torch.manual_seed(seed + 0)
    # 4 latent channels in 2x2 patches; positions: up to 1024 caption tokens (the frame axis), 128 patches a side
    transformer = ZImageTransformer2DModel(in_channels=4, cap_feat_dim=d, axes_lens=[1024, 128, 128], **p)
    torch.manual_seed(seed + 1)
    vae = tiny_parts.tiny_vae(**FLUX_VAE)  # Z-Image ships FLUX.1's VAE
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=d // 2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    # Z-Image-Turbo's scheduler_config.json: a fixed shift of 3, no resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    tiny_parts.save_pipeline(pipe, path)
