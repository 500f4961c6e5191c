"""Chroma's single-file layout: a whole transformer's weights (diffusers' names) in the key layout of
Chroma's released files (FLUX.1's blocks with fused qkv and linear1, the distilled guidance layer), which
ComfyUI's model loader reads; the reverse of diffusers' `convert_chroma_transformer_checkpoint_to_diffusers`
(tests/test_chroma.py maps it back at full size). Full fine-tuning writes its `model.safetensors` in it.
"""

from __future__ import annotations

import re

import torch

from pipeline.families.flux2.single_file import FLUX2_DOUBLE, FLUX2_TOP, param_name

# Chroma (convert_chroma_transformer_checkpoint_to_diffusers): Flux.1's layout with biases, no modulation
# layers in the blocks, the distilled guidance approximator outside them
CHROMA_DOUBLE = {**{k: v for k, v in FLUX2_DOUBLE.items() if not k.startswith("ff")},
                 "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
                 "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None)}
CHROMA_SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}  # linear1's row blocks
CHROMA_SINGLE = {"proj_out": "linear2", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def chroma_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, fused = {}, {}
    for key, w in state_dict.items():
        module, param = key.rsplit(".", 1)
        if m := re.fullmatch(r"distilled_guidance_layer\.layers\.(\d+)\.linear_([12])", module):
            out[f"distilled_guidance_layer.layers.{m[1]}.{('in', 'out')[int(m[2]) - 1]}_layer.{param}"] = w
        elif m := re.fullmatch(r"distilled_guidance_layer\.norms\.(\d+)", module):
            out[f"distilled_guidance_layer.norms.{m[1]}.scale"] = w
        elif module.startswith("distilled_guidance_layer."):
            out[key] = w
        elif module in ("x_embedder", "context_embedder", "proj_out"):
            out[f"{FLUX2_TOP[module]}.{param}"] = w
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            name, part = CHROMA_DOUBLE[m[2]]
            bfl = f"double_blocks.{m[1]}.{name}"
            if part is None:
                out[param_name(bfl, param, "norm" in name)] = w
            else:
                fused.setdefault(f"{bfl}.{param}", {})[part] = w
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            if m[2] in CHROMA_SINGLE_FUSED:
                fused.setdefault(f"single_blocks.{m[1]}.linear1.{param}", {})[CHROMA_SINGLE_FUSED[m[2]]] = w
            else:
                name = CHROMA_SINGLE[m[2]]
                out[param_name(f"single_blocks.{m[1]}.{name}", param, "norm" in name)] = w
        else:
            raise KeyError(key)
    out.update({k: torch.cat([parts[i] for i in range(len(parts))]) for k, parts in fused.items()})
    return out
