"""A tiny random-weight Chroma-architecture model, built locally from diffusers/transformers configs and saved
as a normal diffusers folder that ChromaPipeline.from_pretrained loads."""

from __future__ import annotations

from pathlib import Path

from pipeline.families import tiny_parts
from pipeline.families.flux.tiny import FLUX_VAE

PRESETS = {
    # the tiny Flux's block sizes, and a one-layer approximator: a test runs the whole pipeline in seconds
    "default": dict(
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    ),
    # a few million parameters: big enough that timings mean something, still seconds to build
    "bench": dict(
        num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=8, joint_attention_dim=64,
        axes_dims_rope=(8, 12, 12), approximator_num_channels=64, approximator_hidden_dim=128, approximator_layers=2,
    ),
}


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight ChromaPipeline at `path` (replacing a previous build there)."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    path = tiny_parts.check_target(path, preset, PRESETS)
    tf = PRESETS[preset]
    t5_dim = tf["joint_attention_dim"]
    tokenizer = tiny_parts.t5_tokenizer()

    # Each component gets its own seed, so changing one component's config leaves the others' weights alone.
    torch.manual_seed(seed + 0)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, **tf)  # 4 latent channels packed 2x2
    torch.manual_seed(seed + 1)
    vae = tiny_parts.tiny_vae(**FLUX_VAE)  # Chroma ships FLUX.1's VAE
    torch.manual_seed(seed + 2)
    # T5 v1.1-style (gated-gelu) encoder like Chroma's T5-XXL; its hidden states are the joint attention input
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=t5_dim, d_kv=t5_dim // 4, d_ff=2 * t5_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    ))
    # Chroma1-HD's scheduler_config.json: FLUX.1-dev's, shifted by resolution at inference
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    tiny_parts.save_pipeline(pipe, path)
