"""HiDream LoRAs in ComfyUI's layout (`diffusion_model.<module>.lora_A/B.weight`), the non-diffusers
layout diffusers' HiDream loader converts back."""

from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.families.capabilities import LoraLayout


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The LoRA as peft holds it (transformer.<module>.lora_A/B.weight, scale not applied) in
    ComfyUI's layout, the non-diffusers one diffusers' HiDream loader converts back:
    diffusion_model.<module>.lora_A/B.weight, same module names. That converter only strips the prefix
    and the loader refuses keys without "lora", so no .alpha keys: the scale alpha/rank is folded into
    lora_B instead, and both loaders (which then take alpha = rank, scale 1) apply the trained scale."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("transformer.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"LoRA key '{key}' cannot be exported to the kohya/ComfyUI format "
                            "(only plain LoRA on the transformer: no DoRA, no text encoder)")
        module = key[len("transformer."):-len(".lora_A.weight")]
        if key.endswith(".lora_B.weight"):
            rank = state_dict[f"transformer.{module}.lora_A.weight"].shape[0]
            value = (value.float() * (alpha / rank)).to(value.dtype)
        out[f"diffusion_model.{key[len('transformer.'):]}"] = value
    return out


class HiDreamLayout(LoraLayout):
    """`HiDreamFamily.lora_layout`: ComfyUI's layout as above; the diffusers file keeps peft's names."""

    def to_kohya(self, state_dict, alpha):
        return to_kohya(state_dict, alpha)
