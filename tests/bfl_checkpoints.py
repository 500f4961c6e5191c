"""Single-file denoiser checkpoints in Black Forest Labs' (and ComfyUI's) key layout, made from a diffusers
model by the reverse of diffusers' converters (convert_flux2_transformer_checkpoint_to_diffusers and
convert_chroma_transformer_checkpoint_to_diffusers in diffusers/loaders/single_file_utils.py): what users
download as flux2-dev.safetensors or a Chroma .safetensors, written here so that the tests need no download."""

import re

import torch

# diffusers name -> BFL name, outside the blocks (FLUX.2)
FLUX2_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
# inside a double block: diffusers module -> (BFL module, part of a fused qkv or None)
FLUX2_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.norm_q": ("img_attn.norm.query_norm", None), "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None), "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None), "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None), "ff_context.linear_out": ("txt_mlp.2", None),
}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    # BFL's final adaLN gives (shift, scale), diffusers' norm_out (scale, shift): the converter swaps them
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def _param(module: str, param: str, norm: bool) -> str:
    return f"{module}.{'scale' if norm and param == 'weight' else param}"


def flux2_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, fused = {}, {}
    for key, w in state_dict.items():
        module, param = key.rsplit(".", 1)
        if module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_halves(w)
        elif module in FLUX2_TOP:
            out[f"{FLUX2_TOP[module]}.{param}"] = w
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            name, part = FLUX2_DOUBLE[m[2]]
            bfl = f"double_blocks.{m[1]}.{name}"
            if part is None:
                out[_param(bfl, param, "norm" in name)] = w
            else:
                fused.setdefault(f"{bfl}.{param}", {})[part] = w
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            name = FLUX2_SINGLE[m[2]]
            out[_param(f"single_blocks.{m[1]}.{name}", param, "norm" in name)] = w
        else:
            raise KeyError(key)
    out.update({k: torch.cat([parts[0], parts[1], parts[2]]) for k, parts in fused.items()})
    return out


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
                out[_param(bfl, param, "norm" in name)] = w
            else:
                fused.setdefault(f"{bfl}.{param}", {})[part] = w
        elif m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            if m[2] in CHROMA_SINGLE_FUSED:
                fused.setdefault(f"single_blocks.{m[1]}.linear1.{param}", {})[CHROMA_SINGLE_FUSED[m[2]]] = w
            else:
                name = CHROMA_SINGLE[m[2]]
                out[_param(f"single_blocks.{m[1]}.{name}", param, "norm" in name)] = w
        else:
            raise KeyError(key)
    out.update({k: torch.cat([parts[i] for i in range(len(parts))]) for k, parts in fused.items()})
    return out
