"""A model of how ComfyUI's LoRA loader maps a LoRA file onto a model, written here from its naming rules
(not its code), so the tests can check that every file the project writes loads in ComfyUI onto the right
weights at the right strength.

The rules, as read in ComfyUI's comfy/lora.py (`model_lora_keys_unet` builds a map from key stems to model
weights; `load_lora` looks each stem up in the file), comfy/weight_adapter/lora.py (how a found stem's
matrices apply) and comfy/utils.py (`unet_to_diffusers`, `flux_to_diffusers`: the diffusers names it knows):

- ComfyUI's model weights are `diffusion_model.<m>.weight` in the original layouts: SDXL's ldm UNet
  (input_blocks, middle_block, output_blocks), Black Forest Labs' Flux (double_blocks, single_blocks, with
  q, k, v fused), HiDream's own names (which diffusers kept). Each is reachable under the stems
  `diffusion_model.<m>` and `lora_unet_<m with '.' -> '_'>` (kohya's names).
- SDXL: each diffusers UNet weight `<d>.weight` also under `lora_unet_<d, '_'>`, and under `<d>` and
  `unet.<d>` once `.to_` reads `.processor.to_` and a final `.to_out.0` reads `.to_out` (the names of
  diffusers' old attention processors). peft's `unet.<block>.attn1.to_q` is no stem.
- Flux: each diffusers transformer weight under `transformer.<d>`, onto BFL's layout: q, k, v (and a single
  block's MLP input) patch row ranges of one fused weight; norm_out.linear patches with its halves swapped.
- HiDream: each model weight also under `transformer.<m>`.
- Chroma: as Flux (its model class is a subclass of Flux's, so the same table maps it), on the Linears
  Chroma has (no modulation Linears in its blocks, no norm_out.linear).
- Z-Image (ComfyUI's Lumina2 model, the reference layout: q, k, v fused in `attention.qkv`, `attention.out`,
  `x_embedder`, `final_layer`): the Lumina2 branch of `model_lora_keys_unet` maps each diffusers weight
  named by `z_image_to_diffusers` (comfy/utils.py) under `diffusion_model.<d>`, `transformer.<d>`,
  `lycoris_<d, '_'>` and `<d>`; to_q, to_k, to_v patch row ranges of the fused qkv (dim rows each).
- A stem is found with one of these (up, down) pairs: `.lora_up.weight`/`.lora_down.weight`,
  `_lora.up.weight`/`_lora.down.weight`, `.lora_B.weight`/`.lora_A.weight`, `.lora.up.weight`/
  `.lora.down.weight`. The scale is `<stem>.alpha` / rank (the down matrix's rows) where that key exists,
  else 1. The patch adds strength * scale * up @ down to the weight (or its rows). A key that no stem
  claims is not loaded (ComfyUI logs "lora key not loaded").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.families.sdxl.kohya import ldm_unet_name

PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
         (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"))


@dataclass(frozen=True)
class Target:
    """Where a diffusers module's weight lives in ComfyUI's model."""
    weight: str  # "diffusion_model.<module>.weight"
    rows: tuple[int, int] | None = None  # (first, count): the rows of a fused weight this module is
    swap: bool = False  # the two halves of the rows trade places (diffusers' scale, shift; BFL's shift, scale)


@dataclass
class Patch:
    target: Target
    up: torch.Tensor
    down: torch.Tensor
    scale: float


# -- ComfyUI's model, per family: diffusers module name -> Target -------------------------------------
def sdxl_targets(modules: list[str], unet_config: dict) -> dict[str, Target]:
    # the ldm layout; ldm_unet_name is checked against diffusers' own converter in the tests
    return {d: Target(f"diffusion_model.{ldm_unet_name(d, unet_config)}.weight") for d in modules}


def hidream_targets(modules: list[str]) -> dict[str, Target]:
    # ComfyUI's HiDream keeps the reference names, as diffusers does (its single-file converter only drops
    # the prefix)
    return {d: Target(f"diffusion_model.{d}.weight") for d in modules}


def qwenimage_targets(modules: list[str]) -> dict[str, Target]:
    # ComfyUI's Qwen-Image keeps the reference names, as diffusers does (its single-file reader maps nothing)
    return {d: Target(f"diffusion_model.{d}.weight") for d in modules}


_FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "norm1.linear": "img_mod.lin",
                "norm1_context.linear": "txt_mod.lin", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}


def flux_targets(config: dict) -> dict[str, Target]:
    """Every Linear of a diffusers Flux transformer in BFL's layout (checked against diffusers' own BFL
    reader in the tests)."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    out = {}

    def put(module, weight, rows=None, swap=False):
        out[module] = Target(f"diffusion_model.{weight}.weight", rows, swap)

    for i in range(config["num_layers"]):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, p in enumerate("qkv"):
            put(f"{d}.attn.to_{p}", f"{b}.img_attn.qkv", (j * h, h))
            put(f"{d}.attn.add_{p}_proj", f"{b}.txt_attn.qkv", (j * h, h))
        for dn, bn in _FLUX_DOUBLE.items():
            put(f"{d}.{dn}", f"{b}.{bn}")
    for i in range(config["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, p in enumerate("qkv"):
            put(f"{d}.attn.to_{p}", f"{b}.linear1", (j * h, h))
        put(f"{d}.proj_mlp", f"{b}.linear1", (3 * h, 4 * h))
        for dn, bn in _FLUX_SINGLE.items():
            put(f"{d}.{dn}", f"{b}.{bn}")
    for dn, bn in _FLUX_TOP.items():
        if config.get("guidance_embeds") or "guidance" not in dn:
            put(dn, bn)
    put("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    return out


_ZIMAGE_BLOCK = {"attention.to_out.0": "attention.out", "feed_forward.w1": "feed_forward.w1",
                 "feed_forward.w2": "feed_forward.w2", "feed_forward.w3": "feed_forward.w3",
                 "adaLN_modulation.0": "adaLN_modulation.0"}
_ZIMAGE_TOP = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
               "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
               "cap_embedder.1": "cap_embedder.1", "t_embedder.mlp.0": "t_embedder.mlp.0",
               "t_embedder.mlp.2": "t_embedder.mlp.2"}


def zimage_targets(config: dict) -> dict[str, Target]:
    """Every Linear of a diffusers Z-Image transformer in the reference layout, as z_image_to_diffusers
    names them (checked against diffusers' own single-file reader in the tests)."""
    dim, out = config["dim"], {}
    blocks = [f"layers.{i}" for i in range(config["n_layers"])]
    blocks += [f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner") for i in range(config["n_refiner_layers"])]
    for b in blocks:
        for j, p in enumerate("qkv"):
            out[f"{b}.attention.to_{p}"] = Target(f"diffusion_model.{b}.attention.qkv.weight", (j * dim, dim))
        for d, c in _ZIMAGE_BLOCK.items():
            if d != "adaLN_modulation.0" or not b.startswith("context_refiner"):  # context refiners: no modulation
                out[f"{b}.{d}"] = Target(f"diffusion_model.{b}.{c}.weight")
    for d, c in _ZIMAGE_TOP.items():
        out[d] = Target(f"diffusion_model.{c}.weight")
    return out


# -- the loader ------------------------------------------------------------------------------------
def key_map(family: str, targets: dict[str, Target]) -> dict[str, Target]:
    """Stem -> Target, as ComfyUI builds it for a model of `family` whose modules are `targets`."""
    stems = {}
    for t in {t.weight: Target(t.weight) for t in targets.values()}.values():  # the whole model weights
        m = t.weight.removeprefix("diffusion_model.").removesuffix(".weight")
        stems[f"diffusion_model.{m}"] = stems["lora_unet_" + m.replace(".", "_")] = t
    for d, t in targets.items():
        if family == "sdxl":
            stems["lora_unet_" + d.replace(".", "_")] = t
            p = d.replace(".to_", ".processor.to_")
            p = p.removesuffix(".0") if p.endswith(".to_out.0") else p
            stems[p] = stems[f"unet.{p}"] = t
        elif family in ("flux", "hidream", "chroma", "qwenimage"):  # Chroma: a subclass of ComfyUI's Flux model; FLUX.2: the generic stems
            stems[f"transformer.{d}"] = t
        elif family == "zimage":  # the Lumina2 branch
            for stem in (f"diffusion_model.{d}", f"transformer.{d}", "lycoris_" + d.replace(".", "_"), d):
                stems[stem] = t
    return stems


def load(lora: dict[str, torch.Tensor], stems: dict[str, Target]) -> tuple[list[Patch], set[str]]:
    """The patches ComfyUI makes of a LoRA file, and the keys it does not load."""
    patches, used = [], set()
    for stem, target in stems.items():
        for up, down in PAIRS:
            if stem + up in lora:
                alpha = lora.get(stem + ".alpha")
                rank = lora[stem + down].shape[0]
                scale = float(alpha) / rank if alpha is not None else 1.0
                patches.append(Patch(target, lora[stem + up], lora[stem + down], scale))
                used |= {stem + up, stem + down, stem + ".alpha"}
                break
    return patches, set(lora) - used


def rows_of(weight: torch.Tensor, target: Target) -> torch.Tensor:
    """The part of a ComfyUI weight (or of a vector of its rows) that the target patches: a view."""
    return weight.narrow(0, *target.rows) if target.rows else weight


def swapped(t: torch.Tensor, target: Target) -> torch.Tensor:
    """Rows in ComfyUI's order from the diffusers order, and back (the swap is its own inverse)."""
    return torch.cat(t.chunk(2)[::-1]) if target.swap else t


@torch.no_grad()
def merge(weights: dict[str, torch.Tensor], patches: list[Patch], strength: float = 1.0) -> dict[str, torch.Tensor]:
    """ComfyUI's patched weights: a copy of `weights` (ComfyUI's names) with every patch added."""
    out = {k: v.clone() for k, v in weights.items()}
    for p in patches:
        region = rows_of(out[p.target.weight], p.target)
        diff = (p.up.flatten(1).float() @ p.down.flatten(1).float()).reshape(region.shape)
        region += swapped(diff * (strength * p.scale), p.target).to(region.dtype)
    return out


@torch.no_grad()
def patch_times(patches: list[Patch], probes: dict[str, torch.Tensor], rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """(patched weight - weight) @ probe, per ComfyUI weight, without building any weight: a check at full
    size. `rows` gives each weight's row count."""
    out = {w: torch.zeros(n) for w, n in rows.items()}
    for p in patches:
        x = probes[p.target.weight]
        y = p.up.flatten(1).float() @ (p.down.flatten(1).float() @ x)
        rows_of(out[p.target.weight], p.target).add_(swapped(y * p.scale, p.target))
    return out


@torch.no_grad()
def to_comfy(state_dict: dict[str, torch.Tensor], targets: dict[str, Target]) -> dict[str, torch.Tensor]:
    """diffusers weights ('<module>.weight') -> ComfyUI's named weights, fused rows placed as ComfyUI holds
    them. Only the weights all of whose parts are in `state_dict`."""
    parts: dict[str, list[tuple[Target, torch.Tensor]]] = {}
    for d, t in targets.items():
        parts.setdefault(t.weight, []).append((t, state_dict.get(f"{d}.weight")))
    out = {}
    for weight, pieces in parts.items():
        if any(w is None for _, w in pieces):
            continue
        n = max((t.rows[0] + t.rows[1]) if t.rows else w.shape[0] for t, w in pieces)
        fused = pieces[0][1].new_zeros(n, *pieces[0][1].shape[1:])
        for t, w in pieces:
            rows_of(fused, t).copy_(swapped(w, t))
        out[weight] = fused
    return out


# -- LyCORIS' LoKr and LoHa (comfy/weight_adapter/lokr.py, loha.py) ---------------------------------
# A stem is LoKr where `<stem>.lokr_w1`, `.lokr_w2`, `.lokr_w1_a` or `.lokr_w2_a` exists, LoHa where
# `<stem>.hada_w1_a` does. LoKr: w1 = lokr_w1, or lokr_w1_a @ lokr_w1_b (then its rank is w1_b's rows); w2
# likewise (its rank, where w2 is a product, wins); the update is kron(w1, w2) reshaped to the weight, times
# `<stem>.alpha` / rank where the key exists and a factor is a product, else 1. LoHa: (hada_w1_a @ hada_w1_b)
# * (hada_w2_a @ hada_w2_b), times alpha / hada_w1_b's rows where alpha exists, else 1.
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass
class Diff:
    target: Target
    stem: str
    lora: dict  # the file


def load_lycoris(lora: dict[str, torch.Tensor], stems: dict[str, Target]) -> tuple[list[Diff], set[str]]:
    """The LoKr and LoHa patches ComfyUI makes of a file, and the keys it does not load."""
    diffs, used = [], set()
    for stem, target in stems.items():
        found = [f"{stem}.{t}" for t in LOKR + LOHA if f"{stem}.{t}" in lora]
        if found:
            diffs.append(Diff(target, stem, lora))
            used |= {*found, f"{stem}.alpha"}
    return diffs, set(lora) - used


def lycoris_update(d: Diff, shape: torch.Size) -> torch.Tensor:
    """What ComfyUI adds to the (rows of the) weight for one stem, at strength 1."""
    get = lambda name: d.lora.get(f"{d.stem}.{name}")  # noqa: E731
    alpha, rank = get("alpha"), None
    if get("hada_w1_a") is not None:
        m1 = get("hada_w1_a").float() @ get("hada_w1_b").float()
        m2 = get("hada_w2_a").float() @ get("hada_w2_b").float()
        scale = float(alpha) / get("hada_w1_b").shape[0] if alpha is not None else 1.0
        return (m1 * m2).reshape(shape) * scale
    w1, w2 = get("lokr_w1"), get("lokr_w2")
    if w1 is None:
        rank, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a").float() @ get("lokr_w1_b").float()
    if w2 is None:
        rank, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a").float() @ get("lokr_w2_b").float()
    w1, w2 = w1.float(), w2.float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = float(alpha) / rank if alpha is not None and rank is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


@torch.no_grad()
def merge_lycoris(weights: dict[str, torch.Tensor], diffs: list[Diff]) -> dict[str, torch.Tensor]:
    """ComfyUI's patched weights: a copy of `weights` (ComfyUI's names) with every LoKr/LoHa update added."""
    out = {k: v.clone() for k, v in weights.items()}
    for d in diffs:
        region = rows_of(out[d.target.weight], d.target)
        region += swapped(lycoris_update(d, region.shape), d.target).to(region.dtype)
    return out
