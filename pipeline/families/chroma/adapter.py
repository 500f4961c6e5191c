"""Chroma (Chroma1-HD, Chroma1-Base): FLUX.1's architecture with T5 alone (no CLIP, no pooled embedding), no
guidance, and a T5 attention mask that the transformer applies in every block.

Every call mirrors what diffusers' ChromaPipeline does (docs/families/chroma.md cites the lines): the prompt
embedded with the padding masked in T5 and the mask that unmasks one padding token for the transformer,
packing, ids, timestep scaling, the mask extended over the image tokens. A cached prior is exactly what the
base model predicts in that pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.families.base import FlowMatchingFamily, place_text_encoders, text_encoder_loading
from pipeline.families.capabilities import PipelineSampling
from pipeline.families.chroma.kohya import ChromaLayout
from pipeline.families.chroma.planning import DEFAULT_MAX_SEQUENCE_LENGTH, PLANNING

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# the single blocks' proj_out is their fused attention-and-MLP output (BFL's linear2); the top-level proj_out
# is the final layer, so it is named with its block
MLP = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
       "single_transformer_blocks.*.proj_out"]
# the embedders and the final layer. Not the approximator (distilled_guidance_layer): ComfyUI has no name for
# its diffusers modules (kohya.py), so a LoRA there would load in diffusers only. Chroma's blocks have no
# modulation Linears (norm1.linear...): the approximator computes every block's modulation.
OTHER_LINEAR = ["x_embedder", "context_embedder", "proj_out"]


class ChromaFamily(FlowMatchingFamily):
    name = "chroma"
    pipeline_classes = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer")
    denoiser_component = "transformer"
    denoiser_class = ChromaTransformer2DModel
    pixel_multiple = 16  # VAE downsamples by 8, packing by 2 more
    target_presets = {"attention": ATTENTION, "attention_mlp": ATTENTION + MLP,
                      "all_linear": ATTENTION + MLP + OTHER_LINEAR}
    default_target_modules = target_presets["attention"]  # attention projections of both kinds of block
    swap_blocks = ("transformer_blocks", "single_transformer_blocks")  # 19 double-, then 38 single-stream
    default_max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
    # the capabilities: planning.py, kohya.py, and the pipeline that renders samples; its classifier-free
    # guidance encodes "" as the negative prompt (Chroma has no guidance embedding)
    planning = PLANNING
    lora_layout = ChromaLayout(denoiser_component)
    sampling = PipelineSampling("ChromaPipeline", negative_is_empty_caption=True)

    def __init__(self, root: Path, cfg: ModelConfig):
        super().__init__(root, cfg)
        self.refuse_other_pipelines("Chroma")
        if self.max_sequence_length > DEFAULT_MAX_SEQUENCE_LENGTH:
            raise UserError(f"config key 'model.max_sequence_length' must be at most {DEFAULT_MAX_SEQUENCE_LENGTH} "
                            f"for Chroma (its pipeline refuses more), got {self.max_sequence_length}")

    # -- cache stage: encoders (the VAE's are FolderFamily's) --------------------------------------
    def load_text_encoders(self, device, dtype):
        # The pipeline itself, without transformer and VAE: its encode_prompt is the reference conditioning.
        pipe = ChromaPipeline.from_pretrained(self.root, transformer=None, vae=None, dtype=dtype,
                                              **text_encoder_loading(self))
        return place_text_encoders(self, pipe, device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        # T5 runs with the padding masked; the mask it returns unmasks the first padding token too, as the
        # transformer is to see it (0/1 values: exact in float32)
        embeds, _, mask, *_ = encoders.encode_prompt(
            captions, device=encoders._execution_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return [{"prompt_embeds": e.float().cpu(), "prompt_attention_mask": m.float().cpu()} for e, m in zip(embeds, mask)]

    # -- denoiser ---------------------------------------------------------------------------------
    def prediction_settings(self):
        # no guidance embedding (classifier-free guidance happens outside the transformer); the mask rule
        # is the pipeline's, named so that priors made under another rule are never found
        return {"attention_mask": "t5 tokens + 1 padding, additive"}

    def load_denoiser(self, device, dtype):
        model = super().load_denoiser(device, dtype)
        _mask_under_checkpointing(model)
        return model

    def predict(self, denoiser, noisy, timesteps, cond, *, device, dtype):
        b, c, h, w = noisy.shape
        packed = ChromaPipeline._pack_latents(noisy.to(device, dtype), b, c, h, w)
        img_ids = ChromaPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        embeds = cond["prompt_embeds"].to(device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        # the text mask extended with ones over the image tokens, in the embeddings' dtype: the transformer
        # passes it to attention as it is, so SDPA adds it to the scores (diffusers' behaviour, kept exactly)
        mask = ChromaPipeline._prepare_attention_mask(
            None, b, packed.shape[1], dtype, cond["prompt_attention_mask"].to(device, dtype)
        )
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps.to(device, dtype) / 1000,  # the pipeline's order: cast, then scale
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            attention_mask=mask,
            return_dict=False,
        )[0]
        return ChromaPipeline._unpack_latents(out, h, w, 1)  # vae_scale_factor=1: h, w are latent sizes


def _mask_under_checkpointing(model: torch.nn.Module) -> None:
    """Give the single blocks the attention mask under gradient checkpointing too. diffusers'
    ChromaTransformer2DModel.forward calls a checkpointed single block without it (its double blocks get
    it), so training with train.gradient_checkpointing would predict otherwise than the pipeline and the
    cached priors. The model's pre-hook keeps the mask of its current forward; each single block's hook
    passes it where the call left it out: in the checkpointed forward and in its recomputation during
    that batch's backward (which comes before the next forward)."""
    held: dict[str, torch.Tensor | None] = {}

    def keep(module, args, kwargs):
        held["mask"] = kwargs.get("attention_mask")

    def give(block, args, kwargs):
        if len(args) < 4 and kwargs.get("attention_mask") is None:
            return args, {**kwargs, "attention_mask": held.get("mask")}
        return None

    model.register_forward_pre_hook(keep, with_kwargs=True)
    for block in model.single_transformer_blocks:
        block.register_forward_pre_hook(give, with_kwargs=True)


FAMILY = ChromaFamily
