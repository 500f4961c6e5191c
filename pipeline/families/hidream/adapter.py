"""HiDream-I1 (Full, Dev, Fast): two CLIP pooled embeddings, T5 and every Llama-3.1 hidden layer as
conditioning, an MoE transformer that patchifies unpacked latents itself, flow matching.

Every call mirrors what diffusers' HiDreamImagePipeline does inside one denoising step (unpacked latents,
timesteps on the scheduler's 0..1000 scale, the sign flip of the transformer's output), so a cached prior
is exactly what the base model predicts in that pipeline.
"""

from __future__ import annotations

import functools
import json
from types import MappingProxyType
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
from diffusers import HiDreamImageTransformer2DModel

from pipeline import quantize
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.families.base import FlowMatchingFamily, place_text_encoders, text_encoder_loading
from pipeline.families.capabilities import Sampling
from pipeline.families.hidream.kohya import HiDreamLayout
from pipeline.families.hidream.planning import DEFAULT_MAX_SEQUENCE_LENGTH, PLANNING

ATTENTION = ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"]
# Feed-forwards that get a gradient: the text stream's, the shared experts' (and ff_i's where a model has
# no MoE). The routed experts do not: diffusers runs them under no_grad in the inference MoE path that
# training must use (see load_denoiser), so an adapter there would never move. The MoE gate is a bare
# Parameter, not an nn.Linear, so peft cannot wrap it anyway.
MLP = ["ff_i.w1", "ff_i.w2", "ff_i.w3", "shared_experts.w1", "shared_experts.w2", "shared_experts.w3",
       "ff_t.w1", "ff_t.w2", "ff_t.w3"]
# The remaining Linears: adaLN modulations, caption projections and final linear ("linear"), the patch
# embedding ("proj") and the timestep/pooled embedders.
OTHER_LINEAR = ["adaLN_modulation.1", "linear", "proj", "linear_1", "linear_2"]


class HiDreamSampling(Sampling):
    pipeline_class = "HiDreamImagePipeline"
    negative_is_empty_caption = True  # its pipeline encodes "" as the negative prompt for guidance

    def pipeline_layout(self, cond: dict) -> dict:
        """Batched cached conditioning in HiDreamImagePipeline's argument layout: Llama layers first."""
        return {k: t.transpose(0, 1).contiguous() if k.endswith("prompt_embeds_llama3") else t for k, t in cond.items()}


class HiDreamFamily(FlowMatchingFamily):
    name = "hidream"
    pipeline_classes = ("HiDreamImagePipeline",)
    vae_components = ("vae",)
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3",
                       "text_encoder_4", "tokenizer_4")
    denoiser_component = "transformer"
    denoiser_class = HiDreamImageTransformer2DModel
    pixel_multiple = 16  # VAE downsamples by 8, 2x2 patches by 2 more
    swap_blocks = ("double_stream_blocks", "single_stream_blocks")  # 16 and 32 in HiDream-I1
    default_max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH
    # uniform over the model's shifted table, as diffusers' HiDream LoRA script draws (its --weighting_scheme
    # default, over a shift-3.0 table); logit-normal on top of a shift would starve the low-noise end
    # (with Dev's shift 6, sigma < 0.2 would almost never be drawn)
    default_timestep_sampling = "uniform"
    target_presets = {
        "attention": ATTENTION,  # image- and text-stream projections of every block
        "attention_mlp": ATTENTION + MLP,
        "all_linear": ATTENTION + MLP + OTHER_LINEAR,
    }
    default_target_modules = target_presets["attention"]
    # the capabilities: planning.py, kohya.py, and the pipeline that renders samples (above)
    planning = PLANNING
    lora_layout = HiDreamLayout()
    sampling = HiDreamSampling()

    def __init__(self, root: Path, cfg: ModelConfig):
        super().__init__(root, cfg)
        if self.denoiser_file is not None:  # otherwise the file would be fingerprinted but not loaded
            raise UserError("config key 'model.denoiser_file' is for Flux and SDXL single-file checkpoints; "
                            "give HiDream as a diffusers folder")

    # -- cache stage: encoders (the VAE's are FolderFamily's) --------------------------------------
    def load_text_encoders(self, device, dtype):
        """The pipeline without transformer and VAE: its encode_prompt is the reference conditioning.
        HiDream's repositories ship no Llama (model_index.json lists no text_encoder_4), so a Llama placed
        in the folder as text_encoder_4/ (its tokenizer in tokenizer_4/ or beside it, as the Llama
        repository has it) is loaded here and handed to the pipeline, as its constructor arguments."""
        llama = self.root / "text_encoder_4"
        if not (llama / "config.json").is_file():
            raise UserError(
                f"model.path: '{self.root}' has no text_encoder_4 (HiDream's Llama-3.1-8B-Instruct): download it "
                f"into that folder (hf download meta-llama/Meta-Llama-3.1-8B-Instruct --local-dir {llama} "
                f"--exclude 'original/*'), see docs/families/hidream.md"
            )
        index = json.loads((self.root / "model_index.json").read_text())
        listed = lambda name: bool((index.get(name) or [None])[0])  # noqa: E731
        extra = {}
        if not listed("text_encoder_4"):
            from transformers import LlamaForCausalLM

            scheme = self.cfg.text_encoder_quantize  # as text_encoder_loading quantizes the folder's encoders
            kwargs = {} if scheme == "none" else {"quantization_config": quantize.text_encoder_config(scheme)}
            extra["text_encoder_4"] = LlamaForCausalLM.from_pretrained(llama, dtype=dtype, **kwargs)
        if not listed("tokenizer_4") or not (self.root / "tokenizer_4").is_dir():
            from transformers import AutoTokenizer

            tokenizer = self.root / "tokenizer_4" if (self.root / "tokenizer_4").is_dir() else llama
            extra["tokenizer_4"] = AutoTokenizer.from_pretrained(tokenizer)
        pipe = HiDreamImagePipeline.from_pretrained(self.root, transformer=None, vae=None, dtype=dtype, **extra,
                                                    **text_encoder_loading(self))
        return place_text_encoders(self, pipe, device)

    @torch.no_grad()
    def encode_captions(self, encoders, captions):
        t5, _, llama, _, pooled, _ = encoders.encode_prompt(
            captions, device=encoders._execution_device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        # llama: (layers, B, tokens, D), every hidden layer as the pipeline returns it. The transformer picks
        # its config's llama_layers from it; I1 uses all 32, so a subset would save nothing there, while it
        # would tie these entries to a transformer config that the text key does not cover.
        return [
            {"prompt_embeds_t5": t.float().cpu(), "prompt_embeds_llama3": l.float().cpu(),
             "pooled_prompt_embeds": p.float().cpu()}
            for t, l, p in zip(t5, llama.transpose(0, 1), pooled)
        ]

    # -- timesteps --------------------------------------------------------------------------------
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """The flow-matching training table with the model's own fixed shift: I1-Dev and -Fast ship a
        FlowMatchEuler config (shift 6.0 and 3.0); I1-Full ships UniPC with flow_shift 3.0, rebuilt here as
        FlowMatchEuler with that shift (diffusers' HiDream LoRA script uses shift 3.0 for every variant)."""
        if self._scheduler is None:
            config = json.loads((self.root / "scheduler" / "scheduler_config.json").read_text())
            if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
                self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler")
            else:
                shift = config.get("flow_shift") or config.get("shift") or 3.0
                self._scheduler = FlowMatchEulerDiscreteScheduler(
                    num_train_timesteps=config.get("num_train_timesteps", 1000), shift=shift
                )
        return self._scheduler

    # -- denoiser ---------------------------------------------------------------------------------
    # force_inference_output, as diffusers' HiDream LoRA script: in train() mode the transformer would
    # otherwise route the MoE differently and return patch-major output; with it, train() and eval()
    # give the same prediction bit for bit, so a cached prior is the training forward's step-0 output.
    denoiser_kwargs = MappingProxyType({"force_inference_output": True})

    def prediction_settings(self):
        return {}  # no guidance embedding; classifier-free guidance happens outside the transformer

    @functools.cached_property
    def _llama_layers(self) -> list[int]:
        return json.loads((self.root / "transformer" / "config.json").read_text())["llama_layers"]

    def predict(self, denoiser, noisy, timesteps, cond, *, device, dtype):
        llama = cond["prompt_embeds_llama3"]  # (B, layers, tokens, D) as cached
        if max(self._llama_layers) >= llama.shape[1]:
            raise UserError(f"the cached Llama embeddings hold {llama.shape[1]} layers but the transformer in "
                            f"'{self.root}' reads layer {max(self._llama_layers)}: is text_encoder_4 the right Llama?")
        out = denoiser(
            hidden_states=noisy.to(device, dtype),  # unpacked: the transformer patchifies itself
            timesteps=timesteps.to(device),  # float32 on the 0..1000 scale, as the pipeline passes them
            encoder_hidden_states_t5=cond["prompt_embeds_t5"].to(device, dtype),
            encoder_hidden_states_llama3=llama.to(device, dtype).transpose(0, 1).contiguous(),  # layers first
            pooled_embeds=cond["pooled_prompt_embeds"].to(device, dtype),
            return_dict=False,
        )[0]
        # The pipeline steps its flow-matching scheduler with -output: the transformer predicts x0 - noise.
        # Negated, the prediction is the velocity noise - x0, the same quantity as target(); a sign flip is
        # exact, so priors stay bitwise what the pipeline computes.
        return -out


FAMILY = HiDreamFamily
