"""A tiny random-weight Stable Diffusion XL pipeline, built locally like the tiny Flux model.

Same architecture as SDXL base, shrunk: a UNet with SDXL's "text_time" added conditioning (pooled text
embedding + six size/crop ids), cross-attention over the two CLIP encoders' concatenated hidden states,
linear attention projections; a VAE with 4 latent channels and scale factor 8; SDXL's scheduler config.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.families.tiny_parts import check_target, clip_tokenizer, save_pipeline, tiny_vae

PRESETS = {
    # a UNet of well under 1M parameters: a forward at 64 px takes milliseconds on a CPU
    "default": dict(block_out_channels=(16, 32), attention_head_dim=(2, 4), norm_num_groups=8, clip_dim=32,
                    time_dim=8),
    # a few million parameters, for timings that mean something
    "bench": dict(block_out_channels=(64, 128), attention_head_dim=(4, 8), norm_num_groups=32, clip_dim=64,
                  time_dim=32),
}


def build(path: Path, preset: str = "default", seed: int = 0) -> None:
    """Build a tiny random-weight StableDiffusionXLPipeline at `path` (replacing a previous build there)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = check_target(path, preset, PRESETS)
    p = PRESETS[preset]
    clip_dim, time_dim = p["clip_dim"], p["time_dim"]
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()

    def clip_config(tok) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=clip_dim, projection_dim=clip_dim, intermediate_size=2 * clip_dim,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )

    # Each component gets its own seed, so changing one component's config leaves the others' weights alone.
    torch.manual_seed(seed + 0)
    # SDXL's layout: a plain first level, cross-attention below; the UNet attends to both encoders' hidden
    # states side by side (2 x clip_dim) and embeds the pooled text (clip_dim) with six ids of time_dim each.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=p["block_out_channels"], norm_num_groups=p["norm_num_groups"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=p["attention_head_dim"], cross_attention_dim=2 * clip_dim, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + clip_dim,
    )
    torch.manual_seed(seed + 1)
    # 4 blocks -> scale factor 8 like SDXL's VAE; its scaling factor; force_upcast as SDXL's (fp16 overflows)
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_config(tokenizer))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2))
    # SDXL base's scheduler config
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    save_pipeline(pipe, path)
