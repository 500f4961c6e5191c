"""The full-size denoiser configs of the public models, as their repositories' `transformer/config.json`
and `unet/config.json` give them (non-default keys), so the memory planner's table and `make bench-gpu`
can build these architectures with random weights, without a download."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

DENOISERS = {
    # black-forest-labs/FLUX.1-dev transformer/config.json: 19 double- and 38 single-stream blocks, 3072 wide
    "flux": {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
             "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
             "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]},
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
             "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
             "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True},
    # HiDream-ai/HiDream-I1-Full transformer/config.json: 16 double- and 32 single-stream MoE blocks, 2560 wide
    "hidream": {"_class_name": "HiDreamImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 16,
                "num_layers": 16, "num_single_layers": 32, "attention_head_dim": 128, "num_attention_heads": 20,
                "caption_channels": [4096, 4096], "text_emb_dim": 2048, "num_routed_experts": 4,
                "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32], "max_resolution": [128, 128],
                "llama_layers": list(range(32)) + [31] * 16},
}
# The VAEs: black-forest-labs/FLUX.1-dev vae/config.json (HiDream-ai/HiDream-I1-Full ships the same VAE) and
# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (non-default keys)
_VAE_BLOCKS = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
               "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "sample_size": 1024}
_FLUX_VAE = {**_VAE_BLOCKS, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
             "use_quant_conv": False, "use_post_quant_conv": False}
VAES = {"flux": _FLUX_VAE, "hidream": _FLUX_VAE,
        "sdxl": {**_VAE_BLOCKS, "latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True}}
VAE = {name: v["block_out_channels"] for name, v in VAES.items()}  # the downsampling SDXL's predict reads

# The text encoders (transformers class, non-default config keys), from the same repositories'
# text_encoder*/config.json: CLIP ViT-L/14 (FLUX.1-dev text_encoder, SDXL text_encoder, HiDream text_encoder
# with its projection), OpenCLIP bigG/14 (SDXL and HiDream text_encoder_2), T5 v1.1 XXL's encoder (FLUX.1-dev
# text_encoder_2, HiDream text_encoder_3) and Llama 3.1 8B Instruct (HiDream's text_encoder_4,
# meta-llama/Llama-3.1-8B-Instruct config.json)
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "projection_dim": 768, "hidden_act": "quick_gelu"}
_CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
           "projection_dim": 1280, "hidden_act": "gelu"}
_T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
           "feed_forward_proj": "gated-gelu"}
_LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
TEXT_ENCODERS = {
    "flux": {"text_encoder": ("CLIPTextModel", _CLIP_L), "text_encoder_2": ("T5EncoderModel", _T5_XXL)},
    "sdxl": {"text_encoder": ("CLIPTextModel", _CLIP_L), "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_G)},
    "hidream": {"text_encoder": ("CLIPTextModelWithProjection", _CLIP_L),
                "text_encoder_2": ("CLIPTextModelWithProjection", _CLIP_G),
                "text_encoder_3": ("T5EncoderModel", _T5_XXL), "text_encoder_4": ("LlamaForCausalLM", _LLAMA_8B)},
}


def encoder_params(name: str) -> dict[str, int]:
    """Parameter counts of the family's VAE and text encoders, built from the configs above on the meta
    device (flux: VAE 83,819,683, CLIP-L 123,060,480, T5-XXL 4,762,310,656; SDXL: VAE 83,653,863, bigG
    694,659,840; HiDream adds Llama 3.1 8B's 8,030,261,248)."""
    import diffusers
    import torch
    import transformers

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        out = {"vae": count(diffusers.AutoencoderKL.from_config(VAES[name]))}
        for component, (cls_name, config) in TEXT_ENCODERS[name].items():
            cls = getattr(transformers, cls_name)
            out[component] = count(cls(cls.config_class(**config)))
    return out


class _Encoders(dict):
    """ENCODERS[name], counted on first use (building the configs on meta takes a second)."""

    def __missing__(self, name):
        self[name] = encoder_params(name)
        return self[name]


ENCODERS = _Encoders()


def cut_config(name: str, blocks: int = 1) -> dict:
    """The public denoiser config at full width, cut to `blocks` blocks of each kind (family.with_depths):
    what `make bench-memory` measures on a CPU."""
    from pipeline.families import family_class

    cls = family_class(name)
    family = cls.__new__(cls)  # with_depths and block_depths read only the config
    config = DENOISERS[name]
    return family.with_depths(config, {k: min(n, blocks) for k, n in family.block_depths(config).items()})


def save_cut_model(name: str, root: Path, blocks: int = 1, dtype=None) -> Path:
    """A normal diffusers folder at `root` holding the cut denoiser (random weights, safetensors) and the
    VAE's config, so that a config's model.path can point at it and plan-memory reads it as any model."""
    import torch

    from pipeline.families import family_class

    cls = family_class(name)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = cls.denoiser_class.from_config(cut_config(name, blocks))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(root / cls.denoiser_component)  # safetensors, written by diffusers
    (root / "vae").mkdir(parents=True, exist_ok=True)
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **VAES[name]}))
    index = {"_class_name": cls.pipeline_classes[0], cls.denoiser_component: ["diffusers", cls.denoiser_class.__name__],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def public_family(name: str):
    """A family object over a folder holding only the public denoiser config (what predict reads)."""
    from pipeline.config import ModelConfig
    from pipeline.families import family_class

    cls = family_class(name)
    root = Path(tempfile.mkdtemp(prefix=f"prior-lora-{name}-"))
    (root / cls.denoiser_component).mkdir()
    (root / cls.denoiser_component / "config.json").write_text(json.dumps(DENOISERS[name]))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps(VAES[name]))
    return cls(root, ModelConfig(path=str(root)))
