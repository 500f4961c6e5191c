"""SDXL LoRAs in kohya sd-scripts' layout: `lora_unet_<original SDXL module path>` names, mapped from
diffusers' UNet names with diffusers' own single-file table (the inverse of its convert_ldm_unet_checkpoint)."""

from __future__ import annotations

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from pipeline.errors import UserError


def to_kohya(state_dict: dict[str, torch.Tensor], alpha: float, prefix: str, unet_config: dict) -> dict[str, torch.Tensor]:
    """The diffusers-format LoRA save_lora writes (`unet.<module>.lora_A.weight`, ...) in kohya's layout
    (`lora_unet_<original SDXL module path, '.' -> '_'>.lora_down.weight`, `.lora_up.weight`, `.alpha`),
    which A1111, ComfyUI and diffusers' own kohya converter load."""
    out = {}
    for key, tensor in state_dict.items():
        module, _, kind = key.removeprefix(f"{prefix}.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise UserError(f"LoRA key '{key}' has no kohya equivalent (DoRA and LoRA biases are not exported)")
        name = "lora_unet_" + ldm_unet_name(module, unet_config).replace(".", "_")
        out[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


# diffusers ResnetBlock2D names -> the original (ldm/sgm) ResBlock names
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# top-level modules, from diffusers' own single-file table (parameter names -> module names)
_TOP = {d.rsplit(".", 1)[0]: o.rsplit(".", 1)[0] for table in ("layers", "addition_embed_type")
        for d, o in DIFFUSERS_TO_LDM_MAPPING["unet"][table].items()}


def ldm_unet_name(name: str, config: dict) -> str:
    """A diffusers UNet2DConditionModel module or parameter name -> its name in the original SDXL UNet
    (input_blocks / middle_block / output_blocks), the inverse of diffusers' convert_ldm_unet_checkpoint.
    Transformer blocks are named alike in both, so only the prefix and resnet parts change."""
    for new, old in _TOP.items():
        if name == new or name.startswith(new + "."):
            return old + name[len(new):]
    parts = name.split(".")
    n = config["layers_per_block"] + 1  # original blocks per level: the layers, then the down/upsampler
    if parts[0] == "down_blocks":
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":  # conv -> op
            prefix, rest = f"input_blocks.{(level + 1) * n}.0", ["op", *rest[1:]]
        else:
            prefix = f"input_blocks.{1 + level * n + j}.{0 if kind == 'resnets' else 1}"
    elif parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        prefix = f"middle_block.{ {('resnets', 0): 0, ('attentions', 0): 1, ('resnets', 1): 2}[kind, j] }"
    elif parts[0] == "up_blocks":
        level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":  # after the resnet, and the attention where the level has one
            has_attention = config["up_block_types"][level].startswith("CrossAttn")
            prefix = f"output_blocks.{level * n + n - 1}.{2 if has_attention else 1}"
        else:
            prefix = f"output_blocks.{level * n + j}.{0 if kind == 'resnets' else 1}"
    else:
        raise ValueError(f"no original SDXL name for UNet module '{name}'")
    if kind == "resnets" and rest and rest[0] in _RESNET:
        rest = [_RESNET[rest[0]], *rest[1:]]
    return ".".join([prefix, *rest])
