"""The order of an epoch: which samples, shuffled how, batched how. A pure function of the train seed and
the epoch, so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import torch

from pipeline.cache.keys import derive_seed
from pipeline.plan import Plan, Sample
from pipeline.train.practice import epoch_counts


def epoch_batches(plan: Plan, shapes: dict[str, tuple], epoch: int) -> list[list[Sample]]:
    """Samples (with repeats) shuffled by a seed of (train seed, epoch), batched within one latent shape
    (`shapes`: latent key -> shape, read from the cache once per run)."""
    items = [s for s in plan.training for _ in range(s.repeats)]
    g = torch.Generator().manual_seed(derive_seed("order", plan.cfg.train.seed, epoch))
    _, n_prior = epoch_counts(plan)
    priors = [s for s in items if s.prior]
    if priors and n_prior != len(priors):  # data.prior_ratio: cycle through the prior samples, shuffled
        order = torch.randperm(len(priors), generator=g).tolist()
        items = [s for s in items if not s.prior] + [priors[order[i % len(priors)]] for i in range(n_prior)]
    items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    by_shape: dict[tuple, list[Sample]] = {}
    for s in items:
        by_shape.setdefault(shapes[s.latent_keys[0]], []).append(s)  # every variant has the same shape
    bs = plan.cfg.train.batch_size
    batches = [group[i : i + bs] for group in by_shape.values() for i in range(0, len(group), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
