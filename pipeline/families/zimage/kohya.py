"""Z-Image LoRAs in ComfyUI's layout: `diffusion_model.<diffusers module>.lora_A/B.weight` with a
`.alpha` per module.

ComfyUI loads Z-Image as its Lumina2 model (the reference layout: q, k, v fused in `attention.qkv`,
`attention.out`, `x_embedder`, `final_layer`), and its LoRA key map (comfy/lora.py, the Lumina2 branch)
takes diffusers' module names under `diffusion_model.`, `transformer.` or none through
comfy.utils.z_image_to_diffusers, which places to_q, to_k and to_v in the rows of the fused qkv. diffusers'
ZImageLoraLoaderMixin converts the same file back (`_convert_non_diffusers_z_image_lora_to_diffusers`:
the prefix dropped, alpha / rank applied to the pair). Both read `.alpha` as alpha / rank, so the file
keeps peft's matrices as they are, with the trained alpha beside each pair.

A LoKr or LoHa (`train.lora_format = "lycoris"`) takes the same stems: ComfyUI maps `diffusion_model.<m>`,
and diffusers' LoKr reader takes ai-toolkit's Z-Image LoKr files in exactly that layout.
"""

from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.families.capabilities import LoraLayout


def to_comfyui(state_dict: dict[str, torch.Tensor], alpha: float, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(f"{prefix}.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise UserError(f"config key 'train.lora_format' = \"kohya\": LoRA key '{key}' has no place in "
                            "ComfyUI's Z-Image layout (only a plain LoRA on the transformer: no DoRA)")
        module = key[len(prefix) + 1 : -len(".lora_A.weight")]
        out[f"diffusion_model.{module}{key[-len('.lora_A.weight'):]}"] = value
        if key.endswith(".lora_A.weight"):
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    return out


class ZImageLayout(LoraLayout):
    """`ZImageFamily.lora_layout`: ComfyUI's layout as above; the diffusers file keeps peft's names."""

    kohya_metadata = {"ss_base_model_version": "zimage"}

    def __init__(self, prefix: str):
        self.prefix = prefix

    def to_kohya(self, state_dict, alpha):
        return to_comfyui(state_dict, alpha, self.prefix)

    @staticmethod
    def lycoris_stem(module: str) -> str:
        return f"diffusion_model.{module}"
