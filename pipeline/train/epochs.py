"""The order of an epoch: which samples, shuffled how, batched how. A pure function of the train seed and
the epoch, so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

from collections import Counter

import torch

from pipeline.store.keys import derive_seed
from pipeline.data.plan import Plan, Sample
from pipeline.train.practice import epoch_counts


def epoch_batches(plan: Plan, shapes: dict[str, tuple], epoch: int) -> list[list[tuple[Sample, int]]]:
    """(sample, variant) items (with repeats) shuffled by a seed of (train seed, epoch), batched within one
    latent shape (`shapes`: latent key -> shape, read from the cache once per run).

    A sample seen c times in epoch e uses variants (e*c + j) mod K for its copies j = 0..c-1: one copy a
    variant, so repeats (and data.prior_ratio's extra prior copies) are distinct inputs while c <= K, and
    over the epochs every variant comes round. With c = 1 that is variant e mod K."""
    samples = [s for s in plan.training for _ in range(s.repeats)]
    g = torch.Generator().manual_seed(derive_seed("order", plan.cfg.train.seed, epoch))
    _, n_prior = epoch_counts(plan)
    priors = [s for s in samples if s.prior]
    if priors and n_prior != len(priors):  # data.prior_ratio: cycle through the prior samples, shuffled
        order = torch.randperm(len(priors), generator=g).tolist()
        samples = [s for s in samples if not s.prior] + [priors[order[i % len(priors)]] for i in range(n_prior)]
    copies = Counter(id(s) for s in samples)
    seen: Counter = Counter()
    items = []
    for s in samples:
        items.append((s, (epoch * copies[id(s)] + seen[id(s)]) % plan.cfg.cache.variants))
        seen[id(s)] += 1
    items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    by_shape: dict[tuple, list[tuple[Sample, int]]] = {}
    for item in items:
        by_shape.setdefault(shapes[item[0].latent_keys[0]], []).append(item)  # every variant has the same shape
    bs = plan.cfg.train.batch_size
    batches = [group[i : i + bs] for group in by_shape.values() for i in range(0, len(group), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
