"""Adding a peft LoRA to the denoiser and saving it, either in the diffusers format that
`<Family>Pipeline.load_lora_weights` loads with no missing or unexpected keys, or in kohya sd-scripts'
layout (the family converts) that diffusers converts on load. ComfyUI loads both to the same weights.

The diffusers file carries each module's scale alpha/rank folded into its lora_B (and metadata alpha =
rank): ComfyUI reads a scale only from `.alpha` tensors, which diffusers' Flux loader refuses beside
`lora_adapter_metadata`, so a folded scale is the one that every loader applies alike. kohya's layout has
`.alpha` tensors, which both read."""

from __future__ import annotations

import json
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import save_file

from pipeline.atomic import replacing, writer_gone
from pipeline.config import LoraConfig
from pipeline.errors import UserError
from pipeline.families.capabilities import require

# diffusers reads the adapter's LoraConfig back from this metadata key (rank, alpha, targets, DoRA)
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)  # the layers a peft LoRA can go on here
KOHYA = "config key 'train.lora_format' = \"kohya\""  # what needs the family's lora_layout


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


def add_lora(model: torch.nn.Module, cfg: LoraConfig, presets: dict[str, list[str]]) -> list[torch.nn.Parameter]:
    """Adds an adapter whose B matrices start at zero (so it changes nothing at step 0); returns its
    parameters, kept in float32 whatever the base dtype (as diffusers' scripts do)."""
    names = resolve_targets(model, cfg, presets)
    # peft full-matches a string: exactly these layers (a list would also take any layer whose name ends
    # in one of them, e.g. every block's proj_out for the top-level proj_out)
    exact = "|".join(re.escape(n) for n in names)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=exact, lora_dropout=cfg.dropout, use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
    )
    try:
        model.add_adapter(peft_cfg)
    except ValueError as e:
        raise UserError(f"config key '{target_key(cfg)}': {e}".splitlines()[0]) from None
    cast_training_params(model, dtype=torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def diffusers_weights(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors as peft holds them, under '<prefix>.<module>.lora_A.weight', ... (scale not applied)"""
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def folded_weights(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """diffusers_weights with each module's scale (alpha/rank) multiplied into its lora_B, so that B @ A at
    scale 1, what a loader that finds no alpha applies, is the trained update."""
    scales = {name: m.scaling["default"] for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = diffusers_weights(model, prefix)
    for key, tensor in out.items():
        if key.endswith(".lora_B.weight"):
            out[key] = tensor * scales[key[len(prefix) + 1 : -len(".lora_B.weight")]]
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


def save_lora(
    path: Path, model: torch.nn.Module, family, metadata: dict[str, str], cfg: LoraConfig, lora_format: str = "diffusers"
) -> None:
    """Write the LoRA atomically (temporary file, then rename) with `metadata` beside the format's own."""
    trained = sorted({k.split(".lora_")[0] for k in get_peft_model_state_dict(model)})
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
