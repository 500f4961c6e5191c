"""Z-Image (Tongyi-MAI/Z-Image, the Base model; Z-Image-Turbo has the same architecture): a single-stream
6B transformer over the 2x2-patchified latents of FLUX.1's VAE, conditioned on the penultimate hidden state
of Qwen3-4B, one caption at a time at its own length.

Every call mirrors what diffusers' ZImagePipeline does (diffusers/pipelines/z_image/pipeline_z_image.py;
docs/families/z-image.md cites the lines): the chat template with thinking enabled, hidden_states[-2]
with the padding dropped (`_encode_prompt`), the latents as (z - shift) * scale (the inverse of its decode
step), and in `predict` one step of its denoising loop: the transformer takes lists (a latent (C,1,h,w)
and a caption (L,D) per sample), the timestep as (1000 - t) / 1000, and its output is negated before the
scheduler's step. So `predict` returns what the pipeline steps with (noise - x0 in flow matching's terms),
the standard target is flow matching's noise - x0, and a cached prior is exactly what the base model
predicts in that pipeline.

Captions are cached at their own length (`text_lengths_vary`); `collate` pads a batch with a mask and
`predict` takes each caption back out (pipeline/families/padding.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.families import padding
from pipeline.families.base import FlowMatchingFamily, place_text_encoders, text_encoder_loading
from pipeline.families.capabilities import Sampling
from pipeline.families.zimage.kohya import ZImageLayout
from pipeline.families.zimage.planning import PLANNING

# every block (the noise and context refiners and the main layers) has the same modules; these names
# match in all of them
_attention = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
_mlp = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
_rest = ["adaLN_modulation.0", "all_x_embedder.2-1", "all_final_layer.2-1.linear",
         "all_final_layer.2-1.adaLN_modulation.1", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"]
MASK = "prompt_attention_mask"  # the mask collate adds (the pipeline itself takes a list, no mask)


class ZImageSampling(Sampling):
    """ZImagePipeline takes its prompt embeddings as a list of (L_i, D) tensors, and classifier-free
    guidance (Base: guidance_scale 4-5) encodes "" as the negative prompt."""

    pipeline_class = "ZImagePipeline"
    negative_is_empty_caption = True

    def pipeline_layout(self, cond):
        out = {}
        for prefix in ("", "negative_"):
            if f"{prefix}prompt_embeds" in cond:
                out[f"{prefix}prompt_embeds"] = padding.unpad(cond[f"{prefix}prompt_embeds"], cond.get(f"{prefix}{MASK}"))
        return out


class ZImageFamily(FlowMatchingFamily):
    name = "zimage"
    pipeline_classes = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer")
    denoiser_component = "transformer"
    denoiser_class = ZImageTransformer2DModel
    pixel_multiple = 16  # the VAE downsamples by 8, the 2x2 patches by 2 more (the pipeline refuses others)
    default_max_sequence_length = 512  # ZImagePipeline's default; captions are cut there, never padded to it
    text_lengths_vary = True
    target_presets = {"attention": _attention, "attention_mlp": _attention + _mlp,
                      "all_linear": _attention + _mlp + _rest}
    default_target_modules = target_presets["attention"]
    # the 30 main layers (the refiners, 2 + 2 blocks on two separate branches, stay resident)
    swap_blocks = ("layers",)
    # Z-Image's scheduler (use_dynamic_shifting false; Turbo's shift 3) shifts the training table itself: draw
    # uniformly over it, as for HiDream
    default_timestep_sampling = "uniform"
    # diffusers 0.42's ZImageLoraLoaderMixin reads a LoKr file (peft's names, or ai-toolkit's diffusion_model.)
    pipeline_adapter_types = ("lora", "lokr")
    planning = PLANNING
    lora_layout = ZImageLayout("transformer")
    sampling = ZImageSampling()

    def __init__(self, root: Path, cfg: ModelConfig):
        super().__init__(root, cfg)
        self.refuse_other_pipelines("Z-Image")

    # -- cache stage: text (the VAE is FolderFamily's AutoencoderKL, FLUX.1's) ------------------------
    def load_text_encoders(self, device, dtype):
        config = self.root / "text_encoder" / "config.json"
        layers = json.loads(config.read_text()).get("num_hidden_layers", 0) if config.is_file() else 0
        if layers < 2:  # the pipeline takes hidden_states[-2], the output of the second-to-last layer
            raise UserError(f"model.path: '{config}' has {layers} hidden layers; Z-Image takes the penultimate "
                            f"layer's hidden state, so its Qwen3 needs at least 2")
        # the pipeline itself, without transformer and VAE: its encode_prompt is the reference conditioning
        pipe = ZImagePipeline.from_pretrained(self.root, transformer=None, vae=None, dtype=dtype,
                                              **text_encoder_loading(self))
        return place_text_encoders(self, pipe, device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        # the pipeline's own: chat template (thinking enabled), padding to max_sequence_length in the encoder,
        # then each caption's tokens alone (its list of variable-length embeddings). It rewrites the list it
        # is given in place, hence the copy.
        embeds, _ = encoders.encode_prompt(list(captions), device=encoders._execution_device,
                                           do_classifier_free_guidance=False,
                                           max_sequence_length=self.max_sequence_length)
        return [{"prompt_embeds": e.float().cpu()} for e in embeds]

    # -- denoiser ---------------------------------------------------------------------------------
    def prediction_settings(self):
        # the timestep convention and the caption padding decide what the transformer is given; guidance
        # happens outside it (classifier-free, Base) or not at all (Turbo)
        return {"timestep": "(1000 - t) / 1000, output negated", "captions": padding.SCHEME}

    def collate(self, conds):
        return padding.pad(conds, "prompt_embeds", MASK)

    def predict(self, denoiser, noisy, timesteps, cond, *, device, dtype):
        # one step of ZImagePipeline's loop: latents in the transformer's dtype with a frame axis, as a list;
        # the captions as a list at their own lengths; t -> (1000 - t) / 1000 in float32; the output stacked
        # and negated (what the scheduler steps with)
        latents = noisy.to(device, dtype).unsqueeze(2)
        captions = [c.to(device, dtype) for c in padding.unpad(cond["prompt_embeds"], cond.get(MASK))]
        t = (1000 - timesteps.to(device, torch.float32)) / 1000
        out = denoiser(list(latents.unbind(0)), t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


FAMILY = ZImageFamily
