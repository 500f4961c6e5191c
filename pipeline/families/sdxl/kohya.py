"""SDXL LoRA key names for ComfyUI: kohya sd-scripts' layout (`lora_unet_<original SDXL module path>`,
mapped from diffusers' UNet names with diffusers' own single-file table, the inverse of its
convert_ldm_unet_checkpoint), and the names of the diffusers-format file.

ComfyUI maps a diffusers SDXL LoRA's attention projections only under the names of diffusers' older
attention processors (`<block>.attn1.processor.to_q_lora.down.weight`, `….processor.to_out_lora.up.weight`),
never under peft's (`<block>.attn1.to_q.lora_A.weight`). diffusers' loader turns those names back into
peft's (convert_unet_state_dict_to_peft), but only for a file whose keys have no `lora_A`: so the other
modules take that naming's `<module>.lora.down.weight` / `.lora.up.weight`, which ComfyUI maps too.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from pipeline.errors import UserError
from pipeline.families.capabilities import LoraLayout


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



_ATTENTION = re.compile(r"(.+)\.(to_q|to_k|to_v|to_out\.0)")  # the projections of attn1 and attn2
_UP_DOWN = {"lora_A.weight": "down", "lora_B.weight": "up"}
_PEFT_KIND = {"down": "lora_A.weight", "up": "lora_B.weight"}


def processor_names(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """peft's names (`unet.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`) -> the
    diffusers file's (see the module docstring)."""
    out = {}
    for key, tensor in state_dict.items():
        module, _, kind = key.removeprefix(f"{prefix}.").rpartition(".")
        if kind == "weight":  # lora_A.weight / lora_B.weight
            module, _, kind = module.rpartition(".")
            kind += ".weight"
        m = _ATTENTION.fullmatch(module)
        if m:
            stem = f"{m[1]}.processor.{m[2].removesuffix('.0')}"
            name = f"{stem}_lora.{_UP_DOWN[kind]}.weight" if kind in _UP_DOWN else f"{stem}.{kind}"  # DoRA: kept
        else:
            name = f"{module}.lora.{_UP_DOWN[kind]}.weight" if kind in _UP_DOWN else f"{module}.{kind}"
        out[f"{prefix}.{name}"] = tensor
    return out


def peft_names(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The inverse of processor_names."""
    out = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(f"{prefix}.")
        m = re.fullmatch(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)(?:_lora\.(down|up)\.weight|\.(.+))", name)
        if m:
            module, kind = f"{m[1]}.{m[2]}{'.0' if m[2] == 'to_out' else ''}", m[4] or _PEFT_KIND[m[3]]
        else:
            m = re.fullmatch(r"(.+?)(?:\.lora\.(down|up)\.weight|\.(lora_magnitude_vector))", name)
            module, kind = m[1], m[3] or _PEFT_KIND[m[2]]
        out[f"{prefix}.{module}.{kind}"] = tensor
    return out


class SDXLLayout(LoraLayout):
    """`SDXLFamily.lora_layout`: kohya's layout, and the diffusers file under the attention processors'
    names (ComfyUI maps no peft attention name)."""

    def __init__(self, prefix: str, unet_config: dict):
        self.prefix, self.unet_config = prefix, unet_config

    def to_kohya(self, state_dict, alpha):
        return to_kohya(state_dict, alpha, self.prefix, self.unet_config)

    def diffusers_layout(self, state_dict):
        return processor_names(state_dict, self.prefix)

    def single_file_names(self, state_dict):
        """A whole UNet's weights (diffusers' names) in the original checkpoint's layout
        (`model.diffusion_model.<input_blocks...>`), which ComfyUI's and A1111's UNet loaders and diffusers'
        from_single_file read (train.method = "full")."""
        return {"model.diffusion_model." + ldm_unet_name(k, self.unet_config): v for k, v in state_dict.items()}

    def lycoris_stem(self, module):  # kohya's (and LyCORIS') name: ComfyUI maps no peft name of the UNet's
        return "lora_unet_" + ldm_unet_name(module, self.unet_config).replace(".", "_")
