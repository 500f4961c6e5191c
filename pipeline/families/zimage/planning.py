"""What the memory planner asks of Z-Image (`ZImageFamily.planning`): the dry run's shapes and block counts,
and the public Z-Image full-size configs and rows of the memory table of docs/memory.md."""

from __future__ import annotations

from pipeline.families.capabilities import Planning
from pipeline.families.flux.planning import VAE as FLUX_VAE
from pipeline.families.flux2.planning import QWEN3_4B

# Tongyi-MAI/Z-Image transformer/config.json (Z-Image-Turbo's is the same): 30 single-stream layers 3840 wide
# (30 heads of 128), 2 noise- and 2 context-refiner blocks, captions from Qwen3-4B (2560 wide)
DENOISER = {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
            "in_channels": 16, "dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30,
            "norm_eps": 1e-05, "qk_norm": True, "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0,
            "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512]}
# the caption length the planner assumes: captions are cached at their own length, so a long one (the chat
# template's tokens included) up to the pipeline's cut at 512
DEFAULT_TOKENS = 512


class ZImagePlanning(Planning):
    label = "Z-Image"
    denoiser_config = DENOISER
    vae_config = FLUX_VAE  # Z-Image ships FLUX.1's VAE
    text_encoder_configs = {"text_encoder": ("Qwen3ForCausalLM", QWEN3_4B)}
    table_rows = (("none", 0, 1), ("none", 15, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1))
    sequence_length_applies = True
    conv_denoiser = False

    def dry_run_shapes(self, config, batch, resolution, max_sequence_length):
        h = resolution // 8
        # no mask: every sample's caption at the full length (predict then takes all tokens)
        return (batch, config["in_channels"], h, h), {
            "prompt_embeds": (batch, max_sequence_length or DEFAULT_TOKENS, config["cap_feat_dim"]),
        }

    def block_depths(self, config):
        return {"n_layers": config["n_layers"]}


PLANNING = ZImagePlanning()
