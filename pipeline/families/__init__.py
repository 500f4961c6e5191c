"""Model families behind one small interface. The stages never ask which family they run;
a new family is one new file here plus one line in FAMILIES."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.config import HUB_ID, ModelConfig
from pipeline.errors import UserError


class Family(Protocol):
    name: str
    root: Path  # the local diffusers folder
    vae_components: tuple[str, ...]  # subfolders whose weights the latents depend on
    text_components: tuple[str, ...]  # ... the text embeddings
    denoiser_component: str  # ... the priors
    denoiser_file: Path | None  # model.denoiser_file: the denoiser's weights in one file (config from the folder)
    pixel_multiple: int  # image sides (and bucket sides) must be multiples of this
    # LoRA targets: peft module-name suffixes (a name, or its tail after a dot; `*` matches a block index)
    # for "attention" (the default), "attention_mlp" and "all_linear"; default_target_modules is the first
    target_presets: dict[str, list[str]]
    default_target_modules: list[str]
    default_timestep_sampling: str  # what cache.timestep_sampling = "auto" means: "uniform" | "logit_normal" | "mode"
    loss_weightings: tuple[str, ...]  # the train.loss_weighting values this family supports

    def load_vae(self, device: torch.device, dtype: torch.dtype) -> torch.nn.Module: ...

    def encode_images(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1,1] -> latents (B,C,h,w) float32 as the denoiser sees them (deterministic)."""

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
        """What the denoiser should predict for a standard sample (flow: noise - x0; epsilon; v)."""

    def loss_weights(self, train: Any, timesteps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (B,) for train.loss_weighting; UserError for a scheme it does not support."""

    def predict(
        self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One denoiser forward: noisy latents (B,C,h,w), timesteps (B,) on the scheduler's 0..1000 scale,
        batched conditioning -> prediction (B,C,h,w) in the denoiser's dtype. `cond` holds the text entry's
        tensors plus the image geometry cached with the latent: original_size (B,2) as (height, width) and
        crop_top_left (B,2) as (top, left), in pixels, float32."""

    def prediction_settings(self) -> dict:
        """Settings outside the weights that change a prediction (guidance...): part of the prior key."""

    def to_kohya(self, state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """The diffusers-format LoRA (keys '<denoiser_component>.<module>.lora_A.weight' / '.lora_B.weight',
        as in the diffusers file) in kohya sd-scripts' layout: '<kohya module>.lora_down.weight',
        '.lora_up.weight' and '.alpha' (a scalar; the scale is alpha / rank), such that the family's
        pipeline's load_lora_weights gives the same denoiser. UserError naming train.lora_format for modules
        the layout cannot hold. An optional `kohya_metadata` dict (ss_network_module...) goes into the file."""


class FolderFamily:
    """What every family here shares: a diffusers model folder, latents from its VAE's mode, and the
    denoiser from the folder or from one file (model.denoiser_file). A family sets `denoiser_class`."""

    denoiser_class: Any
    denoiser_component: str

    def __init__(self, root: Path, cfg: ModelConfig):
        self.root = Path(root)
        self.cfg = cfg
        self.denoiser_file = Path(cfg.denoiser_file) if cfg.denoiser_file else None
        self._scheduler = None

    def load_vae(self, device, dtype):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.root, subfolder="vae", dtype=dtype).to(device).eval()

    @torch.no_grad()
    def encode_images(self, vae, pixels):
        # The distribution's mode, not a sample: the latent of an image is then a pure function of its bytes.
        # Then the pipelines' inverse of their decode step (SDXL's VAE has no shift).
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()
        if vae.config.shift_factor is not None:
            z = z - vae.config.shift_factor
        return (z * vae.config.scaling_factor).cpu()

    def load_denoiser(self, device, dtype, **kwargs):
        cls, sub = self.denoiser_class, self.denoiser_component
        if self.denoiser_file is not None:  # weights from one file, the config from the folder
            model = cls.from_single_file(str(self.denoiser_file), config=str(self.root), subfolder=sub, dtype=dtype,
                                         **kwargs)
        else:
            model = cls.from_pretrained(self.root, subfolder=sub, dtype=dtype, **kwargs)
        return model.to(device).eval().requires_grad_(False)


def render_cached(family, denoiser, vae, cond, *, height, width, steps, guidance_scale, generator, negative=None) -> list:
    """Run the family's own text-to-image pipeline (pipeline_classes[0]) on cached text conditioning: its
    text encoders are left out, and the cached tensors go in as the pipeline's `*_embeds` arguments, which
    is why each family names its cached text tensors exactly as its pipeline's __call__ arguments.
    `negative`: the cached conditioning of "", for pipelines whose guidance encodes it as the negative
    prompt (a family sets `negative_is_empty_caption`; SDXL's default is zeros, Flux-dev's guidance is
    embedded)."""
    import diffusers

    cls = getattr(diffusers, family.pipeline_classes[0])
    pipe = cls.from_pretrained(
        family.root, **{family.denoiser_component: denoiser, "vae": vae}, **{n: None for n in family.text_components}
    )
    pipe.set_progress_bar_config(disable=True)  # the train stage's own bar is the one to watch
    if negative is not None and getattr(family, "negative_is_empty_caption", False):
        # this pipeline's classifier-free guidance encodes "" as the negative prompt: pass that, cached
        cond = {**cond, **{f"negative_{k}": t for k, t in negative.items()}}
    # the cache stacks every tensor batch-first; a family whose pipeline wants another layout converts it
    layout = getattr(family, "pipeline_layout", lambda c: c)
    cond = {k: t.to(denoiser.device, denoiser.dtype) for k, t in layout(cond).items()}
    with torch.no_grad():
        return pipe(**cond, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator, output_type="pil").images


def load_full_pipeline(family, device: torch.device, dtype: torch.dtype):
    """Every component of the family's text-to-image pipeline, for sampling from a saved LoRA."""
    import diffusers

    cls = getattr(diffusers, family.pipeline_classes[0])
    return cls.from_pretrained(family.root, dtype=dtype).to(device)


def resolve_model(path: str) -> Path:
    """A local folder, or a hub id resolved to its downloaded snapshot (downloaded when the hub answers)."""
    local = Path(path)
    if local.exists():
        return local
    if not HUB_ID.match(path):
        raise UserError(f"model.path: '{path}' does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local hub cache; try the hub itself
        pass
    try:
        return Path(snapshot_download(path))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: all end here
        raise UserError(
            f"model.path: '{path}' is neither a local folder (relative to the config file) nor a hub model that "
            f"could be fetched ({type(e).__name__}): download it first (hf download {path} --local-dir DIR) "
            f"and set model.path = \"DIR\""
        ) from None


def detect_family(root: Path) -> str:
    index = root / "model_index.json"
    if not index.is_file():
        raise UserError(f"model.path: '{root}' is not a diffusers folder (no model_index.json)")
    cls = json.loads(index.read_text()).get("_class_name", "")
    for name, family in FAMILIES.items():
        if cls in family.pipeline_classes:
            return name
    raise UserError(f"model.path: '{root}' holds a {cls}, which no family here handles ({', '.join(FAMILIES)})")


def get_family(cfg: ModelConfig) -> Family:
    root = resolve_model(cfg.path)
    name = detect_family(root) if cfg.family == "auto" else cfg.family
    if name not in FAMILIES:
        raise UserError(f"config key 'model.family' must be auto or one of {', '.join(FAMILIES)}, got {name!r}")
    return FAMILIES[name](root, cfg)


from pipeline.families.flux import FluxFamily  # noqa: E402
from pipeline.families.hidream import HiDreamFamily  # noqa: E402
from pipeline.families.sdxl import SDXLFamily  # noqa: E402

FAMILIES = {"flux": FluxFamily, "sdxl": SDXLFamily, "hidream": HiDreamFamily}
