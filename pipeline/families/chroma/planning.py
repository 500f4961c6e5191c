"""What the memory planner asks of Chroma (`ChromaFamily.planning`): the dry run's shapes and block counts, and
the public Chroma1-HD model's full-size configs and rows of the memory table of docs/memory.md."""

from __future__ import annotations

from pipeline.families.capabilities import Planning
from pipeline.families.flux.planning import VAE as FLUX_VAE
from pipeline.families.public_parts import T5_XXL

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # ChromaPipeline's default (it refuses more)

# lodestones/Chroma1-HD transformer/config.json: FLUX.1's 19 double- and 38 single-stream blocks, 3072 wide,
# without the per-block modulation Linears (one approximator computes every block's modulation)
DENOISER = {"_class_name": "ChromaTransformer2DModel", "approximator_hidden_dim": 5120, "approximator_layers": 5,
            "approximator_num_channels": 64, "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
            "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
            "num_single_layers": 38, "patch_size": 1}


class ChromaPlanning(Planning):
    label = "Chroma"
    denoiser_config = DENOISER
    vae_config = FLUX_VAE  # Chroma1-HD ships FLUX.1's VAE
    text_encoder_configs = {"text_encoder": ("T5EncoderModel", T5_XXL)}  # T5 v1.1 XXL's encoder alone
    table_rows = (("none", 0, 1), ("none", 30, 1), ("none", 50, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1),
                  ("nf4", 0, 1, "nf4"))  # T5-XXL quantized too
    sequence_length_applies = True
    conv_denoiser = False

    def dry_run_shapes(self, config, batch, resolution, max_sequence_length):
        L = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        h = resolution // 8
        return (batch, config["in_channels"] // 4, h, h), {  # in_channels counts the 2x2-packed channels
            "prompt_embeds": (batch, L, config["joint_attention_dim"]),
            "prompt_attention_mask": (batch, L),
        }

    def block_depths(self, config):
        return {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"]}


PLANNING = ChromaPlanning()
