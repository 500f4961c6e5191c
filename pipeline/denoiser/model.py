"""The denoiser as a stage holds it, and its one forward on a batch: the prior computed at cache time and
the training step both call `forward`, so they run the same computation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Denoiser:
    """The denoiser as a stage holds it (possibly wrapped by peft, DDP or FSDP), with where it runs: the
    family's forward is given these rather than reading them off a module a wrapper may hide."""

    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    swap: object = None  # the BlockSwap placing its swapped blocks (train.blocks_to_swap), or None


def forward(family, denoiser: Denoiser, inputs) -> torch.Tensor:
    """One denoiser forward on a batch (`inputs`: a data.batches.Inputs): the prior computed at cache time and
    the training step both call this."""
    return family.predict(denoiser.module, inputs.noisy, inputs.timesteps, inputs.cond, device=denoiser.device,
                          dtype=denoiser.dtype)
