"""Optimizers and learning-rate schedules, built from well-kept libraries: torch's AdamW,
bitsandbytes' AdamW8bit, prodigyopt's Prodigy, transformers' Adafactor, diffusers' get_scheduler."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from pipeline.config import OptimizerConfig
from pipeline.errors import UserError

# Optimizers that estimate their own step size from the gradients seen so far. With prior samples
# the prior loss starts near zero, which such estimates read as "almost converged" (prior-prediction wiki).
ADAPTIVE = ("prodigy",)


def build_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer over `params` (settings.resolve has refused AdamW8bit without CUDA)."""
    betas = tuple(cfg.betas)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, eps=cfg.eps)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer.name = \"adamw8bit\" needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, eps=cfg.eps)
    if cfg.name == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy's lr is a multiplier of its own estimate: 1.0 is its documented default
        return Prodigy(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, safeguard_warmup=True)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed lr (relative_step=False) so the schedule below applies, as in diffusers' scripts
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    raise UserError(f"config key 'optimizer.name' has no builder for {cfg.name!r}")  # validate() prevents this


def build_scheduler(optimizer, cfg: OptimizerConfig, total_steps: int):
    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
