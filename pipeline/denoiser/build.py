"""The denoiser as both stages hold it: loaded (quantized with model.quantize), the LoRA added, gradient
checkpointing as configured, placed with train.blocks_to_swap blocks swapped, in train mode. The cache
stage computes priors on this same model, so a prior is the training forward's step-0 output."""

from __future__ import annotations

import torch

from pipeline.denoiser.model import Denoiser
from pipeline.config import Config
from pipeline.errors import warn
from pipeline.denoiser.full import train_weights
from pipeline.denoiser.lora import NAMES, add_lora, kohya_weights
from pipeline.denoiser.swap import load_denoiser


def prepare_model(model: torch.nn.Module, cfg, family, checks: bool = True) -> list[torch.nn.Parameter]:
    """What training does to the loaded denoiser: add the LoRA (its parameters are returned), check the
    output format, turn on gradient checkpointing. `make bench-memory` measures a step after this too.
    checks: refuse what the LoRA file's format cannot hold, warn about DoRA (the train stage; the cache
    stage saves no LoRA). With train.method = "full" no LoRA: the weights train.full_train_modules names
    train (in the train stage; the cache stage's base is the same without it, a LoRA at zero adds exactly 0)."""
    if cfg.train.method == "full":
        params = train_weights(model, cfg.train.full_train_modules) if checks else []
        if cfg.train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return params
    params = add_lora(model, cfg.lora, family.target_presets)
    if cfg.train.lora_format == "kohya" and checks:
        kohya_weights(model, family, cfg.lora)  # refuse now, not after training, what kohya's layout cannot hold
    elif cfg.lora.use_dora and checks:
        # ComfyUI has no reader for peft's magnitude vectors (its DoRA normalises the other axis of the weight)
        warn("lora.use_dora = true: the LoRA file loads in diffusers, but ComfyUI would load it without DoRA's "
             "magnitudes, so its images would differ")
    if cfg.lora.type != "lora" and checks:
        say_loader(cfg, family)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # recompute activations in backward: memory for time
    return params


def say_loader(cfg, family) -> None:
    """One line at the start where no diffusers pipeline of the family loads the LoKr or LoHa file."""
    kind, name, component = cfg.lora.type, NAMES[cfg.lora.type], family.denoiser_component
    if cfg.train.lora_format == "lycoris":
        warn(f"train.lora_format = \"lycoris\": the {name} file is in the layout ComfyUI reads; {family.name}'s "
             f"diffusers pipeline does not read it (train.lora_format = \"diffusers\" writes what diffusers reads)")
    elif kind == "loha":
        warn("lora.type = \"loha\": diffusers has no loader for LoHa files (peft's set_peft_model_state_dict loads "
             "this one); train.lora_format = \"lycoris\" writes the layout ComfyUI reads")
    elif kind not in family.pipeline_adapter_types:
        warn(f"lora.type = \"{kind}\": {family.name}'s diffusers pipeline does not load {name} files "
             f"(load_lora_weights); pipe.{component}.load_lora_adapter(path, prefix=\"{component}\") does, and "
             f"train.lora_format = \"lycoris\" writes the layout ComfyUI reads")


def build_denoiser(cfg: Config, family, device: torch.device, dtype: torch.dtype, checks: bool = True,
                   place: bool = True) -> tuple[Denoiser, list]:
    """The denoiser as training holds it: loaded (quantized with model.quantize), the LoRA added with B = 0,
    gradient checkpointing as configured, placed with train.blocks_to_swap blocks swapped, in train mode.
    The cache stage computes priors on this same model, so a prior is the training forward's step-0 output
    whatever the backend's kernels do in each mode. Returns it with the LoRA's parameters.
    place: false leaves it on the CPU, unswapped, for the process setup to place on `device` (FSDP shards
    it from there)."""
    found: list[torch.nn.Parameter] = []
    # before the model is placed: the LoRA goes where its block's weights go
    prepare = lambda model: found.extend(prepare_model(model, cfg, family, checks))  # noqa: E731
    model, swap = load_denoiser(family, device if place else torch.device("cpu"), dtype,
                                cfg.train.blocks_to_swap if place else 0, prepare)
    model.train()
    return Denoiser(model, device, dtype, swap), found
