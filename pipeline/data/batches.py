"""Assembling a batch from the cache: the one place both stages turn entries into model inputs, so the
prior forward at cache time and the training forward see the same tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data import schema
from pipeline.store.store import Store
from pipeline.data.plan import Plan, Sample


@dataclass
class Inputs:
    """One batch, as the denoiser and the loss see it. `cond` holds the text entry's tensors plus the image
    geometry stored with the latent (original_size, crop_top_left: the micro-conditioning of UNet families)."""

    latents: torch.Tensor  # clean latents x0 (B,C,h,w), float32
    noise: torch.Tensor  # (B,C,h,w), float32, from each draw's seed
    noisy: torch.Tensor  # x_t, as the family forms it
    timesteps: torch.Tensor  # (B,) on the scheduler's 0..1000 scale
    sigmas: torch.Tensor  # (B,)
    cond: dict[str, torch.Tensor]  # batched conditioning

    def subset(self, mask: torch.Tensor) -> Inputs:
        """The samples where `mask` is true."""
        return Inputs(self.latents[mask], self.noise[mask], self.noisy[mask], self.timesteps[mask], self.sigmas[mask],
                      {k: t[mask] for k, t in self.cond.items()})


def load_inputs(plan: Plan, store: Store, items: list[tuple[Sample, int]],
                fresh: list[tuple[int, int] | None] | None = None) -> Inputs:
    """The inputs for (sample, variant) pairs, exactly as the train stage builds them. Each draw is the
    cached one (the variant's noise entry), or where `fresh` gives (noise seed, timestep seed), a new one."""
    latents, noises, inputs, timesteps, sigmas, texts = [], [], [], [], [], []
    for i, (s, v) in enumerate(items):
        entry = schema.read(plan, store, "latent", s.latent_keys[v], s)[0]
        lat = entry.pop("latent")
        seeds = fresh[i] if fresh else None
        if seeds is None:
            n = schema.read(plan, store, "noise", s.noise_keys[v])[0]
            seed, timestep, sigma = int(n["seed"]), n["timestep"], n["sigma"]
        else:
            seed, (timestep, sigma) = seeds[0], plan.draws.timestep(tuple(lat.shape[1:]), seeds[1])
        noise, noise_in = plan.draws.noise(seed, lat.shape)
        latents.append(lat)
        noises.append(noise)
        inputs.append(noise_in)
        timesteps.append(timestep)
        sigmas.append(sigma)
        # read per step, not memoised: a Flux caption at 512 tokens is 8 MiB, and reading costs
        # milliseconds against a step of a second, while a memo of all captions could be gigabytes
        texts.append({**schema.read(plan, store, "text", s.text_keys[v])[0], **{k: t.float() for k, t in entry.items()}})
    x0, noise = torch.stack(latents), torch.stack(noises)
    sigmas, timesteps = torch.stack(sigmas), torch.stack(timesteps)
    noisy = plan.family.noisy_input(x0, torch.stack(inputs), timesteps, sigmas)
    return Inputs(x0, noise, noisy, timesteps, sigmas, plan.family.collate(texts))
