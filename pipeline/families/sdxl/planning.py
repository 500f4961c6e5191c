"""What the memory planner asks of SDXL (`SDXLFamily.planning`): the dry run's shapes and the UNet's
transformer depths, and the public SDXL base model's full-size configs and rows of the memory table of docs/memory.md."""

from __future__ import annotations

from pipeline.families.capabilities import Planning
from pipeline.families.public_parts import CLIP_G, CLIP_L, VAE_BLOCKS

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
DENOISER = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
            "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
VAE = {**VAE_BLOCKS, "latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True}


class SDXLPlanning(Planning):
    label = "SDXL"
    denoiser_config = DENOISER
    vae_config = VAE
    # VAE 83,653,863, CLIP-L 123,060,480, bigG 694,659,840 parameters
    text_encoder_configs = {"text_encoder": ("CLIPTextModel", CLIP_L),
                            "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G)}
    table_rows = (("none", 0, 1), ("int8", 0, 1), ("nf4", 0, 1))
    sequence_length_applies = False  # both CLIP encoders' 77 tokens
    conv_denoiser = True  # a UNet

    def dry_run_shapes(self, config, batch, resolution, max_sequence_length):
        h = resolution // 8
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        return (batch, config["in_channels"], h, h), {
            "prompt_embeds": (batch, 77, config["cross_attention_dim"]), "pooled_prompt_embeds": (batch, pooled),
            "original_size": (batch, 2), "crop_top_left": (batch, 2),
        }

    def block_depths(self, config):
        # transformer blocks per down level (the up path mirrors it); a plain int or level 0 (no attention
        # in SDXL's first level) is left as it is
        depth = config.get("transformer_layers_per_block")
        if not isinstance(depth, list) or config.get("reverse_transformer_layers_per_block"):
            return {}
        return {f"transformer_layers_per_block.{i}": n for i, n in enumerate(depth) if i > 0}

    def with_depths(self, config, depths):
        depth = list(config["transformer_layers_per_block"])
        for key, n in depths.items():
            depth[int(key.rsplit(".", 1)[1])] = n
        return {**config, "transformer_layers_per_block": depth}


PLANNING = SDXLPlanning()
