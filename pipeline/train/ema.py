"""train.ema: an exponential moving average of the LoRA's weights, diffusers' EMAModel over the parameters
that train, stepped after each optimizer step. It never feeds back into training: the run's LoRA, its
losses and its validation are those of the trained weights, and the average is written beside the LoRA as
`<lora stem>-ema.safetensors`, in the same layout and with the same metadata (so it loads wherever the
LoRA does). A checkpoint holds its state (EMAModel.state_dict: numbers in state.json, the averaged tensors
in state.safetensors, both under its checksums), so a resumed run averages on bit for bit.

Under FSDP each rank holds shards, so the average would be of a shard: settings.refuse_sharding refuses it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from pipeline.denoiser.lora import save_run_lora


def build(params: list[torch.nn.Parameter], decay: float) -> EMAModel:
    """The average of `params`, starting at their values (a fresh run's: the LoRA's initial weights)."""
    return EMAModel(params, decay=decay)


def load(ema: EMAModel, state: dict, device: torch.device) -> None:
    """A checkpoint's EMA state (restored by train.checkpoint.restore_ema) into `ema`, on the LoRA's device."""
    ema.load_state_dict(state)
    ema.to(device=device)


def ema_path(lora_path: Path) -> Path:
    """Where the average of the LoRA at `lora_path` is saved: beside it, '<stem>-ema<suffix>'."""
    lora_path = Path(lora_path)
    return lora_path.with_name(f"{lora_path.stem}-ema{lora_path.suffix}")


@contextlib.contextmanager
def swapped_in(ema: EMAModel, params: list[torch.nn.Parameter]):
    """The averaged weights in the model's parameters for the duration, the trained ones back after (copied
    back exactly, whatever happens inside)."""
    ema.store(params)
    try:
        ema.copy_to(params)
        yield
    finally:
        ema.restore(params)


def save_ema_lora(path: Path, ema: EMAModel, params: list[torch.nn.Parameter], model: torch.nn.Module, plan,
                  steps: int) -> Path:
    """Write the EMA's LoRA file for the LoRA file at `path` (the run's, or a checkpoint's); returns its path."""
    target = ema_path(path)
    with torch.no_grad(), swapped_in(ema, params):
        save_run_lora(target, model, plan, steps)
    return target
