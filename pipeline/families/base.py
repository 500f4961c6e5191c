"""The interface every family implements (`Family`), and what families share: `FolderFamily` (a diffusers
model folder, latents from the VAE's mode, the denoiser from the folder or one file) and
`FlowMatchingFamily` (rectified-flow noise, targets, timestep table and SD3 loss weightings), and rendering
through the family's own pipeline (its `sampling` capability).

Methods never read `.device`, `.dtype` or `.config` off the denoiser they are handed: under DDP or FSDP
that object is a wrapper without them. The caller passes the device and dtype; what a family needs of
the denoiser's config it reads from the model folder.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_loss_weighting_for_sd3

from pipeline import objective, quantize
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.families.capabilities import LoraLayout, Planning, Sampling, require


class Family(Protocol):
    """What the cache and train stages ask of a family. What only some consumers need is a capability
    (capabilities.py), reached through `planning`, `lora_layout` and `sampling`: None where it lacks it."""

    name: str
    pipeline_classes: tuple[str, ...]  # the diffusers pipelines whose folders this family reads (detection)
    root: Path  # the local diffusers folder
    vae_components: tuple[str, ...]  # subfolders whose weights the latents depend on
    text_components: tuple[str, ...]  # ... the text embeddings
    denoiser_component: str  # ... the priors
    denoiser_file: Path | None  # model.denoiser_file: the denoiser's weights in one file (config from the folder)
    denoiser_class: Any  # the diffusers model class of the denoiser (built from a config by the planner)
    pixel_multiple: int  # image sides (and bucket sides) must be multiples of this
    # LoRA targets: peft module-name suffixes (a name, or its tail after a dot; `*` matches a block index)
    # for "attention" (the default), "attention_mlp" and "all_linear"; default_target_modules is the first
    target_presets: dict[str, list[str]]
    default_target_modules: list[str]
    default_timestep_sampling: str  # what cache.timestep_sampling = "auto" means: "uniform" | "logit_normal" | "mode"
    loss_weightings: tuple[str, ...]  # the train.loss_weighting values this family supports
    max_sequence_length: int  # text tokens per caption: model.max_sequence_length, or the family's own
    # Optional members, with their defaults:
    # names of the denoiser's ModuleLists of transformer blocks, in forward order: what train.blocks_to_swap
    # swaps (pipeline/denoiser/swap.py); empty: the family refuses the key
    swap_blocks: tuple[str, ...] = ()
    # captions encode to as many tokens as they have (no padding to max_sequence_length): the text entries'
    # first axis differs between captions (pipeline/data/schema.py checks the rest of their shapes)
    text_lengths_vary: bool = False
    denoiser_kwargs: Mapping[str, Any] = MappingProxyType({})  # passed to the denoiser class when it is built
    # the lora.type values whose diffusers-format file the family's pipeline's load_lora_weights reads
    # (diffusers 0.42 reads LoKr for FLUX.2 and Z-Image; every denoiser's load_lora_adapter reads a LoKr)
    pipeline_adapter_types: tuple[str, ...] = ("lora",)
    # the capabilities (capabilities.py); None: the family lacks it
    planning: Planning | None = None
    lora_layout: LoraLayout | None = None
    sampling: Sampling | None = None

    def load_vae(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    def encode_images(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> latents (B,C,h,w) float32 as the denoiser sees them (deterministic)."""

    def latent_shape(self, bucket: tuple[int, int]) -> tuple[int, ...]:
        """The shape (C,h,w) encode_images gives an image of this bucket (height, width) in pixels: what a
        cached latent, and a cached prior, of that bucket must have (pipeline/data/schema.py)."""

    def load_text_encoders(self, device: torch.device, dtype: torch.dtype) -> Any: ...

    def encode_captions(self, encoders: Any, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """One dict of conditioning tensors (float32, no batch dim) per caption."""

    def timestep_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scheduler's training timesteps and their sigmas (the distribution's support)."""

    def timestep_spec(self) -> dict:
        """Everything about the timestep table that the noise entries depend on."""

    def load_denoiser(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    def noisy_input(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        """x_t from clean latents (B,C,h,w), noise, the drawn timesteps (B,) and their sigmas (B,)."""

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser should predict for a standard sample (flow: noise - x0; epsilon; v). A new
        tensor: the caller writes the prior targets into it."""

    def loss_weights(self, train: Any, timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (B,) for train.loss_weighting; UserError for a scheme it does not support."""

    def predict(
        self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
        *, device: torch.device, dtype: torch.dtype,
    ) -> torch.Tensor:
        """One denoiser forward: noisy latents (B,C,h,w), timesteps (B,) on the scheduler's 0..1000 scale,
        batched conditioning -> prediction (B,C,h,w) in `dtype`, on `device` (where the denoiser's weights
        are, in the dtype it was loaded in). `cond` holds the text entry's tensors plus the image geometry
        cached with the latent: original_size (B,2) as (height, width) and crop_top_left (B,2) as (top, left),
        in pixels, float32."""

    def shifted_table(self, shift: float, latent_hw: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training table under cache.shift (fixed) or cache.dynamic_shift (by latent size). Only
        flow-matching families have one; the default refuses the keys."""
        key = "cache.shift" if shift else "cache.dynamic_shift"
        raise UserError(f"config key '{key}' is for flow-matching models (Flux, HiDream), not {self.name}")

    def prediction_settings(self) -> dict:
        """Settings outside the weights that change a prediction (guidance...): part of the prior key."""

    def collate(self, conds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch of conditioning from per-sample entries. Stacking needs equal shapes; a family whose
        text embeddings vary in length pads here and adds its attention mask."""
        return {k: torch.stack([c[k] for c in conds]) for k in conds[0]}


class FolderFamily(Family):
    """A diffusers model folder, latents from its VAE's mode, and the denoiser from the folder or from one
    file (model.denoiser_file). A family sets `denoiser_class`."""

    def __init__(self, root: Path, cfg: ModelConfig):
        self.root = Path(root)
        self.cfg = cfg
        self.denoiser_file = Path(cfg.denoiser_file) if cfg.denoiser_file else None
        self.training_adapter = Path(cfg.training_adapter) if cfg.training_adapter else None
        self._scheduler = None

    def refuse_other_pipelines(self, label: str) -> None:
        """One line when model.family names this family over a folder of another pipeline. The planner's
        folders of public configs have no model_index.json: nothing to check there."""
        index = self.root / "model_index.json"
        if not index.is_file():
            return
        found = json.loads(index.read_text()).get("_class_name", "")
        if found not in self.pipeline_classes:
            raise UserError(f"model.path: '{self.root}' holds a {found or 'pipeline without _class_name'}, "
                            f"not a {label} model (model.family = \"{self.name}\")")

    @property
    def max_sequence_length(self) -> int:
        return self.cfg.max_sequence_length or self.default_max_sequence_length

    def load_vae(self, device, dtype):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.root, subfolder="vae", dtype=dtype).to(device).eval()

    @functools.cached_property
    def _vae_config(self) -> dict:
        return json.loads((self.root / "vae" / "config.json").read_text())

    def latent_shape(self, bucket):
        # AutoencoderKL halves the sides once per block after the first
        factor = 2 ** (len(self._vae_config["block_out_channels"]) - 1)
        return (self._vae_config["latent_channels"], bucket[0] // factor, bucket[1] // factor)

    @torch.no_grad()
    def encode_images(self, vae, pixels):
        # The distribution's mode, not a sample: the latent of an image is then a pure function of its bytes.
        # Then the pipelines' inverse of their decode step (SDXL's VAE has no shift).
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
        if vae.config.shift_factor is not None:
            z = z - vae.config.shift_factor
        return (z * vae.config.scaling_factor).cpu()

    def single_file_checkpoint(self) -> str | dict:
        """What model.denoiser_file hands diffusers' from_single_file: the path (its converter reads the
        layout), or a state dict a family has renamed first."""
        return str(self.denoiser_file)

    def load_denoiser(self, device, dtype):
        cls, sub, kwargs = self.denoiser_class, self.denoiser_component, dict(self.denoiser_kwargs)
        scheme = self.cfg.quantize
        if scheme != "none":  # model.quantize: diffusers quantizes the Linear weights as it loads them
            skip = quantize.unquantizable(cls, self.root, sub, scheme)
            kwargs["quantization_config"] = quantize.diffusers_config(scheme, skip)
        if self.denoiser_file is not None:  # weights from one file, the config from the folder
            try:
                model = cls.from_single_file(self.single_file_checkpoint(), config=str(self.root), subfolder=sub,
                                             dtype=dtype, **kwargs)
            except (KeyError, ValueError, RuntimeError, IndexError) as e:  # the converter's, on keys it lacks
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise UserError(f"model.denoiser_file: '{self.denoiser_file}' does not load as the {sub} of "
                                f"'{self.root}' ({cls.__name__}): {type(e).__name__} {first[:200]}") from None
        else:
            model = cls.from_pretrained(self.root, subfolder=sub, dtype=dtype, **kwargs)
        if scheme != "none":
            quantize.report(model, scheme, sub)
        if self.training_adapter is not None:
            merge_training_adapter(self, model)
        return model.to(device).eval().requires_grad_(False)


def merge_training_adapter(family: Family, model: torch.nn.Module) -> None:
    """Merge model.training_adapter into the loaded denoiser's weights, for good (`model` is then a plain
    denoiser again, which the trained LoRA goes on). The file is read as the family's pipeline reads LoRA
    files (its lora_state_dict converts the layouts it knows), and every module it names must be there."""
    import diffusers

    path = family.training_adapter
    loader = getattr(diffusers, require(family, "sampling", "config key 'model.training_adapter'").pipeline_class)
    name = "training_adapter"
    try:
        state_dict, metadata = loader.lora_state_dict(str(path), return_lora_metadata=True)
        model.load_lora_adapter(state_dict, prefix=family.denoiser_component, adapter_name=name, metadata=metadata)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        model.delete_adapters(name) if name in getattr(model, "peft_config", {}) else None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.training_adapter: '{path}' is not a LoRA the {family.name} denoiser takes ({first})") from None
    from peft.tuners.tuners_utils import BaseTunerLayer

    # every module the file names got its adapter (load_lora_adapter only warns about the others)
    wanted = {k.removeprefix(f"{family.denoiser_component}.").rsplit(".lora_", 1)[0].rsplit(".lokr_", 1)[0]
              for k in state_dict}
    placed = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and name in m.active_adapters}
    if not wanted <= placed:
        missing = sorted(wanted - placed)
        raise UserError(f"model.training_adapter: '{path}' names {len(missing)} module(s) the {family.name} denoiser "
                        f"does not have (first: {missing[0]})")
    model.fuse_lora(adapter_names=[name])
    model.unload_lora()


class FlowMatchingFamily(FolderFamily):
    """Rectified flow as in the SD3 paper and diffusers' Flux/SD3 training scripts: x_t = (1 - sigma) x0 +
    sigma noise, target noise - x0, timesteps from the flow-matching scheduler's training table."""

    # logit-normal over the unshifted table: the SD3 paper's finding (diffusers' Flux scripts offer it as
    # --weighting_scheme logit_normal; their default is uniform). A family whose table is already shifted
    # draws uniformly over it (HiDream).
    default_timestep_sampling = "logit_normal"
    loss_weightings = ("none", "sigma_sqrt", "cosmap")  # diffusers' compute_loss_weighting_for_sd3

    def __init__(self, root: Path, cfg: ModelConfig):
        super().__init__(root, cfg)
        if cfg.prediction_type:
            raise UserError(f"config key 'model.prediction_type' is for epsilon/v-prediction models (SDXL); "
                            f"{self.name} is a flow-matching model")

    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        if self._scheduler is None:
            self._scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.root, subfolder="scheduler")
        return self._scheduler

    def timestep_table(self):
        # the scheduler's training table: sigma = shift(t / num_train_timesteps), no shift when the model
        # shifts dynamically at inference (Flux)
        s = self.scheduler()
        return s.timesteps.float(), s.sigmas[: len(s.timesteps)].float()

    def timestep_spec(self):
        c = self.scheduler().config
        return {k: c.get(k) for k in ("num_train_timesteps", "shift", "use_dynamic_shifting")}

    def shifted_table(self, shift: float, latent_hw: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training table with cache.shift instead of the model's own: the fixed shift `shift`, or with
        `latent_hw`, the resolution-dependent one Flux's pipeline uses at inference (mu from the number of
        2x2 latent patches, through the scheduler's own time_shift and its config's base/max shift)."""
        s = self.scheduler()
        n = s.config.num_train_timesteps
        base = torch.linspace(1, n, n).flip(0) / n  # the scheduler's unshifted sigmas, 1 .. 1/n
        if latent_hw is None:
            sigmas = shift * base / (1 + (shift - 1) * base)
        else:
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            c = s.config
            mu = calculate_shift((latent_hw[0] // 2) * (latent_hw[1] // 2), c.base_image_seq_len, c.max_image_seq_len,
                                 c.base_shift, c.max_shift)
            sigmas = s.time_shift(mu, 1.0, base)
        return (sigmas * n).float(), sigmas.float()

    def noisy_input(self, latents, noise, timesteps, sigmas):
        return objective.flow_noisy(latents, noise, sigmas)

    def target(self, latents, noise, timesteps):
        return objective.flow_target(latents, noise)

    def loss_weights(self, train, timesteps, sigmas):
        if train.loss_weighting not in self.loss_weightings:
            raise UserError(f"config key 'train.loss_weighting' must be one of {', '.join(self.loss_weightings)} "
                            f"for {self.name} (min_snr is for epsilon/v-prediction models such as SDXL)")
        return compute_loss_weighting_for_sd3(train.loss_weighting, sigmas)


def text_encoder_names(family: Family) -> list[str]:
    """The family's text encoder components (its text_components less the tokenizers)."""
    return [c for c in family.text_components if c.startswith("text_encoder")]


def text_encoder_loading(family: Family) -> dict:
    """from_pretrained kwargs for the family's pipeline (its text encoders alone) under
    model.text_encoder_quantize: each text encoder quantized by transformers as it loads."""
    scheme = family.cfg.text_encoder_quantize
    if scheme == "none":
        return {}
    from diffusers import PipelineQuantizationConfig

    config = quantize.text_encoder_config(scheme)
    return {"quantization_config": PipelineQuantizationConfig(
        quant_mapping={name: config for name in text_encoder_names(family)})}


def place_text_encoders(family: Family, pipe, device: torch.device):
    """The pipeline's text encoders on `device`, or with model.text_encoder_offload their weights kept on the
    CPU and each layer moved to `device` as it runs (accelerate's cpu_offload): the device then holds one
    layer of one encoder at a time. Families call encode_prompt with the pipeline's `_execution_device`."""
    if not family.cfg.text_encoder_offload:
        return pipe.to(device)
    from accelerate import cpu_offload

    for name in text_encoder_names(family):
        if getattr(pipe, name, None) is not None:
            cpu_offload(getattr(pipe, name), execution_device=device)
    return pipe


def render_cached(family: Family, denoiser, vae, cond, *, device, dtype, height, width, steps, guidance_scale,
                  generator, negative=None) -> list:
    """Run the family's own text-to-image pipeline (its sampling.pipeline_class) on cached text conditioning:
    its text encoders are left out, and the cached tensors go in as the pipeline's `*_embeds` arguments, which
    is why each family names its cached text tensors exactly as its pipeline's __call__ arguments.
    `negative`: the cached conditioning of "", used where the family's `negative_is_empty_caption` (SDXL's
    default negative is zeros, Flux-dev's guidance is embedded)."""
    import diffusers

    sampling = require(family, "sampling", "config key 'validation.prompts'")
    cls = getattr(diffusers, sampling.pipeline_class)
    pipe = cls.from_pretrained(
        family.root, **{family.denoiser_component: denoiser, "vae": vae}, **{n: None for n in family.text_components}
    )
    pipe.set_progress_bar_config(disable=True)  # the train stage's own bar is the one to watch
    if negative is not None and sampling.negative_is_empty_caption:
        # this pipeline's classifier-free guidance encodes "" as the negative prompt: pass that, cached
        cond = {**cond, **{f"negative_{k}": t for k, t in negative.items()}}
    # the cache stacks every tensor batch-first; a family whose pipeline wants another layout converts it
    # (a list of per-prompt tensors where the pipeline takes captions at their own lengths)
    cond = {k: [x.to(device, dtype) for x in t] if isinstance(t, list) else t.to(device, dtype)
            for k, t in sampling.pipeline_layout(cond).items()}
    with torch.no_grad():
        return pipe(**cond, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator, output_type="pil").images


def load_full_pipeline(family: Family, device: torch.device, dtype: torch.dtype, root=None):
    """Every component of the family's text-to-image pipeline, for sampling from a saved LoRA (`root`: another
    folder of the family's layout, a fully fine-tuned one)."""
    import diffusers

    sampling = require(family, "sampling", "python -m pipeline sample")
    return getattr(diffusers, sampling.pipeline_class).from_pretrained(root or family.root, dtype=dtype).to(device)
