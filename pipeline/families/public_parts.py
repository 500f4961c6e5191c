"""Full-size configs of components that several families' public models share (non-default keys), from
their repositories' config.json: the VAE blocks of the 16-channel and 4-channel VAEs, and the text encoders.
Each family's `planning.py` names its own model from these (its public configs)."""

# AutoencoderKL's blocks in FLUX.1-dev vae/config.json and stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
VAE_BLOCKS = {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "sample_size": 1024}

# CLIP ViT-L/14 (FLUX.1-dev text_encoder, SDXL text_encoder, HiDream text_encoder with its projection),
# OpenCLIP bigG/14 (SDXL and HiDream text_encoder_2), T5 v1.1 XXL's encoder (FLUX.1-dev text_encoder_2,
# HiDream text_encoder_3)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu"}
