"""Qwen-Image (Qwen-Image and its 2512 update, one architecture): a 60-block MMDiT over the last hidden state
of Qwen2.5-VL-7B, the 16-channel latents of a 3D-causal VAE normalised by its per-channel latents_mean and
latents_std, 2x2 packing, flow matching.

Every call mirrors what diffusers' QwenImagePipeline does (diffusers/pipelines/qwenimage/pipeline_qwenimage.py;
docs/families/qwen-image.md cites the lines): the prompt formatted into the pipeline's template and encoded
with its first `prompt_template_encode_start_idx` tokens dropped, the latents normalised as its decode step
inverts, the packing, `img_shapes`, the timestep scaling and the text mask. A cached prior is exactly what
the base model predicts in that pipeline.

Captions vary in length (`text_lengths_vary`): each is encoded alone, as the pipeline encodes one prompt, and
cached at its own length. `collate` pads every batch on the right to model.max_sequence_length tokens, with
the mask the pipeline builds for a padded batch (ones over each caption, zeros after), passed always. A
masked token changes nothing but rounding; padding to the batch's longest caption would make that rounding
depend on which captions share a batch (the image tokens' keys follow the text's in the joint attention, so
their place in every reduction moves with the padding), and a prior cached in one batch would not be what
training predicts in another. `prediction_settings` names the scheme, so priors made under another are
never found.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.families import padding
from pipeline.families.base import FlowMatchingFamily, place_text_encoders, text_encoder_loading
from pipeline.families.capabilities import PipelineSampling
from pipeline.families.qwenimage.kohya import QwenImageLayout
from pipeline.families.qwenimage.planning import DEFAULT_MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH, PLANNING

# each block's joint attention (image and text streams), then its two MLPs, then the modulation Linears and
# the embedders outside the blocks (every Linear of the model)
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
MLP = ["img_mlp.net.0.proj", "img_mlp.net.2"]
OTHER_LINEAR = ["img_mod.1", "txt_mod.1", "img_in", "txt_in", "proj_out", "norm_out.linear",
                "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"]
# The text stream's queries, its attention output and its MLP: only the image stream leaves the last block
# (the model's output is the image tokens'), so in the last block these layers make nothing the output
# depends on. A LoRA there would never get a gradient (and under DDP the processes would wait for it
# forever), so they are targeted in every block but the last.
TEXT_ATTENTION, TEXT_MLP = ["attn.add_q_proj", "attn.to_add_out"], ["txt_mlp.net.0.proj", "txt_mlp.net.2"]


def presets_for(num_layers: int | None) -> dict[str, list[str]]:
    """lora.targets' presets for a transformer of `num_layers` blocks (None: the text stream's layers in every
    block, which the planner's counts take)."""
    def text(layers):
        if num_layers is None:
            return [f"transformer_blocks.*.{m}" for m in layers]
        return [f"transformer_blocks.{i}.{m}" for i in range(num_layers - 1) for m in layers]

    attention = ATTENTION + text(TEXT_ATTENTION)
    mlp = MLP + text(TEXT_MLP)
    return {"attention": attention, "attention_mlp": attention + mlp, "all_linear": attention + mlp + OTHER_LINEAR}
PIPE = QwenImagePipeline  # its static helpers pack and unpack the latents


class QwenImageSampling(PipelineSampling):
    def pipeline_layout(self, cond):
        # a cached caption, unpadded, with its mask of ones, which the pipeline drops (it warns without one)
        masks = {f"{k}_mask": torch.ones(t.shape[:2], dtype=torch.long) for k, t in cond.items()
                 if k.endswith("prompt_embeds")}
        return {**cond, **masks}


class QwenImageFamily(FlowMatchingFamily):
    name = "qwenimage"
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer")
    denoiser_component = "transformer"
    denoiser_class = QwenImageTransformer2DModel
    pixel_multiple = 16  # VAE downsamples by 8, the 2x2 packing by 2 more
    default_max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
    target_presets = presets_for(None)  # the model folder's own, without its last block's dead layers: __init__
    default_target_modules = target_presets["attention"]
    swap_blocks = ("transformer_blocks",)  # 60 dual-stream blocks
    text_lengths_vary = True
    planning = PLANNING
    lora_layout = QwenImageLayout("transformer")
    # true classifier-free guidance outside the transformer, with a negative prompt ("" here)
    sampling = QwenImageSampling("QwenImagePipeline", negative_is_empty_caption=True)

    def __init__(self, root: Path, cfg: ModelConfig):
        super().__init__(root, cfg)
        self.refuse_other_pipelines("Qwen-Image")
        config = self.root / self.denoiser_component / "config.json"
        if config.is_file():
            self.target_presets = presets_for(json.loads(config.read_text()).get("num_layers", 60))
            self.default_target_modules = self.target_presets["attention"]
        if self.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise UserError(f"config key 'model.max_sequence_length' must be at most {MAX_SEQUENCE_LENGTH} for "
                            f"Qwen-Image (its pipeline refuses more), got {self.max_sequence_length}")

    # -- cache stage: latents ------------------------------------------------------------------------
    def load_vae(self, device, dtype):
        return AutoencoderKLQwenImage.from_pretrained(self.root, subfolder="vae", dtype=dtype).to(device).eval()

    def latent_shape(self, bucket):
        # the VAE halves the sides once per entry of temperal_downsample (the pipeline's vae_scale_factor)
        factor = 2 ** len(self._vae_config["temperal_downsample"])
        return (self._vae_config["z_dim"], bucket[0] // factor, bucket[1] // factor)

    @torch.no_grad()
    def encode_images(self, vae, pixels):
        # QwenImageImg2ImgPipeline._encode_vae_image: one frame (B,3,1,H,W), then (z - latents_mean) times
        # 1/latents_std, as written there; the distribution's mode, so a latent is a function of the image alone
        z = vae.encode(pixels.to(vae.device, vae.dtype)[:, :, None]).latent_dist.mode()
        c = vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return ((z - mean) * inv_std)[:, :, 0].float().cpu()

    # -- cache stage: text ---------------------------------------------------------------------------
    def load_text_encoders(self, device, dtype):
        # the pipeline itself, without transformer and VAE: its encode_prompt is the reference conditioning
        pipe = QwenImagePipeline.from_pretrained(self.root, transformer=None, vae=None, dtype=dtype,
                                                 **text_encoder_loading(self))
        return place_text_encoders(self, pipe, device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        # one caption at a time, as the pipeline encodes a single prompt: no padding, so an entry is a function
        # of its caption alone, whatever chunk it is computed in. The template and its dropped tokens, and the
        # cut at max_sequence_length, are encode_prompt's own.
        out = []
        for caption in captions:
            embeds, mask = encoders.encode_prompt([caption], device=encoders._execution_device,
                                                  max_sequence_length=self.max_sequence_length)
            assert mask is None  # one prompt has no padding
            out.append({"prompt_embeds": embeds[0].float().cpu()})
        return out

    # -- denoiser ------------------------------------------------------------------------------------
    def prediction_settings(self):
        # classifier-free guidance is outside the transformer (true_cfg_scale) and the model has no guidance
        # embedding: model.guidance changes no prediction. The padding does, by rounding: named here.
        return {"text_padding": f"right to {self.max_sequence_length} tokens, masked"}

    def collate(self, conds):
        # _get_qwen_prompt_embeds' padded batch: each caption, then zeros; the mask ones over each caption.
        # Always to max_sequence_length, not to the batch's longest: masked tokens still change the joint
        # attention's rounding, so a prior is exact only if every batch pads alike
        return padding.pad(conds, "prompt_embeds", "prompt_embeds_mask", length=self.max_sequence_length,
                           mask_dtype=torch.long)

    def predict(self, denoiser, noisy, timesteps, cond, *, device, dtype):
        b, c, h, w = noisy.shape
        packed = PIPE._pack_latents(noisy.to(device, dtype), b, c, h, w)  # the pipeline's (B,1,C,h,w) is this view
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(device, dtype) / 1000,  # the pipeline's order: cast, then scale
            guidance=None,
            encoder_hidden_states_mask=cond["prompt_embeds_mask"].to(device),
            encoder_hidden_states=cond["prompt_embeds"].to(device, dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return PIPE._unpack_latents(out, h, w, 1)[:, :, 0]  # vae_scale_factor=1: h, w are latent sizes


FAMILY = QwenImageFamily
