"""What the memory planner asks of Flux (`FluxFamily.planning`): the dry run's shapes and block counts, and
the public FLUX.1-dev model's full-size configs and rows of the memory table of docs/memory.md."""

from __future__ import annotations

from pipeline.families.capabilities import Planning
from pipeline.families.public_parts import CLIP_L, T5_XXL, VAE_BLOCKS

# black-forest-labs/FLUX.1-dev transformer/config.json: 19 double- and 38 single-stream blocks, 3072 wide
DENOISER = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
            "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
            "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
# black-forest-labs/FLUX.1-dev vae/config.json (HiDream-ai/HiDream-I1-Full ships the same VAE)
VAE = {**VAE_BLOCKS, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
       "use_quant_conv": False, "use_post_quant_conv": False}


class FluxPlanning(Planning):
    label = "Flux"
    denoiser_config = DENOISER
    vae_config = VAE
    # VAE 83,819,683, CLIP-L 123,060,480, T5-XXL 4,762,310,656 parameters
    text_encoder_configs = {"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL)}
    table_rows = (("none", 0, 1), ("none", 30, 1), ("none", 50, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1))
    sequence_length_applies = True
    conv_denoiser = False

    def dry_run_shapes(self, config, batch, resolution, max_sequence_length):
        L = max_sequence_length or (512 if config.get("guidance_embeds") else 256)
        h = resolution // 8
        return (batch, config["in_channels"] // 4, h, h), {  # in_channels counts the 2x2-packed channels
            "prompt_embeds": (batch, L, config["joint_attention_dim"]),
            "pooled_prompt_embeds": (batch, config["pooled_projection_dim"]),
        }

    def block_depths(self, config):
        return {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"]}


PLANNING = FluxPlanning()
