"""FLUX.2 klein (4B, 9B; base and distilled) and FLUX.2 dev: 2x2-patchified latents normalised with the VAE's
batch-norm statistics, 4-axis position ids, flow matching. klein stacks its Qwen3's hidden layers 9, 18 and
27 as the text conditioning and passes no guidance; dev stacks its Mistral 3's layers 10, 20 and 30 of a
chat with BFL's system message, and embeds the guidance (model.guidance, in the prior key).

Every call mirrors what diffusers' pipelines do (diffusers/pipelines/flux2/pipeline_flux2_klein.py and
pipeline_flux2.py: encode_prompt for the text, _encode_vae_image for the latents, one step of the denoising
loop for `predict`), so a cached prior is exactly what the base model predicts in that pipeline. Which
pipeline a folder is for is its model_index.json's class: Flux2KleinPipeline or Flux2Pipeline (dev).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.families.base import FlowMatchingFamily, place_text_encoders, text_encoder_loading
from pipeline.families.capabilities import PipelineSampling
from pipeline.families.flux2.kohya import Flux2Layout
from pipeline.families.flux2.planning import DEV_TEXT_LAYERS, PLANNING, TEXT_LAYERS

# the double blocks' attention (both streams), and the single blocks' fused q, k, v and MLP input with their
# fused output: the layers diffusers' FLUX.2 LoRA scripts train by default
_attention = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
              "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out"]
_mlp = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
_rest = ["double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
         "single_stream_modulation.linear", "timestep_embedder.linear_1", "timestep_embedder.linear_2",
         "guidance_embedder.linear_1", "guidance_embedder.linear_2", "x_embedder", "context_embedder", "proj_out",
         "norm_out.linear"]
PIPE = Flux2KleinPipeline  # its static helpers build the ids, the patches and the packing (Flux2Pipeline's are
# the same code)


class Flux2Family(FlowMatchingFamily):
    name = "flux2"
    pipeline_classes = ("Flux2KleinPipeline", "Flux2Pipeline")
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer")
    denoiser_component = "transformer"
    denoiser_class = Flux2Transformer2DModel
    pixel_multiple = 16  # VAE downsamples by 8, the 2x2 patches by 2 more
    default_max_sequence_length = 512  # both pipelines' default
    target_presets = {"attention": _attention, "attention_mlp": _attention + _mlp,
                      "all_linear": _attention + _mlp + _rest}
    default_target_modules = target_presets["attention"]
    swap_blocks = ("transformer_blocks", "single_transformer_blocks")  # klein 4B: 5 double, 20 single
    planning = PLANNING
    # Flux2LoraLoaderMixin.load_lora_weights reads a LoKr file in peft's names (tests/test_flux2.py)
    pipeline_adapter_types = ("lora", "lokr")
    lora_layout = Flux2Layout("transformer")
    # base klein's classifier-free guidance encodes "" as the negative prompt (dev's own, in __init__)
    sampling = PipelineSampling("Flux2KleinPipeline", negative_is_empty_caption=True)

    def __init__(self, root: Path, cfg: ModelConfig):
        super().__init__(root, cfg)
        index = self.root / "model_index.json"
        cls = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
        self.dev = cls == "Flux2Pipeline"
        self.pipeline = Flux2Pipeline if self.dev else Flux2KleinPipeline
        self.text_layers = DEV_TEXT_LAYERS if self.dev else TEXT_LAYERS
        if self.dev:  # its guidance is embedded: no negative prompt
            self.sampling = PipelineSampling("Flux2Pipeline")

    def single_file_checkpoint(self):
        # diffusers' FLUX.2 converter reads BFL's names as BFL's files have them (double_blocks.0...), not with
        # the "model.diffusion_model." that ComfyUI's checkpoints put before them: that prefix is dropped here
        from safetensors import safe_open
        from safetensors.torch import load_file

        prefix = "model.diffusion_model."
        with safe_open(str(self.denoiser_file), "pt") as f:
            prefixed = all(k.startswith(prefix) for k in f.keys())
        if not prefixed:
            return str(self.denoiser_file)
        return {k[len(prefix):]: v for k, v in load_file(str(self.denoiser_file)).items()}

    # -- cache stage: latents ------------------------------------------------------------------------
    def load_vae(self, device, dtype):
        return AutoencoderKLFlux2.from_pretrained(self.root, subfolder="vae", dtype=dtype).to(device).eval()

    def latent_shape(self, bucket):
        # the VAE halves the sides once per block after the first; the 2x2 patches halve them again and
        # hold 4x the channels
        factor = 2 ** (len(self._vae_config["block_out_channels"]) - 1) * 2
        return (self._vae_config["latent_channels"] * 4, bucket[0] // factor, bucket[1] // factor)

    @torch.no_grad()
    def encode_images(self, vae, pixels):
        # Flux2KleinPipeline._encode_vae_image (and the klein training script): the distribution's mode,
        # 2x2 patches, then (z - running_mean) / sqrt(running_var + eps) of the VAE's batch norm, the inverse
        # of what the pipeline does before decoding
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        z = PIPE._patchify_latents(z)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return ((z - mean) / std).float().cpu()

    # -- cache stage: text ---------------------------------------------------------------------------
    def load_text_encoders(self, device, dtype):
        config = self.root / "text_encoder" / "config.json"
        settings = json.loads(config.read_text()) if config.is_file() else {}
        which, wanted = ("dev", "Mistral3ForConditionalGeneration") if self.dev else ("klein", "Qwen3ForCausalLM")
        found = (settings.get("architectures") or [wanted])[0]
        if found != wanted:  # e.g. a klein folder whose model_index.json was changed to dev's pipeline
            raise UserError(f"model.path: '{config}' is a {found}; FLUX.2 {which} ({self.pipeline.__name__} in "
                            f"model_index.json) encodes text with {wanted}")
        # Mistral 3 nests its language model's config
        layers = settings.get("text_config", settings).get("num_hidden_layers", 0)
        if layers < max(self.text_layers):  # hidden_states[0] is the embeddings, [k] the output of layer k
            raise UserError(f"model.path: '{config}' has {layers} hidden layers; FLUX.2 {which} stacks the "
                            f"hidden states of layers {', '.join(map(str, self.text_layers))}, so it needs at "
                            f"least {max(self.text_layers)} (is this {which}'s {wanted}?)")
        # the pipeline itself, without transformer and VAE: its encode_prompt is the reference conditioning
        pipe = self.pipeline.from_pretrained(self.root, transformer=None, vae=None, dtype=dtype,
                                             **text_encoder_loading(self))
        return place_text_encoders(self, pipe, device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        # the chat template, padding to max_sequence_length and the stacked layers are the pipeline's own;
        # text_ids depend only on the length and are rebuilt in predict
        embeds, _ = encoders.encode_prompt(captions, device=encoders._execution_device,
                                           max_sequence_length=self.max_sequence_length,
                                           text_encoder_out_layers=self.text_layers)
        return [{"prompt_embeds": e.float().cpu()} for e in embeds]

    # -- timesteps -----------------------------------------------------------------------------------
    def shifted_table(self, shift, latent_hw):
        """As FlowMatchingFamily's, but cache.dynamic_shift takes the pipeline's mu: compute_empirical_mu of
        the number of image tokens (one per patchified latent position) at the pipeline's default 50 steps."""
        if latent_hw is None:
            return super().shifted_table(shift, None)
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        s = self.scheduler()
        n = s.config.num_train_timesteps
        base = torch.linspace(1, n, n).flip(0) / n
        sigmas = s.time_shift(compute_empirical_mu(latent_hw[0] * latent_hw[1], 50), 1.0, base)
        return (sigmas * n).float(), sigmas.float()

    # -- denoiser ------------------------------------------------------------------------------------
    def prediction_settings(self):
        # Flux2KleinPipeline passes guidance=None to the transformer whatever its config's guidance_embeds
        # says, and a guidance scale above 1 is classifier-free guidance outside it: model.guidance changes
        # no klein prediction. dev's pipeline embeds its guidance_scale: model.guidance is that value.
        return {"guidance": self.cfg.guidance} if self.dev else {}

    def predict(self, denoiser, noisy, timesteps, cond, *, device, dtype):
        b, c, h, w = noisy.shape
        x = noisy.to(device, dtype)
        img_ids = PIPE._prepare_latent_ids(x).to(device)  # (t, h, w, l) = (0, row, column, 0)
        embeds = cond["prompt_embeds"].to(device, dtype)
        txt_ids = PIPE._prepare_text_ids(embeds).to(device)  # (0, 0, 0, token)
        packed = PIPE._pack_latents(x)
        # Flux2Pipeline: float32 guidance_scale per sample (the transformer casts and scales it by 1000)
        guidance = torch.full([b], self.cfg.guidance, device=device, dtype=torch.float32) if self.dev else None
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(device, dtype) / 1000,  # the pipeline's order: cast, then scale
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return PIPE._unpack_latents_with_ids(out[:, : packed.size(1)], img_ids, h, w)


FAMILY = Flux2Family
