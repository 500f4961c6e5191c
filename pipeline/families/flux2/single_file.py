"""FLUX.2's single-file layout: a whole transformer's weights (diffusers' names) in Black Forest Labs' key
layout (`double_blocks.N.img_attn.qkv`, fused q/k/v), what users download as flux2-dev.safetensors and what
ComfyUI's model loader reads. It is the reverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`
(diffusers/loaders/single_file_utils.py), so `model.denoiser_file` reads such a file back to the same weights
(tests/test_flux2.py). Full fine-tuning writes its `model.safetensors` in it (pipeline/denoiser/full.py).
"""

from __future__ import annotations

import re

import torch

# diffusers -> BFL names of the Linears (the LoRA layout's, kohya.py)
# module inside a double block -> (BFL name, index of the part in a fused qkv, or None)
DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
# outside the blocks. norm_out.linear (BFL's final_layer.adaLN_modulation.1) is left out on purpose: BFL
# orders its output halves (shift, scale) the other way round, and diffusers' LoRA converter does not swap
# them (its checkpoint converter does), so no file could give diffusers and ComfyUI the same weights.
TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
# a whole checkpoint holds the blocks' norms too
FLUX2_TOP = TOP
FLUX2_DOUBLE = {**DOUBLE, "attn.norm_q": ("img_attn.norm.query_norm", None),
                "attn.norm_k": ("img_attn.norm.key_norm", None),
                "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
                "attn.norm_added_k": ("txt_attn.norm.key_norm", None)}
FLUX2_SINGLE = {**SINGLE, "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def swap_halves(w: torch.Tensor) -> torch.Tensor:
    # BFL's final adaLN gives (shift, scale), diffusers' norm_out (scale, shift): the converter swaps them
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def param_name(module: str, param: str, norm: bool) -> str:
    return f"{module}.{'scale' if norm and param == 'weight' else param}"


def flux2_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, fused = {}, {}
    for key, w in state_dict.items():
        module, param = key.rsplit(".", 1)
        if module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = swap_halves(w)
        elif module in FLUX2_TOP:
            out[f"{FLUX2_TOP[module]}.{param}"] = w
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            name, part = FLUX2_DOUBLE[m[2]]
            bfl = f"double_blocks.{m[1]}.{name}"
            if part is None:
                out[param_name(bfl, param, "norm" in name)] = w
            else:
                fused.setdefault(f"{bfl}.{param}", {})[part] = w
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            name = FLUX2_SINGLE[m[2]]
            out[param_name(f"single_blocks.{m[1]}.{name}", param, "norm" in name)] = w
        else:
            raise KeyError(key)
    out.update({k: torch.cat([parts[0], parts[1], parts[2]]) for k, parts in fused.items()})
    return out
