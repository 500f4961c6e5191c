"""`python -m pipeline sample`: render prompts with the base model plus a saved LoRA, the way a user of the
LoRA would (the family's diffusers pipeline, `load_lora_weights`; a LoKr or LoHa its loader does not read
goes into the pipeline's denoiser), or with train.method = "full" the trained pipeline folder, to look at a
run after it ended."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.denoiser.full import MODEL_DIR
from pipeline.denoiser.lora import load_into_pipeline
from pipeline.errors import UserError
from pipeline.families.load import get_family
from pipeline.families.base import load_full_pipeline
from pipeline.settings import TORCH_DTYPES, pick_device
from pipeline.train.validation import save_grid


def sample(cfg: Config, lora: str | None, prompts: list[str], out: str | None, steps: int | None = None,
           seed: int | None = None, width: int | None = None, height: int | None = None,
           guidance: float | None = None) -> Path:
    """One PNG grid with an image per prompt, each labelled with its prompt (and the LoRA's step count);
    returns its path. Without `lora`, the run's own LoRA file, or with train.method = "full" its trained
    pipeline folder. Unset options come from [validation]."""
    folder = Path(cfg.train.output_dir) / MODEL_DIR if cfg.train.method == "full" and not lora else None
    lora_path = folder or (Path(lora) if lora else Path(cfg.train.output_dir) / cfg.train.lora_name)
    if folder is not None and not (folder / "model_index.json").is_file():
        raise UserError(f"train.method = \"full\": '{folder}' does not exist (train first, or give --lora)")
    if folder is None and not lora_path.is_file():
        raise UserError(f"--lora: '{lora_path}' does not exist (train first, or give the LoRA file)")
    if not prompts:
        prompts = list(cfg.validation.prompts)
    if not prompts:
        raise UserError("give --prompt (or set validation.prompts in the config)")
    v = cfg.validation
    family = get_family(cfg.model)
    pipe = load_full_pipeline(family, pick_device(cfg.train.device), TORCH_DTYPES[cfg.train.dtype], folder)
    try:
        if folder is None:  # a LoKr or LoHa the pipeline cannot read: into its denoiser
            load_into_pipeline(pipe, family, lora_path)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"--lora: '{lora_path}' does not load into this {family.name} model: {e}") from None
    size = {"height": height or v.height or cfg.data.resolution, "width": width or v.width or cfg.data.resolution}
    images = []
    for prompt in prompts:
        generator = torch.Generator("cpu").manual_seed(v.seed if seed is None else seed)
        images += pipe(prompt=prompt, **size, num_inference_steps=steps or v.steps,
                       guidance_scale=v.guidance_scale if guidance is None else guidance, generator=generator,
                       output_type="pil").images
    trained = _steps_of(lora_path)
    labels = [f"step {trained}: {p}" if trained else p for p in prompts]
    target = Path(out) if out else lora_path.with_name(f"{lora_path.stem if folder is None else lora_path.name}-sample.png")
    return save_grid(images, target, labels=labels)


def _steps_of(lora_path: Path) -> str | None:
    """The step count prior-lora recorded in the LoRA file (None for a LoRA from elsewhere)."""
    from safetensors import safe_open

    if lora_path.is_dir():  # a fully fine-tuned pipeline folder (denoiser.full.save_model)
        return json.loads((lora_path / "prior_lora.json").read_text()).get("prior_lora.steps")
    with safe_open(str(lora_path), "pt") as f:
        return (f.metadata() or {}).get("prior_lora.steps")
