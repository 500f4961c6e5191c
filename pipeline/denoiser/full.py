"""Full fine-tuning (train.method = "full"): which of the denoiser's own weights train, and the files the
trained denoiser is written as.

- `train_weights`: the parameters train.full_train_modules names (glob patterns over dotted names; a
  pattern naming a module takes its parameters) get requires_grad, all others stay frozen. They keep the
  dtype the model was loaded in (train.dtype), so the forward is exactly the one the priors were cached
  with: the step-0 prior loss is zero. Their fp32 master copies, if any, are the optimizer's (train/full.py).
- `save_model`: the trained denoiser as a diffusers pipeline folder: the denoiser written by its own
  `save_pretrained` (sharded safetensors, train.max_shard_size), every other component of the base folder
  hard-linked (copied where the file system cannot link), so the family's DiffusionPipeline and the
  denoiser class's `from_pretrained` load it.
- `single_file`: the denoiser's weights in one safetensors file, in the layout the family's original
  checkpoints have where the family maps it (`lora_layout.single_file_names`), else diffusers' names.
- `extract_lora`: the difference to the base as a LoRA of train.extract_rank (truncated SVD per Linear),
  in peft's names and format, which the family's `load_lora_weights` loads like a trained LoRA.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import torch

from pipeline.atomic import replacing, writer_tag
from pipeline.errors import UserError

MODEL_DIR = "model"  # the trained pipeline folder in train.output_dir
SINGLE_FILE = "model.safetensors"  # the denoiser in one file, beside it
EXTRACTED = "extracted_lora.safetensors"


def selected(name: str, patterns: list[str]) -> bool:
    """Whether a parameter's dotted name is taken by the patterns (none: every parameter)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def train_weights(model: torch.nn.Module, patterns: list[str]) -> list[torch.nn.Parameter]:
    """Mark the parameters `patterns` (train.full_train_modules) name as trainable; returns them. UserError
    naming the key for a pattern that takes nothing (a typo would silently train less)."""
    named = list(model.named_parameters())
    for p in patterns:
        if not any(selected(n, [p]) for n, _ in named):
            raise UserError(f"config key 'train.full_train_modules': {p!r} matches no parameter of the "
                            f"{type(model).__name__} (e.g. {named[0][0]!r})")
    params = []
    for name, param in named:
        param.requires_grad_(selected(name, patterns))
        if param.requires_grad:
            params.append(param)
    return params


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by name, on the CPU, as they are (their dtype): what a checkpoint holds."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def restore_trained(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A checkpoint's trained parameters into the freshly built model (before it is placed)."""
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != trained:
        other = sorted(set(tensors) ^ trained)[0]
        raise UserError(f"checkpoint '{path}' does not hold the weights this run trains (e.g. {other!r}): set "
                        "train.full_train_modules back as it was, or train with --restart to start over")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def save_model(out: Path, model: torch.nn.Module, family, max_shard_size: str, metadata: dict[str, str]) -> None:
    """The pipeline folder `out` (see the module's docstring), written under a temporary name and renamed
    into place, replacing an earlier one. `metadata`: recorded in the folder's prior_lora.json."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{writer_tag()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    component = family.denoiser_component
    try:
        tmp.mkdir(parents=True)
        for src in Path(family.root).iterdir():  # the base's other components, unchanged
            if src.name == component or src.name.startswith("."):
                continue
            if src.is_dir():
                shutil.copytree(src, tmp / src.name, copy_function=lambda a, b: _link_or_copy(Path(a), Path(b)))
            else:
                _link_or_copy(src, tmp / src.name)
        model.save_pretrained(tmp / component, safe_serialization=True, max_shard_size=max_shard_size)
        (tmp / "prior_lora.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))
        old = out.with_name(f".{out.name}.{writer_tag()}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def single_file(model: torch.nn.Module, family) -> dict[str, torch.Tensor]:
    """The whole denoiser's weights for one file: the family's original key layout where it has one
    (`lora_layout.single_file_names`: diffusers state dict -> original), else diffusers' own names."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    convert = getattr(family.lora_layout, "single_file_names", None)
    return convert(state) if convert is not None else state


def extract_lora(model: torch.nn.Module, base: dict[str, torch.Tensor], rank: int,
                 prefix: str) -> dict[str, torch.Tensor]:
    """The difference of each trained Linear's weight to the base's (`base`: name -> weight) as a LoRA of
    `rank`: W - W0 ~ B @ A from the truncated SVD (B = U S^½, A = S^½ V^T), in peft's names under
    `prefix` ('<prefix>.<module>.lora_A.weight'), scale 1 (alpha = rank). Layers that did not change are
    left out."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not module.weight.requires_grad:
            continue
        delta = module.weight.detach().float().cpu() - base[f"{name}.weight"].float()
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        # a layer narrower than `rank` gets zero rows: one rank for all, as the LoRA's config says
        b, a = torch.zeros(delta.shape[0], rank), torch.zeros(rank, delta.shape[1])
        b[:, :r], a[:r] = u[:, :r] * root, root[:, None] * vh[:r]
        out[f"{prefix}.{name}.lora_B.weight"], out[f"{prefix}.{name}.lora_A.weight"] = b, a
    return out


def save_run_model(out_dir: Path, model: torch.nn.Module, plan, steps: int) -> None:
    """The run's outputs after `steps` steps (train.method = "full"): the pipeline folder, the single file
    and, with train.extract_rank, the extracted LoRA, each with the run's metadata."""
    from pipeline.denoiser.lora import ADAPTER_METADATA_KEY, save_file_or_oserror

    cfg, family = plan.cfg, plan.family
    metadata = {"prior_lora.config": cfg.portable_json(), "prior_lora.base_model": plan.denoiser_fp,
                "prior_lora.family": family.name, "prior_lora.steps": str(steps), "prior_lora.method": "full"}
    out_dir = Path(out_dir)
    save_model(out_dir / MODEL_DIR, model, family, cfg.train.max_shard_size, metadata)
    with replacing(out_dir / SINGLE_FILE) as tmp:
        save_file_or_oserror(single_file(model, family), tmp, metadata={"format": "pt", **metadata})
    if cfg.train.extract_rank:
        base = family.load_denoiser(torch.device("cpu"), model.dtype).state_dict()
        prefix, rank = family.denoiser_component, cfg.train.extract_rank
        weights = extract_lora(model, base, rank, prefix)
        modules = sorted({k[len(prefix) + 1: -len(".lora_A.weight")] for k in weights if k.endswith("lora_A.weight")})
        adapter = {f"{prefix}.{k}": v for k, v in {"r": rank, "lora_alpha": rank, "target_modules": modules,
                                                     "use_dora": False, "lora_bias": False}.items()}
        if family.lora_layout is not None:  # the names the family's LoRA files have (train.lora_format diffusers)
            weights = family.lora_layout.diffusers_layout(weights)
        with replacing(out_dir / EXTRACTED) as tmp:
            save_file_or_oserror(weights, tmp, metadata={"format": "pt", **metadata,
                                                         ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True)})
