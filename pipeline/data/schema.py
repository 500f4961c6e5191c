"""What each cached entry must hold for this config: its datasets, with their shapes and stored dtypes.

A key names what an entry was computed from, and its sha256 that its bytes are the ones written; neither
says that an entry under the right key is this config's (a segment copied from another cache, a foreign
file). Such an entry would stop training deep in the model with a traceback, or train on the wrong thing.
So every read is checked here (`read`), and `cache verify` checks every entry the same way (`layout_error`).

- latent: `latent` of the family's latent shape for the sample's bucket (from the VAE's config), float32.
- prior: `prediction` of that same shape, in the train dtype (the forward's output as training computes it).
- noise: the scalars `seed` (int64), `timestep` and `sigma` (float32).
- text: float32 tensors; every text entry of a config has the same datasets and shapes (captions are padded
  to one length), except along the token axis where the family's captions vary in length
  (`family.text_lengths_vary`). There is no shape to derive from the plan alone (it depends on each
  encoder's tokenizer), so a run checks each text entry against the first it read, and `verify` against
  the layout most of the config's text entries share.
"""

from __future__ import annotations

from collections import Counter

import torch

from pipeline.data.plan import Plan, Sample
from pipeline.errors import UserError
from pipeline.store.store import Entry, Store

Layout = dict[str, tuple[tuple[int, ...], str]]  # dataset name -> (shape, stored dtype name)
STORED = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # a train dtype's name in the store
NOISE: Layout = {"seed": ((), "int64"), "timestep": ((), "float32"), "sigma": ((), "float32")}


def expected(plan: Plan, kind: str, sample: Sample | None) -> Layout | None:
    """The datasets an entry of this kind must hold for this sample (None: text, checked by agreement)."""
    if kind == "latent":
        return {"latent": (tuple(plan.family.latent_shape(sample.bucket)), "float32")}
    if kind == plan.prior_kind():
        return {"prediction": (tuple(plan.family.latent_shape(sample.bucket)), STORED[plan.dtype])}
    if kind == "noise":
        return NOISE
    return None


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    return {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}


def _words(shape_dtype: tuple[tuple[int, ...], str]) -> str:
    shape, dtype = shape_dtype
    return f"{list(shape)} {dtype}"


def mismatch(want: Layout, found: Layout) -> str | None:
    """Why `found` is not `want` (datasets `want` does not name may be there), or None."""
    for name, spec in want.items():
        if name not in found:
            return f"it has no dataset '{name}'"
        if found[name] != spec:
            return f"its '{name}' is {_words(found[name])} where this config needs {_words(spec)}"
    return None


def text_signature(plan: Plan, layout: Layout) -> tuple:
    """What every text entry of a config shares: names, dtypes and shapes (without the token axis, the
    first, where captions vary in length)."""
    vary = getattr(plan.family, "text_lengths_vary", False)
    return tuple(sorted((n, (len(s), s[1:]) if vary else s, d) for n, (s, d) in layout.items()))


def text_mismatch(plan: Plan, layout: Layout, reference: Layout) -> str | None:
    if any(d != "float32" for _, d in layout.values()):
        return f"its datasets are {', '.join(f'{n} {_words(x)}' for n, x in sorted(layout.items()))}, not float32"
    if text_signature(plan, layout) != text_signature(plan, reference):
        return (f"its datasets ({', '.join(f'{n} {_words(x)}' for n, x in sorted(layout.items()))}) differ from the "
                f"other text entries' ({', '.join(f'{n} {_words(x)}' for n, x in sorted(reference.items()))})")
    return None


def _refuse(store: Store, kind: str, key: str, why: str) -> UserError:
    return UserError(f"cache entry {kind}/{key} in '{store.segment_of(kind, key)}' is not this config's: {why}; run "
                     "`python -m pipeline cache verify --repair` with this config, which recomputes it")


def read(plan: Plan, store: Store, kind: str, key: str, sample: Sample | None = None) -> Entry:
    """store.read, and the entry checked against what this config needs (a one-line UserError if not)."""
    entry = store.read(kind, key)
    layout = layout_of(entry[0])
    want = expected(plan, kind, sample)
    if want is not None:
        why = mismatch(want, layout)
    else:
        # the first text entry this process reads for this plan is the reference of the rest
        why = text_mismatch(plan, layout, plan.__dict__.setdefault("_text_layout", layout))
    if why:
        raise _refuse(store, kind, key, why)
    return entry


def text_reference(plan: Plan, layouts: list[Layout]) -> Layout | None:
    """For verify: the layout most of a config's text entries share."""
    if not layouts:
        return None
    counts = Counter(text_signature(plan, x) for x in layouts)
    top = counts.most_common(1)[0][0]
    return next(x for x in layouts if text_signature(plan, x) == top)
