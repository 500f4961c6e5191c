"""Adding a peft adapter (lora.type: LoRA, LoKr or LoHa) to the denoiser and saving it, either in the
diffusers format that `<Family>Pipeline.load_lora_weights` loads with no missing or unexpected keys, or in
kohya sd-scripts' layout (the family converts) that diffusers converts on load. ComfyUI loads both to the
same weights. LoKr and LoHa go in the diffusers format (peft's names and config, which diffusers'
`load_lora_adapter` reads for LoKr) or in the LyCORIS layout ComfyUI reads (`lokr_w1`, `hada_w1_a`...).

The diffusers file carries each module's scale alpha/rank folded into its lora_B (LoKr: lokr_w1, LoHa:
hada_w1_a) and metadata alpha = rank: ComfyUI reads a scale only from `.alpha` tensors, which diffusers' Flux
loader refuses beside `lora_adapter_metadata`, so a folded scale is the one that every loader applies
alike. kohya's and LyCORIS' layouts have `.alpha` tensors, which both read."""

from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lokr.layer import factorization
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pipeline.atomic import replacing, writer_gone
from pipeline.config import LoraConfig
from pipeline.errors import UserError
from pipeline.families.capabilities import require

# diffusers reads the adapter's LoraConfig back from this metadata key (rank, alpha, targets, DoRA)
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)  # the layers a peft LoRA can go on here
KOHYA = "config key 'train.lora_format' = \"kohya\""  # what needs the family's lora_layout
# each adapter type's tensors (peft's names), and the one the scale alpha/rank is folded into
ADAPTER_TENSORS = {"lora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
                   "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
                   "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")}
NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa"}


def target_key(cfg: LoraConfig) -> str:
    """The config key that chose the LoRA's modules: the regex wins over the list, the list over the preset."""
    return "lora.target_regex" if cfg.target_regex else "lora.target_modules" if cfg.target_modules else "lora.targets"


def describe_targets(cfg: LoraConfig) -> str:
    key = target_key(cfg)
    value = cfg.target_regex if cfg.target_regex else cfg.target_modules or cfg.targets
    return f"{key} = {json.dumps(value)}"


def _matches(name: str, entry: str) -> bool:
    # peft's rule for a list (the name, or a suffix after a dot), with `*` allowed for a block index
    return fnmatchcase(name, entry) or fnmatchcase(name, "*." + entry)


def resolve_targets(model: torch.nn.Module, cfg: LoraConfig, presets: dict[str, list[str]]) -> list[str]:
    """Full names of the layers the LoRA goes on. UserError naming the key for a list entry, a regex or a
    preset that matches no layer."""
    layers = [name for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)]
    key, kind = target_key(cfg), type(model).__name__
    if cfg.target_regex:
        names = [n for n in layers if re.fullmatch(cfg.target_regex, n)]
    else:
        if cfg.target_modules:
            entries = cfg.target_modules
            for entry in entries:  # a typo would otherwise silently train fewer modules
                if not any(_matches(n, entry) for n in layers):
                    raise UserError(f"config key '{key}': {entry!r} matches no Linear or Conv2d layer of the {kind}")
        elif cfg.targets in presets:
            entries = presets[cfg.targets]
        else:
            raise UserError(f"config key '{key}': this model family has no preset {cfg.targets!r} ({', '.join(presets)})")
        names = [n for n in layers if any(_matches(n, e) for e in entries)]
    if not names:
        raise UserError(f"config key '{key}': {describe_targets(cfg)} matches no Linear or Conv2d layer of the {kind}")
    return names


def peft_config(cfg: LoraConfig, target_modules: str):
    """peft's config of the adapter lora.type names. Each starts at zero, so the adapted model is the base at
    step 0: a LoRA's B = 0, a LoKr's first factor (lokr_w1, or lokr_w1_a) = 0, a LoHa's hada_w2_b = 0 (peft's
    init_weights=True)."""
    if cfg.type == "lokr":
        return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=target_modules,
                          decompose_factor=cfg.lokr_factor, init_weights=True)
    if cfg.type == "loha":
        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=target_modules, init_weights=True)
    return PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=target_modules, lora_dropout=cfg.dropout,
        use_dora=cfg.use_dora, init_lora_weights=True if cfg.init == "default" else cfg.init,
    )


def adapter_shapes(module: torch.nn.Module, cfg: LoraConfig) -> list[tuple[int, int]]:
    """The shapes (as matrices) of the factors the adapter of lora.type puts on a Linear or Conv2d layer,
    as peft makes them (the memory planner counts these; a DoRA's magnitudes come on top)."""
    r = cfg.rank
    if isinstance(module, torch.nn.Linear):
        fan_in, fan_out, kernel = module.in_features, module.out_features, 1
    else:
        fan_in, fan_out = module.in_channels, module.out_channels
        kernel = module.kernel_size[0] * module.kernel_size[1]
    if cfg.type == "loha":
        return [(fan_out, r), (r, fan_in * kernel)] * 2
    if cfg.type == "lokr":  # kron(w1, w2): w1 (l, m) whole; w2 (k, n) whole, or (k, r) @ (r, n) where r is small
        (l, k), (m, n) = factorization(fan_out, cfg.lokr_factor), factorization(fan_in, cfg.lokr_factor)
        return [(l, m), (k, n * kernel)] if r >= max(k, n) / 2 else [(l, m), (k, r), (r, n * kernel)]
    return [(r, fan_in * kernel), (fan_out, r)]  # Conv2d: A takes the kernel, B is 1x1


def add_lora(model: torch.nn.Module, cfg: LoraConfig, presets: dict[str, list[str]]) -> list[torch.nn.Parameter]:
    """Adds an adapter (lora.type) that starts at zero (so it changes nothing at step 0); returns its
    parameters, kept in float32 whatever the base dtype (as diffusers' scripts do)."""
    names = resolve_targets(model, cfg, presets)
    # peft full-matches a string: exactly these layers (a list would also take any layer whose name ends
    # in one of them, e.g. every block's proj_out for the top-level proj_out)
    exact = "|".join(re.escape(n) for n in names)
    peft_cfg = peft_config(cfg, exact)
    try:
        model.add_adapter(peft_cfg)
    except ValueError as e:
        raise UserError(f"config key '{target_key(cfg)}': {e}".splitlines()[0]) from None
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def diffusers_weights(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft holds them, under '<prefix>.<module>.lora_A.weight', ... (scale not applied)"""
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def adapter_scales(model: torch.nn.Module) -> dict[str, float]:
    """Each adapted module's scale alpha/rank, by its name."""
    return {name: m.scaling["default"] for name, m in model.named_modules() if isinstance(m, (LoraLayer, LycorisLayer))}


def split_key(key: str) -> tuple[str, str]:
    """'<module>.<adapter tensor>' -> (module, tensor), for every adapter type's tensors."""
    for tensors in ADAPTER_TENSORS.values():
        for t in tensors:
            if key.endswith("." + t):
                return key[: -len(t) - 1], t
    raise ValueError(f"not an adapter tensor: {key}")


def _folds(tensors: set[str]) -> str:
    """The tensor a module's scale is multiplied into: one factor of each product (LoKr: the whole w1 or
    w1's left half; LoHa: the first product's left half; LoRA: B)."""
    return next(t for t in ("lora_B.weight", "lokr_w1", "lokr_w1_a", "hada_w1_a") if t in tensors)


def folded_weights(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """diffusers_weights with each module's scale (alpha/rank) multiplied into one factor (a LoRA's lora_B),
    so that the update at scale 1, what a loader that finds no alpha applies, is the trained update."""
    scales = adapter_scales(model)
    out = diffusers_weights(model, prefix)
    by_module: dict[str, set[str]] = {}
    for key in out:
        module, tensor = split_key(key)
        by_module.setdefault(module, set()).add(tensor)
    for module, tensors in by_module.items():
        key = f"{module}.{_folds(tensors)}"
        out[key] = out[key] * scales[module[len(prefix) + 1 :]]
    return out


def lycoris_weights(model: torch.nn.Module, family) -> dict[str, torch.Tensor]:
    """The LoKr or LoHa in LyCORIS' layout, which ComfyUI reads (comfy/weight_adapter/lokr.py, loha.py):
    '<stem>.lokr_w1'... with '<stem>.alpha', the stem a name ComfyUI maps onto the module (the family's
    lora_layout.lycoris_stem; peft's '<denoiser_component>.<module>' without one). The factors are as
    trained. ComfyUI scales a LoHa by alpha / rank, a LoKr by alpha / rank only where a factor is a product
    of two (lokr_w1_a @ lokr_w1_b, or w2's), else by 1: there the scale is folded into lokr_w1, with no alpha."""
    prefix = family.denoiser_component
    stem = getattr(family.lora_layout, "lycoris_stem", None) or (lambda module: f"{prefix}.{module}")
    alpha = float(model.peft_config["default"].alpha)
    scales = adapter_scales(model)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        module, name = split_key(key)
        by_module.setdefault(module, {})[name] = tensor.detach().to("cpu").contiguous()
    out = {}
    for module, tensors in sorted(by_module.items()):
        name = stem(module)
        if "lokr_w1" in tensors and "lokr_w2" in tensors:
            tensors["lokr_w1"] = tensors["lokr_w1"] * scales[module]
        else:
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        out.update({f"{name}.{t}": v for t, v in tensors.items()})
    return out


def kohya_weights(model: torch.nn.Module, family, cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """The adapter in kohya's layout, converted by the family. UserError naming train.lora_format and the
    key that chose the targets when the layout cannot hold them (the trainer calls this before step 0)."""
    layout = require(family, "lora_layout", KOHYA)
    weights = diffusers_weights(model, family.denoiser_component)
    if any("lora_magnitude_vector" in k for k in weights):
        raise UserError("config key 'train.lora_format' = \"kohya\" cannot hold a DoRA (lora.use_dora = true): "
                        "use train.lora_format = \"diffusers\"")
    try:
        return layout.to_kohya(weights, float(model.peft_config["default"].lora_alpha))
    except UserError as e:
        raise UserError(f"{e} (with {describe_targets(cfg)}): choose other targets or "
                        f"train.lora_format = \"diffusers\"") from None


def lora_file(model: torch.nn.Module, family, cfg: LoraConfig, lora_format: str) -> tuple[dict, dict[str, str]]:
    """The tensors and the format's own metadata of the file save_lora writes."""
    prefix = family.denoiser_component
    peft_cfg = model.peft_config["default"]
    if cfg.type != "lora":
        return adapter_file(model, family, cfg, lora_format)
    if lora_format == "kohya":
        # what kohya's tools (and the A1111/Forge LoRA pages) read; no lora_adapter_metadata, which diffusers
        # would apply to the converted keys
        meta = {"ss_network_dim": str(peft_cfg.r), "ss_network_alpha": str(float(peft_cfg.lora_alpha)),
                **require(family, "lora_layout", KOHYA).kohya_metadata}
        return kohya_weights(model, family, cfg), meta
    weights = folded_weights(model, prefix)
    if family.lora_layout is not None:  # else peft's names, which diffusers loads
        weights = family.lora_layout.diffusers_layout(weights)
    # alpha = rank: the scale is in lora_B already (the trained alpha stays in prior_lora.config)
    adapter = {**peft_cfg.to_dict(), "lora_alpha": peft_cfg.r, "alpha_pattern": dict(peft_cfg.rank_pattern)}
    adapter = {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in adapter.items()}
    return weights, {ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True, default=str)}


def adapter_file(model: torch.nn.Module, family, cfg: LoraConfig, lora_format: str) -> tuple[dict, dict[str, str]]:
    """A LoKr's or LoHa's file: the LyCORIS layout (ComfyUI), or peft's names and config with the scale
    folded (alpha = rank), which diffusers' load_lora_adapter reads for a LoKr (and peft for either)."""
    peft_cfg = model.peft_config["default"]
    if lora_format == "lycoris":
        # what kohya's and LyCORIS' tools read about the network
        args = {"algo": cfg.type, **({"factor": cfg.lokr_factor} if cfg.type == "lokr" else {})}
        return lycoris_weights(model, family), {
            "ss_network_module": "lycoris.kohya", "ss_network_dim": str(peft_cfg.r),
            "ss_network_alpha": str(float(peft_cfg.alpha)), "ss_network_args": json.dumps(args)}
    prefix = family.denoiser_component
    adapter = {k: v for k, v in peft_cfg.to_dict().items() if k not in ("peft_type", "task_type")}
    adapter = {**adapter, "alpha": peft_cfg.r, "alpha_pattern": dict(peft_cfg.rank_pattern)}
    adapter = {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in adapter.items()}
    return folded_weights(model, prefix), {ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True, default=str)}


def load_into_pipeline(pipe, family, path: Path) -> None:
    """A saved adapter file into the family's pipeline, as its users load it: `load_lora_weights`; a LoKr
    the pipeline does not read through its denoiser's `load_lora_adapter`; a LoHa (no diffusers loader)
    through peft. UserError for a LoKr/LoHa file in the LyCORIS layout, which only ComfyUI reads."""
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
    kind = next((t for t, marker in (("lokr", ".lokr_"), ("loha", ".hada_")) if any(marker in k for k in keys)), "lora")
    component = family.denoiser_component
    if kind == "lora" or kind in family.pipeline_adapter_types:
        pipe.load_lora_weights(str(path))
        return
    if ADAPTER_METADATA_KEY not in meta or not all(k.startswith(component + ".") for k in keys):
        raise UserError(f"'{path}' is a {NAMES[kind]} in the LyCORIS layout, which ComfyUI reads and diffusers does "
                        f"not: train with train.lora_format = \"diffusers\" for a file diffusers loads")
    denoiser = getattr(pipe, component)
    if kind == "lokr":
        denoiser.load_lora_adapter(str(path), prefix=component)
        return
    config = {k.removeprefix(component + "."): v for k, v in json.loads(meta[ADAPTER_METADATA_KEY]).items()}
    inject_adapter_in_model(LoHaConfig(**config), denoiser)
    state = {k.removeprefix(component + "."): v for k, v in load_file(str(path)).items()}
    set_peft_model_state_dict(denoiser, state)


def save_lora(
    path: Path, model: torch.nn.Module, family, metadata: dict[str, str], cfg: LoraConfig, lora_format: str = "diffusers"
) -> None:
    """Write the LoRA atomically (temporary file, then rename) with `metadata` beside the format's own."""
    trained = sorted({split_key(k)[0] for k in get_peft_model_state_dict(model)})
    weights, format_meta = lora_file(model, family, cfg, lora_format)
    meta = {"format": "pt", **metadata, "prior_lora.target_modules": json.dumps(trained), **format_meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
        if writer_gone(stale.name.rsplit(".", 2)[-2]):
            stale.unlink(missing_ok=True)
    with replacing(path) as tmp:
        save_file_or_oserror(weights, tmp, metadata=meta)
        # safetensors creates its file readable by its owner only; a LoRA is for sharing, so it gets the
        # permissions any file the user makes gets (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def save_file_or_oserror(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with a failed write (a full disk, a file too large) raised as the OSError it
    is rather than safetensors' own error type, so that callers handle every failed write alike."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if not found:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


# In every checkpoint folder, beside the state that --resume reads: the name diffusers' load_lora_weights
# looks for when given a folder, so `load_lora_weights("…/checkpoints/step-N")` works too.
CHECKPOINT_LORA = "pytorch_lora_weights.safetensors"


def save_run_lora(path: Path, model: torch.nn.Module, plan, steps: int) -> None:
    """The run's LoRA file after `steps` steps, in its format with its metadata: the final save and every
    checkpoint write this same file, so a checkpoint's LoRA loads wherever the final one does."""
    cfg = plan.cfg
    metadata = {"prior_lora.config": cfg.portable_json(), "prior_lora.base_model": plan.denoiser_fp,
                "prior_lora.family": plan.family.name, "prior_lora.steps": str(steps)}
    save_lora(path, model, plan.family, metadata, cfg.lora, cfg.train.lora_format)
