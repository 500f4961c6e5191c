"""Adding a peft LoRA to the denoiser and saving it in the diffusers format that
`<Family>Pipeline.load_lora_weights` loads with no missing or unexpected keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from pipeline.config import LoraConfig
from pipeline.errors import UserError

# diffusers reads the adapter's LoraConfig back from this metadata key (alpha, rank, targets), so a
# LoRA with alpha != rank loads with the scale it was trained with.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def add_lora(model: torch.nn.Module, cfg: LoraConfig, default_targets: list[str]) -> list[torch.nn.Parameter]:
    """Adds an adapter whose B matrices start at zero (so it changes nothing at step 0); returns its
    parameters, kept in float32 whatever the base dtype (as diffusers' scripts do)."""
    targets = cfg.target_modules or default_targets
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.dropout, use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
    )
    try:
        model.add_adapter(peft_cfg)
    except ValueError as e:
        raise UserError(f"config key 'lora.target_modules': {e}".splitlines()[0]) from None
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(path: Path, model: torch.nn.Module, prefix: str, metadata: dict[str, str]) -> None:
    """Write the LoRA atomically (temporary file, then rename) with `metadata` beside diffusers' own."""
    weights = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    adapter = model.peft_config["default"].to_dict()
    adapter = {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in adapter.items()}
    meta = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True, default=str), **metadata}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(weights, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
