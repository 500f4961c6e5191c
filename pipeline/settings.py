"""Resolve and refuse once: `resolve` turns a config and its model family into the settings every stage
runs with (devices, dtypes, the numerics a prior is keyed by, the process setup, the family with its defaults), and holds every refusal that combines keys, or a key with the family or
the machine. It runs first in every command, before any model loads and before any cache work, so each
refusal is one line within the first seconds.

What the config file alone can be refused for (a value out of range, an unknown choice, keys of the file
that exclude each other, a device this torch does not have) is refused earlier still, by
pipeline/config.py as the file is read: the rule is that config.py needs nothing but the file and this
machine's torch, and everything that needs the model folder or the launcher is here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipeline import quantize
from pipeline.config import Config
from pipeline.errors import UserError, note
from pipeline.families.load import get_family
from pipeline.families.base import Family
from pipeline.families.capabilities import require
from pipeline.processes import launched_sharded, launched_size

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STAGES = ("cache", "train", "other")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prior_device(cfg: Config) -> torch.device:
    """Where the cache stage computes priors. Their key names the device type training runs on (train.device),
    since kernels differ between device types: cache.device when it is of that type, else train.device."""
    cache, train = pick_device(cfg.cache.device), pick_device(cfg.train.device)
    return cache if cache.type == train.type else train


@dataclass(frozen=True)
class Settings:
    cfg: Config
    family: Family
    numerics: dict  # what else decides the denoiser's output (pipeline/quantize.py): part of the prior key
    processes: str  # "one", "ddp" (several processes, each the whole model) or "fsdp" (sharded)
    device: torch.device  # the stage's device in one process (under a launcher, each rank's own)
    prior_device: torch.device  # where the cache stage computes priors
    dtype: torch.dtype  # the frozen denoiser's (train.dtype)
    encoder_dtype: torch.dtype  # the VAE's and the text encoders' at cache time

    def stage_device(self, procs) -> torch.device:
        """The device this process runs the stage on: its rank's under a launcher, else the config's."""
        return procs.device or self.device

    def prior_device_of(self, procs) -> torch.device:
        """Under a launcher, this rank's own device when it is of the type priors are keyed by."""
        d = procs.device
        return d if d is not None and d.type == self.prior_device.type else self.prior_device


def resolve(cfg: Config, stage: str = "other") -> Settings:
    """The settings of `cfg` for a stage ("cache", "train", or "other" for the commands that only read),
    or a one-line UserError naming the keys that cannot go together. Loads no model: the family is read
    from the model folder's model_index.json and configs."""
    family = get_family(cfg.model)  # the family's own refusals of model.* keys (prediction_type...) come here
    processes = processes_kind(cfg, stage)
    _refuse(cfg, family, processes)
    device = pick_device(cfg.cache.device if stage == "cache" else cfg.train.device)
    return Settings(
        cfg=cfg, family=family,
        numerics=quantize.numerics(cfg.model.quantize, pick_device(cfg.train.device).type),
        processes=processes, device=device, prior_device=prior_device(cfg),
        dtype=TORCH_DTYPES[cfg.train.dtype], encoder_dtype=TORCH_DTYPES[cfg.model.encoder_dtype],
    )


def processes_kind(cfg: Config, stage: str, quiet: bool = False) -> str:
    """One process, or under a launcher data-parallel or sharded. Only training shards (the cache stage
    computes each prior with the whole model); an accelerate config's FSDP counts as train.fsdp = true.
    Needs no model folder: the cache stage starts its processes before the [embedded] model is built.
    quiet: without the notes (they are said once, by resolve)."""
    size = launched_size()
    if size <= 1:
        if cfg.train.fsdp and stage == "train" and not quiet:
            note("train: train.fsdp = true shards the denoiser across the processes of a launcher; with one process "
                 "there is nothing to shard over, so it trains unsharded")
        return "one"
    device_key, device = ("cache.device", cfg.cache.device) if stage == "cache" else ("train.device", cfg.train.device)
    if re.fullmatch(r"cuda:\d+", device):
        raise UserError(f"config key '{device_key}' is {device!r}, but {size} processes each need their own "
                        "GPU: set it to \"auto\" (or \"cuda\") under a launcher")
    if stage == "train" and (cfg.train.fsdp or launched_sharded()):
        if not cfg.train.fsdp and not quiet:
            note("train: the accelerate config's distributed_type FSDP is taken as train.fsdp = true: each "
                 "transformer block one FSDP2 unit (its fsdp_* settings are not used)")
        if cfg.train.blocks_to_swap and not quiet:
            note(f"train: sharded (train.fsdp) across {size} processes, so train.blocks_to_swap = "
                 f"{cfg.train.blocks_to_swap} is for the cache stage's prior forward only")
        return "fsdp"
    return "ddp"


def _refuse(cfg: Config, family: Family, processes: str) -> None:
    """Every refusal that combines keys, or a key with the family, the machine or the process setup."""
    t = cfg.train
    if cfg.data.resolution % family.pixel_multiple and not cfg.data.resolutions:
        raise UserError(f"config key 'data.resolution' must be a multiple of {family.pixel_multiple} for {family.name}")
    for r in cfg.data.resolutions:
        if r % family.pixel_multiple:
            raise UserError(f"config key 'data.resolutions' must hold multiples of {family.pixel_multiple} for "
                            f"{family.name}, got {r}")
    if cfg.cache.shift or cfg.cache.dynamic_shift:  # a family without a shifted table refuses the key
        family.shifted_table(cfg.cache.shift, (2, 2) if cfg.cache.dynamic_shift else None)
    if t.loss_weighting not in family.loss_weightings:
        raise UserError(f"config key 'train.loss_weighting' must be one of {', '.join(family.loss_weightings)} "
                        f"for {family.name}, got {t.loss_weighting!r}")
    if t.blocks_to_swap and not family.swap_blocks:
        raise UserError(f"config key 'train.blocks_to_swap' is for transformer families; {family.name}'s denoiser "
                        "has no list of blocks to swap: set it to 0")
    if cfg.optimizer.name == "adamw8bit" and pick_device(t.device).type != "cuda":
        raise UserError("optimizer.name = \"adamw8bit\" needs a CUDA GPU (bitsandbytes); use \"adamw\" here")
    if t.lora_format == "kohya":  # a family without a kohya/ComfyUI layout cannot write one
        require(family, "lora_layout", 'config key \'train.lora_format\' = "kohya"')
    if cfg.validation.prompts:  # the sample grids render through the family's own pipeline
        require(family, "sampling", "config key 'validation.prompts'")
    if t.lora_format == "kohya" and cfg.lora.use_dora:
        raise UserError("config key 'train.lora_format' = \"kohya\" cannot hold a DoRA (lora.use_dora = true): "
                        "use train.lora_format = \"diffusers\"")
    if t.method == "full" and processes != "one" and t.fused_backward:
        # the fused step runs in each weight's gradient hook, before DDP's all-reduce (or FSDP's
        # reduce-scatter) has averaged that gradient across the ranks: each rank would step on its own
        raise UserError(f"config key 'train.fused_backward' works in one process only (this launcher started "
                        f"{launched_size()}): set it to false, or run without the launcher")
    if processes == "fsdp":
        refuse_sharding(cfg, family)


def refuse_sharding(cfg: Config, family) -> None:
    """What sharded training (train.fsdp under a launcher) does not take, in one line naming the key."""
    if cfg.lora.type != "lora":  # its tests shard LoRA's two factors; a LoKr or LoHa is not checked sharded
        raise UserError(f"config key 'train.fsdp' works with lora.type = \"lora\" only (got {cfg.lora.type!r}): "
                        "set one of them")
    if not family.swap_blocks:
        raise UserError(f"config key 'train.fsdp' shards transformer families by block; {family.name}'s denoiser "
                        "has no list of blocks (and fits one GPU): set it to false")
    if cfg.model.quantize != "none":
        raise UserError(f"config key 'train.fsdp' works with model.quantize = \"none\" only (got "
                        f"{cfg.model.quantize!r}): quantized weights are not sharded here; set one of them")
    if cfg.train.prior_mode != "cached":
        # every forward is a collective, and only the ranks whose share holds a prior sample would run it
        raise UserError(f"config key 'train.fsdp' works with train.prior_mode = \"cached\" only (got "
                        f"{cfg.train.prior_mode!r}: its second forward runs on some ranks only)")
    if cfg.train.method == "full" and cfg.train.dtype != "fp32" and not cfg.train.master_weights:
        # stochastic rounding writes each weight from a temporary fp32 copy that is not kept: not built for shards
        raise UserError(f"config key 'train.fsdp' with train.method = \"full\" and train.dtype = "
                        f"\"{cfg.train.dtype}\" needs train.master_weights = true (sharded, each rank holds 1/N of them)")
    if cfg.optimizer.name != "adamw":
        raise UserError(f"config key 'train.fsdp' works with optimizer.name = \"adamw\" only (got "
                        f"{cfg.optimizer.name!r}): its state is sharded like the LoRA's weights")
    if cfg.train.ema:
        # each rank would average its shard alone, and saving the average needs the whole LoRA
        raise UserError("config key 'train.fsdp' works with train.ema = false only: the EMA is of the whole LoRA; "
                        "set one of them")
