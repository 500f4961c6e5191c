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
# the VAE's downsampling, which SDXL's predict reads from vae/config.json
VAE = {"flux": [128, 256, 512, 512], "sdxl": [128, 256, 512, 512], "hidream": [128, 256, 512, 512]}
# parameter counts of the other components, from the same repositories' configs (see the README's family
# sections): the VAE and each text encoder, for the cache stage's phases
ENCODERS = {
    "flux": {"vae": 83_819_683, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656},
    "sdxl": {"vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "hidream": {"vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                "text_encoder_3": 4_762_310_656, "text_encoder_4": 8_030_261_248},
}


def public_family(name: str):
    """A family object over a folder holding only the public denoiser config (what predict reads)."""
    from pipeline.config import ModelConfig
    from pipeline.families import family_class

    cls = family_class(name)
    root = Path(tempfile.mkdtemp(prefix=f"prior-lora-{name}-"))
    (root / cls.denoiser_component).mkdir()
    (root / cls.denoiser_component / "config.json").write_text(json.dumps(DENOISERS[name]))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": VAE[name]}))
    return cls(root, ModelConfig(path=str(root)))
