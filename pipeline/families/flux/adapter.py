"""Flux.1 (dev and schnell): CLIP pooled + T5 conditioning, 2x2-packed latents, flow matching.

Every call mirrors what diffusers' FluxPipeline does inside one denoising step (packing, ids, timestep
scaling, guidance), so a cached prior is exactly what the base model predicts in that pipeline.
"""

from __future__ import annotations

import functools
import json

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from pipeline.families.base import FlowMatchingFamily, place_text_encoders, text_encoder_loading
from pipeline.families.capabilities import PipelineSampling
from pipeline.families.flux.kohya import FluxLayout
from pipeline.families.flux.planning import PLANNING


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    denoiser_component = "transformer"
    denoiser_class = FluxTransformer2DModel
    pixel_multiple = 16  # VAE downsamples by 8, packing by 2 more
    _attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    # the single blocks' proj_out is their fused attention-and-MLP output (BFL's linear2); the top-level
    # proj_out is the final layer, so it is named with its block
    _mlp = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
            "single_transformer_blocks.*.proj_out"]
    _rest = ["norm1.linear", "norm1_context.linear", "norm.linear", "timestep_embedder.linear_1",
             "timestep_embedder.linear_2", "text_embedder.linear_1", "text_embedder.linear_2",
             "guidance_embedder.linear_1", "guidance_embedder.linear_2", "x_embedder", "context_embedder",
             "proj_out", "norm_out.linear"]
    target_presets = {"attention": _attention, "attention_mlp": _attention + _mlp, "all_linear": _attention + _mlp + _rest}
    default_target_modules = target_presets["attention"]  # attention projections of both kinds of block
    swap_blocks = ("transformer_blocks", "single_transformer_blocks")  # 19 double-, then 38 single-stream in FLUX.1
    # the capabilities: planning.py, kohya.py, and the pipeline that renders samples
    planning = PLANNING
    lora_layout = FluxLayout(denoiser_component)
    sampling = PipelineSampling("FluxPipeline")

    # -- cache stage: encoders (the VAE's are FolderFamily's) --------------------------------------
    def load_text_encoders(self, device, dtype):
        # The pipeline itself, without transformer and VAE: its encode_prompt is the reference conditioning.
        pipe = FluxPipeline.from_pretrained(self.root, transformer=None, vae=None, dtype=dtype,
                                            **text_encoder_loading(self))
        return place_text_encoders(self, pipe, device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        embeds, pooled, _ = encoders.encode_prompt(
            captions, prompt_2=None, device=encoders._execution_device, max_sequence_length=self.max_sequence_length
        )
        return [
            {"prompt_embeds": e.float().cpu(), "pooled_prompt_embeds": p.float().cpu()} for e, p in zip(embeds, pooled)
        ]

    # -- denoiser ---------------------------------------------------------------------------------
    @functools.cached_property
    def _guidance_embeds(self) -> bool:
        return bool(json.loads((self.root / "transformer" / "config.json").read_text()).get("guidance_embeds"))

    @property
    def default_max_sequence_length(self) -> int:
        return 512 if self._guidance_embeds else 256  # FluxPipeline's default; schnell was trained with 256

    def prediction_settings(self):
        # schnell has no guidance embedding: the value changes nothing there, so it is not in the key
        return {"guidance": self.cfg.guidance} if self._guidance_embeds else {}

    def predict(self, denoiser, noisy, timesteps, text, *, device, dtype):
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy.to(device, dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        embeds = text["prompt_embeds"].to(device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if self._guidance_embeds:
            guidance = torch.full([b], self.cfg.guidance, device=device, dtype=torch.float32)
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(device, dtype) / 1000,  # the pipeline's order: cast, then scale
            guidance=guidance,
            pooled_projections=text["pooled_prompt_embeds"].to(device, dtype),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        # vae_scale_factor=1 because h, w are already latent sizes
        return FluxPipeline._unpack_latents(out, h, w, 1)


FAMILY = FluxFamily
