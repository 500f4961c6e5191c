"""What the memory planner asks of Qwen-Image (`QwenImageFamily.planning`): the dry run's shapes and block
count, and the public Qwen-Image model's full-size configs and rows of the memory table of docs/memory.md.
Qwen-Image-2512 has the same architecture and configs (its weights differ), so it plans as Qwen-Image."""

from __future__ import annotations

from pipeline.families.capabilities import Planning

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default
MAX_SEQUENCE_LENGTH = 1024  # its check_inputs refuses more

# Qwen/Qwen-Image transformer/config.json (and Qwen/Qwen-Image-2512's): 60 dual-stream blocks, 3072 wide (24 heads
# of 128), joint attention over Qwen2.5-VL-7B's 3584; 16 latent channels packed 2x2 (64 in)
DENOISER = {"_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
            "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
            "num_layers": 60, "out_channels": 16, "patch_size": 2}
# Qwen/Qwen-Image vae/config.json: the Wan-style 3D-causal VAE (AutoencoderKLQwenImage's defaults: base_dim 96,
# 16 latent channels, 8x down), whose per-channel latents_mean/latents_std are its class defaults
VAE = {"_class_name": "AutoencoderKLQwenImage", "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
       "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True]}
# Qwen/Qwen2.5-VL-7B-Instruct config.json (Qwen-Image's text_encoder): the language model and the vision tower
QWEN25_VL_7B = {"hidden_size": 3584, "vocab_size": 152064, "tie_word_embeddings": False,
                "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                "max_position_embeddings": 128000, "tie_word_embeddings": False,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": [16, 24, 24]}},
                "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                                  "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31],
                                  "window_size": 112, "patch_size": 14, "spatial_merge_size": 2,
                                  "temporal_patch_size": 2}}


class QwenImagePlanning(Planning):
    label = "Qwen-Image"
    denoiser_config = DENOISER
    vae_config = VAE
    text_encoder_configs = {"text_encoder": ("Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B)}
    # 20B in bf16 is 41 GB of weights: on 24 GB through nf4, or through block swap (50 of 60 blocks waiting in
    # CPU memory); int8/fp8 fit 48 GB
    table_rows = (("none", 0, 1), ("none", 30, 1), ("none", 50, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1),
                  ("nf4", 0, 1, "nf4"), ("none", 50, 1, "int8"))  # Qwen2.5-VL-7B quantized too: 16 GB cards
    sequence_length_applies = True
    conv_denoiser = False

    def dry_run_shapes(self, config, batch, resolution, max_sequence_length):
        # every batch is padded to max_sequence_length text tokens (the adapter's collate), with its mask
        L, h = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH, resolution // 8
        return (batch, config["out_channels"], h, h), {
            "prompt_embeds": (batch, L, config["joint_attention_dim"]), "prompt_embeds_mask": (batch, L),
        }

    def block_depths(self, config):
        return {"num_layers": config["num_layers"]}


PLANNING = QwenImagePlanning()
