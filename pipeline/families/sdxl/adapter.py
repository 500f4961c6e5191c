"""Stable Diffusion XL: two CLIP encoders, a UNet with size/crop micro-conditioning, DDPM noise
(epsilon or v-prediction, from the model's scheduler config).

Each call mirrors diffusers: the text is `StableDiffusionXLPipeline.encode_prompt`'s, the UNet call is the
pipeline's (time ids = original size + crop top-left + target size), and the noise, targets and min-SNR
weights are those of diffusers' SDXL training scripts (DDPMScheduler built from the model's scheduler config).
"""

from __future__ import annotations

import functools
import json

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr

from pipeline.errors import UserError, warn
from pipeline.families.base import FolderFamily, place_text_encoders, text_encoder_loading
from pipeline.families.capabilities import PipelineSampling
from pipeline.families.sdxl.kohya import SDXLLayout
from pipeline.families.sdxl.planning import PLANNING

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' SDXL LoRA script's targets
MLP = ["ff.net.0.proj", "ff.net.2"]
# every other Linear of the UNet: transformer in/out projections, the resnets' time projections, and the
# time and added-conditioning embeddings (time_embedding.linear_1/2, add_embedding.linear_1/2)
OTHER_LINEAR = ["proj_in", "proj_out", "time_emb_proj", "linear_1", "linear_2"]


class SDXLFamily(FolderFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    denoiser_component = "unet"
    denoiser_class = UNet2DConditionModel
    # the UNet itself needs multiples of 32 px (two 2x downsamplings of 8x latents); 64 gives SDXL's own
    # bucket sizes (1024x1024, 1152x896, 896x1152, ...)
    pixel_multiple = 64
    default_timestep_sampling = "uniform"  # as diffusers' SDXL scripts: randint(0, num_train_timesteps)
    loss_weightings = ("none", "min_snr")
    target_presets = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP,
                      "all_linear": ATTENTION + MLP + OTHER_LINEAR}
    default_target_modules = ATTENTION
    # the capabilities: planning.py, kohya.py (lora_layout, below: it reads the UNet's config), and the
    # pipeline that renders samples
    planning = PLANNING
    sampling = PipelineSampling("StableDiffusionXLPipeline")

    # -- cache stage: encoders -------------------------------------------------------------------
    def load_vae(self, device, dtype):
        # SDXL's VAE overflows in fp16 (its config sets force_upcast): the pipeline upcasts it and diffusers'
        # SDXL LoRA script keeps it in fp32, so fp16 encodes in fp32 here too (bf16 has fp32's range).
        if dtype == torch.float16 and AutoencoderKL.load_config(self.root, subfolder="vae").get("force_upcast"):
            warn("model.encoder_dtype = fp16: this VAE overflows in fp16 (force_upcast), so it encodes in fp32")
            dtype = torch.float32
        return super().load_vae(device, dtype)

    def load_text_encoders(self, device, dtype):
        # The pipeline itself, without UNet and VAE: its encode_prompt is the reference conditioning.
        pipe = StableDiffusionXLPipeline.from_pretrained(self.root, unet=None, vae=None, dtype=dtype,
                                                         **text_encoder_loading(self))
        return place_text_encoders(self, pipe, device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        # no classifier-free guidance; "" (caption dropout) is encoded like any caption, as the training script does
        embeds, _, pooled, _ = encoders.encode_prompt(captions, device=encoders._execution_device,
                                                      do_classifier_free_guidance=False)
        return [
            {"prompt_embeds": e.float().cpu(), "pooled_prompt_embeds": p.float().cpu()} for e, p in zip(embeds, pooled)
        ]

    @property
    def max_sequence_length(self) -> int:
        return 77  # both CLIP encoders' fixed length; model.max_sequence_length does not apply

    # -- timesteps and noise ----------------------------------------------------------------------
    def scheduler(self) -> DDPMScheduler:
        # As diffusers' SDXL training scripts: a DDPMScheduler from the model's scheduler config (Euler's for SDXL).
        if self._scheduler is None:
            self._scheduler = DDPMScheduler.from_pretrained(self.root, subfolder="scheduler")
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise UserError(f"model.path: '{self.root / 'scheduler'}' has prediction_type "
                                f"{self._scheduler.config.prediction_type!r}; SDXL training here supports epsilon and "
                                "v_prediction (set model.prediction_type if the config is wrong)")
        return self._scheduler

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: model.prediction_type, or the scheduler config's. The override is for models
        whose config says otherwise (v-prediction finetunes shipped with an epsilon config). It changes the
        standard target and the min-SNR weights, not the priors: a prior is the UNet's own output."""
        return self.cfg.prediction_type or self.scheduler().config.prediction_type

    def timestep_table(self):
        s = self.scheduler()
        ac = s.alphas_cumprod.float()
        # sigma of the equivalent x0 + sigma * noise parametrisation, so 1 / sigma^2 is the SNR
        return torch.arange(s.config.num_train_timesteps).float(), ((1 - ac) / ac).sqrt()

    def timestep_spec(self):
        c = self.scheduler().config
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr", "prediction_type")
        return {k: c.get(k) for k in keys}

    def noisy_input(self, latents, noise, timesteps, sigmas):
        return self.scheduler().add_noise(latents, noise, timesteps.long())

    def target(self, latents, noise, timesteps):
        s = self.scheduler()
        if self.prediction_type == "v_prediction":
            return s.get_velocity(latents, noise, timesteps.long())
        return noise.clone()  # epsilon; a copy, since the caller writes the prior targets into it

    def loss_weights(self, train, timesteps, sigmas):
        if train.loss_weighting not in self.loss_weightings:
            raise UserError(f"config key 'train.loss_weighting' must be one of {', '.join(self.loss_weightings)} "
                            f"for {self.name} (sigma_sqrt and cosmap are for flow-matching models such as Flux)")
        if train.loss_weighting == "none":
            return torch.ones(len(timesteps))
        # Min-SNR (arXiv 2303.09556) as diffusers' SDXL scripts: min(snr, gamma) / snr for epsilon, / (snr + 1)
        # for v. For epsilon that is 1 wherever snr < gamma, which is also its limit at snr = 0 (the last
        # timestep of a zero-terminal-SNR schedule), where the plain quotient would be 0 / 0 = NaN.
        snr = compute_snr(self.scheduler(), timesteps.long())
        gamma = train.min_snr_gamma
        if self.prediction_type == "epsilon":
            return torch.where(snr < gamma, torch.ones_like(snr), gamma / snr)
        return snr.clamp(max=gamma) / (snr + 1)

    # -- denoiser ---------------------------------------------------------------------------------
    @functools.cached_property
    def _vae_scale_factor(self) -> int:
        # as the pipeline computes it
        config = json.loads((self.root / "vae" / "config.json").read_text())
        return 2 ** (len(config["block_out_channels"]) - 1)

    @functools.cached_property
    def unet_config(self) -> dict:
        return json.loads((self.root / "unet" / "config.json").read_text())

    def prediction_settings(self):
        return {}  # no guidance embedding; the prediction type is part of the noise key

    def predict(self, denoiser, noisy, timesteps, cond, *, device, dtype):
        b, _, h, w = noisy.shape
        # time ids as the pipeline's _get_add_time_ids: original size + crop top-left + target size, all
        # (height, width) in pixels. Kept in float32: the UNet embeds them in float32 anyway, and so sizes
        # above 256 (bf16) or 2048 (fp16) stay exact.
        original, crop = cond["original_size"].float(), cond["crop_top_left"].float()
        target = torch.tensor([h, w], dtype=torch.float32, device=original.device).mul(self._vae_scale_factor)
        time_ids = torch.cat([original, crop, target.expand(b, 2)], dim=1)
        return denoiser(
            noisy.to(device, dtype),
            timesteps.to(device),  # float, as the pipeline passes its scheduler's timesteps
            encoder_hidden_states=cond["prompt_embeds"].to(device, dtype),
            added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"].to(device, dtype),
                               "time_ids": time_ids.to(device)},
            return_dict=False,
        )[0]

    @functools.cached_property
    def lora_layout(self) -> SDXLLayout:
        return SDXLLayout(self.denoiser_component, self.unet_config)


FAMILY = SDXLFamily
