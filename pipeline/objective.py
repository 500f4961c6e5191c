"""Pure functions of the training objective. Flow matching (rectified flow) as in the SD3 paper
(arXiv 2403.03206) and diffusers' Flux training: x_t = (1 - sigma) x0 + sigma noise, target noise - x0."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling


def expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = expand(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def draw_timestep_index(
    generator: torch.Generator, num_train_timesteps: int, scheme: str, mean: float, std: float, mode_scale: float
) -> int:
    """One index into the scheduler's training timesteps, drawn like diffusers' Flux/SD3 scripts do:
    u from `compute_density_for_timestep_sampling`, then index = floor(u * num_train_timesteps)."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme="none" if scheme == "uniform" else scheme,
        batch_size=1,
        logit_mean=mean,
        logit_std=std,
        mode_scale=mode_scale,
        generator=generator,
    )
    return min(int(u.item() * num_train_timesteps), num_train_timesteps - 1)


def draw_noise(seed: int, shape, offset: float = 0.0, perturbation: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented noise recipe, so anyone can regenerate a draw from its seed: one generator gives
    randn(shape), then with an offset, offset * randn(C, 1, 1) added to it (a per-channel constant: lets the
    model move an image's mean brightness), then with a perturbation, perturbation * randn(shape) added to
    the input's copy only. Returns (noise of the target, noise of the input), float32."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((shape[0], 1, 1), generator=g, dtype=torch.float32)
    if not perturbation:
        return noise, noise
    return noise, noise + perturbation * torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in float32 whatever the model dtype."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
