"""A diffusers-format Flux LoRA in kohya sd-scripts' layout, which uses the module names of Black Forest
Labs' reference code (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`...).

BFL fuses what diffusers keeps apart: a double block's q, k and v are one Linear (`img_attn_qkv`, and
`txt_attn_qkv` for the text stream), a single block's q, k, v and MLP input are one (`linear1`). Separate
LoRAs of rank r on the parts become one LoRA of rank n*r on the fused Linear: the downs stacked, the ups
block-diagonal (each part's output rows see only its own down), and `.alpha` = n*alpha so that the scale
alpha/rank is unchanged. diffusers' `_convert_kohya_flux_lora_to_diffusers` recognises exactly this
block-diagonal form and splits it back into the separate LoRAs. A part the LoRA does not cover gets a zero
block, which changes nothing.
"""

from __future__ import annotations

import re

import torch

from pipeline.errors import UserError
from pipeline.families.capabilities import LoraLayout

MLP_RATIO = 4  # FluxSingleTransformerBlock's mlp_ratio: linear1's MLP rows are 4x its q rows

# module inside a block -> (kohya name, index of the part in a fused Linear, or None for a plain one)
DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None), "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None), "norm1_context.linear": ("txt_mod_lin", None),
}
SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None),
}
PARTS = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")


def _fuse(parts: dict[int, tuple[torch.Tensor, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the fused Linear from the parts' (A, B); absent parts as zero blocks."""
    down0, up0 = next(iter(parts.values()))
    rank, fan_in = down0.shape
    qkv = [up.shape[0] for j, (_, up) in parts.items() if j < 3]
    width = qkv[0] if qkv else parts[3][1].shape[0] // MLP_RATIO  # q, k, v rows; the MLP's are 4x
    downs = [parts[j][0] if j in parts else down0.new_zeros(rank, fan_in) for j in range(n)]
    ups = [parts[j][1] if j in parts else up0.new_zeros(width * (MLP_RATIO if j == 3 else 1), rank) for j in range(n)]
    return torch.cat(downs), torch.block_diag(*ups)


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float, prefix: str, label: str = "Flux"
             ) -> dict[str, torch.Tensor]:
    """`label`: the model the refusal names (Chroma shares the layout)."""
    groups: dict[str, tuple[int, dict]] = {}  # kohya name -> (parts of its Linear, {part: (A, B)})
    unmapped = set()
    for key, down in state_dict.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(prefix) + 1 : -len(".lora_A.weight")]
        up = state_dict[f"{prefix}.{module}.lora_B.weight"]
        m = BLOCK.fullmatch(module)
        table = SINGLE if m and m[1] == "single_transformer_blocks" else DOUBLE
        if m is None or m[3] not in table:
            unmapped.add(re.sub(r"\.\d+\.", ".N.", module))
            continue
        name, part = table[m[3]]
        kind = "single" if table is SINGLE else "double"
        groups.setdefault(f"lora_unet_{kind}_blocks_{m[2]}_{name}", (PARTS.get(name, 1), {}))[1][part] = (down, up)
    if unmapped:
        # kohya's layout names these too (img_in, txt_in, time_in, vector_in, guidance_in, final_layer), but
        # diffusers' kohya converter returns them without the transformer prefix, so load_lora_weights drops them
        raise UserError(
            f"config key 'train.lora_format' = \"kohya\": a {label} LoRA on {', '.join(sorted(unmapped))} would not "
            f"load in diffusers from kohya's layout (only the double and single blocks' layers do)"
        )
    out = {}
    for name, (n, parts) in sorted(groups.items()):
        down, up = parts[None] if n == 1 else _fuse(parts, n)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha * n, dtype=torch.float32)
    return out


class FluxLayout(LoraLayout):
    """`FluxFamily.lora_layout`: kohya's layout as above; the diffusers file keeps peft's names."""

    kohya_metadata = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"}

    def __init__(self, prefix: str):
        self.prefix = prefix  # the denoiser's component, as the peft state dict's keys start

    def to_kohya(self, state_dict, alpha):
        return to_kohya(state_dict, alpha, self.prefix)
