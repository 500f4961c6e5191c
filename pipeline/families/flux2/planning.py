"""What the memory planner asks of FLUX.2 (`Flux2Family.planning`): the dry run's shapes and block counts,
and the public FLUX.2-klein-4B full-size configs and rows of the memory table of docs/memory.md, with klein
9B's and dev's as variants (their own rows)."""

from __future__ import annotations

from pipeline.families.capabilities import Planning

# the Qwen3 hidden states Flux2KleinPipeline stacks (its text_encoder_out_layers default), and the Mistral 3
# ones Flux2Pipeline (dev) stacks
TEXT_LAYERS = (9, 18, 27)
DEV_TEXT_LAYERS = (10, 20, 30)

# black-forest-labs/FLUX.2-klein-4B transformer/config.json: 5 double- and 20 single-stream blocks, 3072 wide,
# joint attention over 3 x 2560 (three Qwen3-4B layers side by side); no guidance embedding
KLEIN_4B = {"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32],
            "guidance_embeds": False, "in_channels": 128, "joint_attention_dim": 7680, "mlp_ratio": 3.0,
            "num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20, "patch_size": 1,
            "rope_theta": 2000, "timestep_guidance_channels": 256}
# black-forest-labs/FLUX.2-klein-9B: 8 double- and 24 single-stream blocks, 4096 wide (32 heads of 128), joint
# attention over 3 x 4096 (three Qwen3-8B layers); no guidance embedding. BFL's reference code (flux2's
# model.py, Klein9BParams: depth 8, depth_single_blocks 24, hidden_size 4096, num_heads 32, context_in_dim 12288,
# mlp_ratio 3.0, theta 2000, use_guidance_embed False) in diffusers' key names
KLEIN_9B = {**KLEIN_4B, "joint_attention_dim": 12288, "num_attention_heads": 32, "num_layers": 8,
            "num_single_layers": 24}
# the FLUX.2 VAE (vae/config.json of every FLUX.2 repository): 32 latent channels, 128 once patchified
VAE = {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "layers_per_block": 2, "latent_channels": 32, "sample_size": 1024, "use_quant_conv": True,
       "use_post_quant_conv": True}
# Qwen/Qwen3-4B config.json (klein 4B's text_encoder)
QWEN3_4B = {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
            "max_position_embeddings": 40960, "rope_theta": 1000000}
# Qwen/Qwen3-8B config.json (klein 9B's text_encoder): Qwen3-4B's depth and heads, wider, untied embeddings
QWEN3_8B = {**QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}


class _KleinPlanning(Planning):
    vae_config = VAE
    sequence_length_applies = True
    conv_denoiser = False

    def dry_run_shapes(self, config, batch, resolution, max_sequence_length):
        h = resolution // 16  # 8x by the VAE, 2x by the patches
        return (batch, config["in_channels"], h, h), {
            "prompt_embeds": (batch, max_sequence_length or 512, config["joint_attention_dim"]),
        }

    def block_depths(self, config):
        return {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"]}


# black-forest-labs/FLUX.2-dev transformer/config.json (diffusers' Flux2Transformer2DModel defaults): 8 double-
# and 48 single-stream blocks, 6144 wide (48 heads of 128), joint attention over 3 x 5120 (three Mistral Small
# 3.1 layers), guidance embedded
DEV = {**KLEIN_4B, "joint_attention_dim": 15360, "num_attention_heads": 48, "num_layers": 8, "num_single_layers": 48,
       "guidance_embeds": True}
# mistralai/Mistral-Small-3.1-24B-Instruct-2503 config.json (FLUX.2 dev's text_encoder): a 40-layer Mistral
# language model 5120 wide, and the Pixtral vision tower and projector the class carries (text prompts never
# run them, but they load)
MISTRAL_SMALL_3_1 = {
    "text_config": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
                    "max_position_embeddings": 131072, "rope_theta": 1000000000.0, "tie_word_embeddings": False},
    "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "head_dim": 64, "image_size": 1540, "patch_size": 14},
    "spatial_merge_size": 2, "multimodal_projector_bias": False, "image_token_index": 10,
}


class DevPlanning(_KleinPlanning):
    label = "FLUX.2 dev"
    pipeline_class = "Flux2Pipeline"
    denoiser_config = DEV
    text_encoder_configs = {"text_encoder": ("Mistral3ForConditionalGeneration", MISTRAL_SMALL_3_1)}
    # 32B parameters: 64 GB in bf16, so full precision only with most blocks swapped; the 24B Mistral 3 is
    # 48 GB in bf16, so every row quantizes or offloads it for the cache stage
    table_rows = (("none", 40, 1, "offload"), ("none", 50, 1, "nf4"), ("none", 54, 1, "offload"), ("int8", 0, 1, "int8"),
                  ("fp8", 0, 1, "fp8"), ("nf4", 0, 1, "nf4"))


class Klein9BPlanning(_KleinPlanning):
    label = "FLUX.2 klein 9B"
    denoiser_config = KLEIN_9B
    text_encoder_configs = {"text_encoder": ("Qwen3ForCausalLM", QWEN3_8B)}
    table_rows = (("none", 0, 1), ("none", 20, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1),
                  ("nf4", 0, 1, "nf4"), ("int8", 0, 1, "int8"))  # Qwen3-8B quantized: a cache stage for 16 GB


class Flux2Planning(_KleinPlanning):
    label = "FLUX.2 klein 4B"
    denoiser_config = KLEIN_4B
    text_encoder_configs = {"text_encoder": ("Qwen3ForCausalLM", QWEN3_4B)}
    table_rows = (("none", 0, 1), ("none", 15, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1))
    variants = (Klein9BPlanning(), DevPlanning())


PLANNING = Flux2Planning()
