"""What the memory planner asks of HiDream (`HiDreamFamily.planning`): the dry run's shapes, block counts
and meta-tensor patches, and the public HiDream-I1-Full model's full-size configs and rows of the memory
table of docs/memory.md."""

from __future__ import annotations

import contextlib

import torch

from pipeline.families.capabilities import Planning
from pipeline.families.flux.planning import VAE as FLUX_VAE
from pipeline.families.public_parts import CLIP_G, CLIP_L, T5_XXL

DEFAULT_MAX_SEQUENCE_LENGTH = 128  # HiDreamImagePipeline's default, what the model sees at inference

# HiDream-ai/HiDream-I1-Full transformer/config.json: 16 double- and 32 single-stream MoE blocks, 2560 wide
DENOISER = {"_class_name": "HiDreamImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": 16, "num_single_layers": 32, "attention_head_dim": 128, "num_attention_heads": 20,
            "caption_channels": [4096, 4096], "text_emb_dim": 2048, "num_routed_experts": 4,
            "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32], "max_resolution": [128, 128],
            "llama_layers": list(range(32)) + [31] * 16}
# Llama 3.1 8B Instruct, HiDream's text_encoder_4 (meta-llama/Llama-3.1-8B-Instruct config.json)
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


class HiDreamPlanning(Planning):
    label = "HiDream"
    denoiser_config = DENOISER
    vae_config = FLUX_VAE  # HiDream-I1 ships Flux's VAE
    # CLIP-L with projection 123,650,304, bigG 694,659,840, T5-XXL 4,762,310,656, Llama 3.1 8B 8,030,261,248
    text_encoder_configs = {"text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
                            "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
                            "text_encoder_3": ("T5EncoderModel", T5_XXL),
                            "text_encoder_4": ("LlamaForCausalLM", LLAMA_8B)}
    table_rows = (("none", 0, 1), ("none", 24, 1), ("none", 40, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1),
                  ("none", 24, 4), ("none", 24, 8),
                  # the four text encoders (13.7B together) quantized or offloaded for the cache stage
                  ("int8", 0, 1, "int8"), ("nf4", 0, 1, "nf4"), ("none", 40, 1, "offload"))
    sequence_length_applies = True
    conv_denoiser = False

    def dry_run_shapes(self, config, batch, resolution, max_sequence_length):
        L = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        t5, llama = config["caption_channels"]
        h = resolution // 8
        return (batch, config["in_channels"], h, h), {
            "prompt_embeds_t5": (batch, L, t5),
            "prompt_embeds_llama3": (batch, max(config["llama_layers"]) + 1, L, llama),
            "pooled_prompt_embeds": (batch, config["text_emb_dim"]),
        }

    def block_depths(self, config):
        return {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"]}

    def with_depths(self, config, depths):
        # each block reads one llama layer: keep the double blocks' first and the single blocks' last, so
        # the cut model takes llama embeddings of the same shape as the whole
        layers = config["llama_layers"]
        d, s = depths.get("num_layers", config["num_layers"]), depths.get("num_single_layers", config["num_single_layers"])
        return {**config, **depths, "llama_layers": layers[:d] + layers[len(layers) - s:]}

    @contextlib.contextmanager
    def dry_run(self):
        # The routed experts run under no_grad (the inference MoE path): they save nothing for the
        # backward, but their routing reads expert counts back to the host, which meta tensors cannot do;
        # unpatchify reads the image sizes back too, and the dry run needs no particular output layout.
        from diffusers.models.transformers import transformer_hidream_image as m

        moe, unpatchify = m.MOEFeedForwardSwiGLU.moe_infer, m.HiDreamImageTransformer2DModel.unpatchify
        m.MOEFeedForwardSwiGLU.moe_infer = lambda self, x, idx, weights: torch.zeros_like(x)
        m.HiDreamImageTransformer2DModel.unpatchify = lambda self, x, img_sizes, is_training: x
        try:
            yield
        finally:
            m.MOEFeedForwardSwiGLU.moe_infer, m.HiDreamImageTransformer2DModel.unpatchify = moe, unpatchify


PLANNING = HiDreamPlanning()
