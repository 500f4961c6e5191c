"""Flux.1 (dev and schnell): CLIP pooled + T5 conditioning, 2x2-packed latents, flow matching.

Every call mirrors what diffusers' FluxPipeline does inside one denoising step (packing, ids, timestep
scaling, guidance), so a cached prior is exactly what the base model predicts in that pipeline.
"""

from __future__ import annotations

import functools
import json

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_loss_weighting_for_sd3

from pipeline import objective
from pipeline.families import flux_kohya as kohya
from pipeline.errors import UserError
from pipeline.families import FolderFamily


class FluxFamily(FolderFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    denoiser_component = "transformer"
    denoiser_class = FluxTransformer2DModel
    pixel_multiple = 16  # VAE downsamples by 8, packing by 2 more
    default_timestep_sampling = "logit_normal"  # as diffusers' Flux LoRA script (SD3 paper)
    loss_weightings = ("none", "sigma_sqrt", "cosmap")  # diffusers' compute_loss_weighting_for_sd3
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
    kohya_metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}

    # -- cache stage: encoders (the VAE's are FolderFamily's) --------------------------------------
    def load_text_encoders(self, device, dtype):
        # The pipeline itself, without transformer and VAE: its encode_prompt is the reference conditioning.
        pipe = FluxPipeline.from_pretrained(self.root, transformer=None, vae=None, dtype=dtype)
        return pipe.to(device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        embeds, pooled, _ = encoders.encode_prompt(
            captions, prompt_2=None, device=encoders.device, max_sequence_length=self.cfg.max_sequence_length
        )
        return [
            {"prompt_embeds": e.float().cpu(), "pooled_prompt_embeds": p.float().cpu()} for e, p in zip(embeds, pooled)
        ]

    # -- timesteps --------------------------------------------------------------------------------
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        if self._scheduler is None:
            self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler")
        return self._scheduler

    def timestep_table(self):
        # As diffusers' Flux LoRA script: the scheduler's training table (unshifted when the model uses
        # dynamic shifting); sigma = t / num_train_timesteps.
        s = self.scheduler()
        return s.timesteps.float(), s.sigmas[: len(s.timesteps)].float()

    def timestep_spec(self):
        c = self.scheduler().config
        return {k: c.get(k) for k in ("num_train_timesteps", "shift", "use_dynamic_shifting")}

    # -- denoiser ---------------------------------------------------------------------------------
    def noisy_input(self, latents, noise, timesteps, sigmas):
        return objective.flow_noisy(latents, noise, sigmas)

    def target(self, latents, noise, timesteps):
        return objective.flow_target(latents, noise)

    def loss_weights(self, train, timesteps, sigmas):
        if train.loss_weighting not in self.loss_weightings:
            raise UserError(f"config key 'train.loss_weighting' must be one of {', '.join(self.loss_weightings)} "
                            f"for {self.name} (min_snr is for epsilon/v-prediction models such as SDXL)")
        return compute_loss_weighting_for_sd3(train.loss_weighting, sigmas)

    @functools.cached_property
    def _guidance_embeds(self) -> bool:
        return bool(json.loads((self.root / "transformer" / "config.json").read_text()).get("guidance_embeds"))

    def prediction_settings(self):
        # schnell has no guidance embedding: the value changes nothing there, so it is not in the key
        return {"guidance": self.cfg.guidance} if self._guidance_embeds else {}

    def predict(self, denoiser, noisy, timesteps, text):
        b, c, h, w = noisy.shape
        device, dtype = denoiser.device, denoiser.dtype
        packed = FluxPipeline._pack_latents(noisy.to(device, dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        embeds = text["prompt_embeds"].to(device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
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

    # -- LoRA in kohya's layout -------------------------------------------------------------------
    def to_kohya(self, state_dict, alpha):
        return kohya.to_kohya(state_dict, alpha, self.denoiser_component)
