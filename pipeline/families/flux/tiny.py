"""A tiny random-weight Flux.1-architecture model (dev layout, or schnell's with preset "schnell"),
built locally from diffusers/transformers configs and saved as a normal diffusers folder."""

from __future__ import annotations

from pathlib import Path

from pipeline.families import tiny_parts

PRESETS = {
    # ~94k-parameter transformer: a test runs the whole pipeline in a few seconds on a CPU.
    "default": dict(
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ),
    # a few million parameters: big enough that timings mean something, still seconds to build.
    "bench": dict(
        num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=8,
        joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12),
    ),
    # the architecture of the tiny trained base (pipeline/tinybase, docs/tiny-base.md): what `make
    # tiny-base` starts from; this builder alone gives it random weights
    "base": dict(
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ),
}
# a preset's VAE settings other than tiny_parts.tiny_vae's: the base's VAE is trained to reconstruct
# the scenes, and 8 latent channels at 8x8 hold them much better than 4
VAES = {"base": dict(block_out_channels=(16, 32, 32, 32), latent_channels=8)}
# FLUX.1-schnell's layout at the default's size: timestep-distilled, so no guidance embedding, and its
# scheduler neither shifts nor shifts dynamically (as schnell's scheduler_config.json)
PRESETS["schnell"] = dict(PRESETS["default"], guidance_embeds=False)
SCHEDULERS = {"schnell": dict(shift=1.0, use_dynamic_shifting=False)}

# Flux's latent scaling and shift, and no quant convs like Flux (HiDream uses Flux's VAE)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight FluxPipeline at `path` (replacing a previous build there)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    path = tiny_parts.check_target(path, preset, PRESETS)
    tf = {"guidance_embeds": True, **PRESETS[preset]}  # like Flux-dev unless the preset says otherwise
    clip_dim, t5_dim = tf["pooled_projection_dim"], tf["joint_attention_dim"]
    tokenizer, tokenizer_2 = tiny_parts.clip_tokenizer(), tiny_parts.t5_tokenizer()

    # Each component gets its own seed, so changing one component's config leaves the others' weights alone.
    torch.manual_seed(seed + 0)
    vae_settings = {**FLUX_VAE, **VAES.get(preset, {})}
    # in_channels: the latent channels packed 2x2 (16 for the default's 4)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * vae_settings.get("latent_channels", 4), **tf)
    torch.manual_seed(seed + 1)
    vae = tiny_parts.tiny_vae(**vae_settings)
    torch.manual_seed(seed + 2)
    # FluxPipeline uses CLIP's pooler_output (hidden_size wide) as the pooled projection.
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=clip_dim, projection_dim=clip_dim, intermediate_size=2 * clip_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(seed + 3)
    # T5 v1.1-style (gated-gelu) encoder like Flux's T5-XXL; its hidden states are the joint attention input.
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=t5_dim // 4, d_ff=2 * t5_dim, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=0,
    ))
    shifting = {"shift": 3.0, "use_dynamic_shifting": True, **SCHEDULERS.get(preset, {})}  # Flux-dev's unless set
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
        **shifting,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    tiny_parts.save_pipeline(pipe, path)
