"""FLUX.2 LoRAs in Black Forest Labs' layout (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`...),
which ComfyUI maps onto its FLUX.2 model by name and diffusers' Flux2LoraLoaderMixin converts back
(`_convert_non_diffusers_flux2_lora_to_diffusers` in diffusers/loaders/lora_conversion_utils.py).
`train.lora_format = "kohya"` writes it.

BFL fuses a double block's q, k and v into one Linear per stream (`img_attn.qkv`, `txt_attn.qkv`);
diffusers' converter gives each of q, k, v the file's whole lora_A and a third of its lora_B's rows. So
separate LoRAs of rank r on the parts are written as one of rank 3r: the downs stacked, the ups
block-diagonal (each part's rows see only its own down), a part the LoRA leaves out as a zero block. The
single blocks' fused Linears are already one module in diffusers (to_qkv_mlp_proj, to_out).

The converter takes no `.alpha` keys (it refuses keys it does not consume), so the scale alpha/rank is
folded into lora_B, and both loaders apply it at scale 1 (ComfyUI: no `.alpha`, scale 1).
"""

from __future__ import annotations

import re

import torch

from pipeline.errors import UserError
from pipeline.families.capabilities import LoraLayout
from pipeline.families.flux2.single_file import DOUBLE, SINGLE, TOP, flux2_to_bfl

BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def bfl_name(module: str) -> tuple[str, int | None] | None:
    """(BFL module, part of a fused qkv or None) for a diffusers module name; None where BFL has no place."""
    m = BLOCK.fullmatch(module)
    if m is None:
        return (TOP[module], None) if module in TOP else None
    if m[1] == "single_transformer_blocks":
        return (f"single_blocks.{m[2]}.{SINGLE[m[3]]}", None) if m[3] in SINGLE else None
    if m[3] not in DOUBLE:
        return None
    name, part = DOUBLE[m[3]]
    return f"double_blocks.{m[2]}.{name}", part


def to_bfl(state_dict: dict[str, torch.Tensor], alpha: float, prefix: str) -> dict[str, torch.Tensor]:
    groups: dict[str, dict] = {}  # BFL name -> {part: (A, B scaled)}
    unmapped = set()
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                unmapped.add(key)
            continue
        module = key[len(prefix) + 1 : -len(".lora_A.weight")]
        place = bfl_name(module)
        if place is None:
            unmapped.add(re.sub(r"\.\d+\.", ".N.", module))
            continue
        up = state_dict[f"{prefix}.{module}.lora_B.weight"]
        up = (up.float() * (alpha / down.shape[0])).to(up.dtype)  # the scale, folded
        groups.setdefault(place[0], {})[place[1]] = (down, up)
    if unmapped:
        raise UserError(f"config key 'train.lora_format' = \"kohya\": FLUX.2's BFL/ComfyUI layout has no place "
                        f"for a LoRA on {', '.join(sorted(unmapped))} that diffusers and ComfyUI read alike")
    out = {}
    for name, parts in sorted(groups.items()):
        if None in parts:
            down, up = parts[None]
        else:  # a fused qkv: rank 3r, downs stacked, ups block-diagonal
            down0, up0 = next(iter(parts.values()))
            zero = ((down0.new_zeros(down0.shape), up0.new_zeros(up0.shape)))
            down = torch.cat([parts.get(j, zero)[0] for j in range(3)])
            up = torch.block_diag(*[parts.get(j, zero)[1] for j in range(3)])
        out[f"diffusion_model.{name}.lora_A.weight"] = down.contiguous()
        out[f"diffusion_model.{name}.lora_B.weight"] = up.contiguous()
    return out


class Flux2Layout(LoraLayout):
    """`Flux2Family.lora_layout`: BFL's layout as above; the diffusers file keeps peft's names."""

    kohya_metadata = {"ss_base_model_version": "flux2"}

    def __init__(self, prefix: str):
        self.prefix = prefix

    def to_kohya(self, state_dict, alpha):
        return to_bfl(state_dict, alpha, self.prefix)

    def single_file_names(self, state_dict):
        """A whole transformer in BFL's layout, as users download it and ComfyUI loads it (train.method = "full")."""
        return flux2_to_bfl(state_dict)
