"""The per-variant choices that change an input beyond flip and caption dropout: a caption's tags shuffled
(data.shuffle_tags, data.keep_tokens) and a random crop (data.random_crop). Each is drawn once per
(cache seed, image content, variant) by the plan, so the cache holds each variant's input as its own
entry and a prior is always the base model's prediction for exactly what training feeds.

Pure functions of their seed: the plan calls them, the cache stage only reads what they chose.
"""

from __future__ import annotations

import random


def shuffle_tags(caption: str, keep: int, seed: int) -> str:
    """kohya's shuffle_caption: the caption split on commas into tags (stripped, empty ones dropped), the
    first `keep` in place (kohya's keep_tokens), the rest in an order drawn from `seed`, joined by ", ".
    A caption without a comma is one tag and comes back as it was."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    if len(tags) <= 1:
        return caption
    kept, rest = tags[:keep], tags[keep:]
    random.Random(seed).shuffle(rest)  # Random(int) is the same sequence on every platform and Python 3
    return ", ".join(kept + rest)


def crop_offsets(resized: tuple[int, int], bucket: tuple[int, int], seed: int) -> tuple[int, int]:
    """(top, left) of a crop of size `bucket` (height, width) drawn uniformly from the positions inside an
    image resized to `resized` (width, height), as images.cover_size gives it."""
    rng = random.Random(seed)
    top = rng.randint(0, max(resized[1] - bucket[0], 0))
    left = rng.randint(0, max(resized[0] - bucket[1], 0))
    return top, left
