"""Assembling a batch from the cache: the one place both stages turn entries into model inputs, so the
prior forward at cache time and the training forward see the same tensors."""

from __future__ import annotations

import torch

from pipeline.objective import noise_from_seed
from pipeline.plan import Plan, Sample
from pipeline.store import Store


def load_inputs(plan: Plan, store: Store, items: list[tuple[Sample, int]]):
    """Latents, noise, noisy latents, timesteps, batched conditioning and sigmas for (sample, variant) pairs,
    exactly as the train stage builds them. The conditioning is the text entry's tensors plus the image
    geometry stored with the latent (original_size, crop_top_left: SDXL's micro-conditioning)."""
    latents, noises, timesteps, sigmas, texts = [], [], [], [], []
    for s, v in items:
        entry = store.read("latent", s.latent_keys[v])[0]
        lat = entry.pop("latent")
        n = store.read("noise", s.noise_keys[v])[0]
        latents.append(lat)
        noises.append(noise_from_seed(int(n["seed"]), lat.shape))
        timesteps.append(n["timestep"])
        sigmas.append(n["sigma"])
        # read per step, not memoised: a Flux caption at 512 tokens is 8 MiB, and reading costs
        # milliseconds against a step of a second, while a memo of all captions could be gigabytes
        texts.append({**store.read("text", s.text_keys[v])[0], **{k: t.float() for k, t in entry.items()}})
    latents, noises = torch.stack(latents), torch.stack(noises)
    sigmas, timesteps = torch.stack(sigmas), torch.stack(timesteps)
    cond = {k: torch.stack([t[k] for t in texts]) for k in texts[0]}
    noisy = plan.family.noisy_input(latents, noises, timesteps, sigmas)
    return latents, noises, noisy, timesteps, cond, sigmas
