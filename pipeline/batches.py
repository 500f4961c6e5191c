"""Assembling a batch from the cache: the one place both stages turn entries into model inputs, so the
prior forward at cache time and the training forward see the same tensors."""

from __future__ import annotations

import torch

from pipeline.objective import noise_from_seed
from pipeline.plan import Plan, Sample
from pipeline.store import Store


def load_inputs(plan: Plan, store: Store, items: list[tuple[Sample, int]]):
    """Latents, noise, noisy latents, timesteps, batched conditioning and sigmas for (sample, variant) pairs,
    exactly as the train stage builds them."""
    latents, noises, timesteps, sigmas, texts = [], [], [], [], []
    for s, v in items:
        lat = store.read("latent", s.latent_key)[0]["latent"]
        n = store.read("noise", s.noise_keys[v])[0]
        latents.append(lat)
        noises.append(noise_from_seed(int(n["seed"]), lat.shape))
        timesteps.append(n["timestep"])
        sigmas.append(n["sigma"])
        # read per step, not memoised: a Flux caption at 512 tokens is 8 MiB, and reading costs
        # milliseconds against a step of a second, while a memo of all captions could be gigabytes
        texts.append(store.read("text", s.text_key)[0])
    latents, noises = torch.stack(latents), torch.stack(noises)
    sigmas = torch.stack(sigmas)
    text = {k: torch.stack([t[k] for t in texts]) for k in texts[0]}
    noisy = plan.family.noisy_input(latents, noises, sigmas)
    return latents, noises, noisy, torch.stack(timesteps), text, sigmas
