"""Qwen-Image LoRAs in ComfyUI's layout: `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` and a
`diffusion_model.<module>.alpha` per module, diffusers' module names (Qwen's reference model and ComfyUI's
keep them). `train.lora_format = "kohya"` writes it.

diffusers' QwenImageLoraLoaderMixin converts this layout back (`_convert_non_diffusers_qwen_lora_to_diffusers`
in diffusers/loaders/lora_conversion_utils.py: the prefix dropped, each `.alpha` read as the scale
alpha/rank and spread over the two matrices); ComfyUI maps `diffusion_model.<module>` onto its weight and
scales by `.alpha` / rank. So the matrices are written as peft trained them and alpha as a tensor: both
loaders apply the trained scale, and a user's strength edits in tools that read alpha keep working.
"""

from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.families.capabilities import LoraLayout


def to_comfy(state_dict: dict[str, torch.Tensor], alpha: float, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(f"{prefix}.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"config key 'train.lora_format' = \"kohya\": LoRA key '{key}' has no place in "
                            f"Qwen-Image's ComfyUI layout (only a plain LoRA on the transformer: no DoRA)")
        module = key[len(prefix) + 1 : -len(".lora_A.weight")]
        out[f"diffusion_model.{key[len(prefix) + 1:]}"] = value
        out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


class QwenImageLayout(LoraLayout):
    """`QwenImageFamily.lora_layout`: ComfyUI's layout as above; the diffusers file keeps peft's names, which
    ComfyUI maps too (`transformer.<module>`)."""

    kohya_metadata = {"ss_base_model_version": "qwen_image"}

    def __init__(self, prefix: str):
        self.prefix = prefix

    def to_kohya(self, state_dict, alpha):
        return to_comfy(state_dict, alpha, self.prefix)
