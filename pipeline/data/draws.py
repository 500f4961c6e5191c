"""A draw: the timestep and the noise of one training input, each from a seed.

Prior samples (and held-out images) use the K draws cached per image (noise entries), because their
target, the base model's prediction, was computed at exactly that input. Standard samples draw afresh
at every step, as every peer does, from seeds of (train seed, step, position in the step's batch), so a
run is reproducible and a resumed run continues bit for bit. With train.prior_mode = "online" prior samples
draw afresh too (their target is computed at the draw, as the peers do). Both kinds follow one recipe:

  timestep: u from the scheme (diffusers' compute_density_for_timestep_sampling), index = floor(u * N)
            into the family's training table, shifted as cache.shift / cache.dynamic_shift say
  noise:    objective.draw_noise with cache.noise_offset and cache.input_perturbation
"""

from __future__ import annotations

import torch

from pipeline.store.keys import derive_seed
from pipeline.config import Config
from pipeline.objective import draw_noise, draw_timestep_index


def timestep_scheme(cfg: Config, family) -> str:
    return family.default_timestep_sampling if cfg.cache.timestep_sampling == "auto" else cfg.cache.timestep_sampling


def draw_settings(cfg: Config, family) -> dict:
    """Everything a draw depends on, for the noise entries' keys (and so the priors'). Only the settings in
    use: changing an unused one recomputes nothing, and a cache made before an option existed stays valid."""
    c, scheme = cfg.cache, timestep_scheme(cfg, family)
    used = {"uniform": {}, "logit_normal": {"logit_mean": c.logit_mean, "logit_std": c.logit_std},
            "mode": {"mode_scale": c.mode_scale}}[scheme]
    options = {"shift": c.shift, "dynamic_shift": c.dynamic_shift, "noise_offset": c.noise_offset,
               "input_perturbation": c.input_perturbation}
    return {"scheme": scheme, **used, **{k: v for k, v in options.items() if v}}


def fresh_seeds(cfg: Config, step: int, position: int) -> tuple[int, int]:
    """(noise seed, timestep seed) of a fresh draw (a standard sample, or an online prior) at this optimizer
    step and batch position."""
    return (derive_seed("train-noise", cfg.train.seed, step, position),
            derive_seed("train-timestep", cfg.train.seed, step, position))


class Draws:
    """The draw recipe for one config: the (shifted) timestep table per latent size, and the noise."""

    def __init__(self, cfg: Config, family):
        self.cfg, self.family = cfg, family
        self.scheme = timestep_scheme(cfg, family)
        # settings.resolve has refused a shift for a family without a shifted table, config.py both at once
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, latent_hw: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training timesteps and their sigmas for latents of this (height, width); the size matters only
        with cache.dynamic_shift."""
        c = self.cfg.cache
        key = latent_hw if c.dynamic_shift else ()
        if key not in self._tables:
            if c.shift or c.dynamic_shift:
                self._tables[key] = self.family.shifted_table(c.shift, latent_hw if c.dynamic_shift else None)
            else:
                self._tables[key] = self.family.timestep_table()
        return self._tables[key]

    def timestep(self, latent_hw: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timestep, sigma), 0-d float32, drawn with this seed."""
        timesteps, sigmas = self.table(latent_hw)
        c = self.cfg.cache
        g = torch.Generator("cpu").manual_seed(seed)
        i = draw_timestep_index(g, len(timesteps), self.scheme, c.logit_mean, c.logit_std, c.mode_scale)
        return timesteps[i].reshape(()).float(), sigmas[i].reshape(()).float()

    def noise(self, seed: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise of the target, noise of the input), float32."""
        return draw_noise(seed, shape, self.cfg.cache.noise_offset, self.cfg.cache.input_perturbation)
