"""Captions cached at their own length (`family.text_lengths_vary`), padded into one batch and back.

A family whose pipeline feeds its denoiser captions of different lengths caches each caption's tokens as
they are (no padding to model.max_sequence_length: nothing stored, nor computed at cache time, for tokens
the model never sees). Its `collate` pads a batch with zeros after the tokens (to the longest caption, or
to a fixed length where masked tokens still change the rounding, as in a joint attention) and adds a mask
(1 for a token, 0 for padding); its `predict` takes each caption's tokens back out by the mask.
`SCHEME` names this in the family's `prediction_settings`, so that priors made under another scheme are
never found under this one's key.
"""

from __future__ import annotations

import torch

SCHEME = "own length, zero-padded on the right in collate, with a 0/1 mask"


def pad(conds: list[dict[str, torch.Tensor]], name: str, mask_name: str, length: int | None = None,
        mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One batch from per-sample entries: `name` (L_i, ...) padded with zeros after the tokens to `length`
    (default: the longest), with `mask_name` (B, L) in `mask_dtype`, 1 where a token is; every other
    tensor stacked."""
    texts = [c[name] for c in conds]
    longest = length or max(t.shape[0] for t in texts)
    padded = texts[0].new_zeros(len(texts), longest, *texts[0].shape[1:])
    mask = torch.zeros(len(texts), longest, dtype=mask_dtype)
    for i, t in enumerate(texts):
        padded[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = 1
    rest = {k: torch.stack([c[k] for c in conds]) for k in conds[0] if k != name}
    return {name: padded, mask_name: mask, **rest}


def unpad(padded: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each sample's tokens of a padded batch (B, L, ...), by its mask (B, L); all of them without one."""
    if mask is None:
        return list(padded.unbind(0))
    return [t[m.to(t.device).bool()] for t, m in zip(padded, mask)]
