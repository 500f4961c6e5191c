"""The prior-prediction practice guidance (OneTrainer wiki, "Prior Prediction"), checked at the start of
training: each a one-line warning, since each is advice, not an error."""

from __future__ import annotations

from pipeline.errors import warn
from pipeline.data.plan import Plan
from pipeline.train.optim import ADAPTIVE


def epoch_counts(plan: Plan) -> tuple[int, int]:
    """(standard, prior) samples per epoch: repeats counted, then data.prior_ratio applied if set."""
    standard = sum(s.repeats for s in plan.training if not s.prior)
    prior = sum(s.repeats for s in plan.training if s.prior)
    ratio = plan.cfg.data.prior_ratio
    if ratio and standard and prior:
        prior = max(1, round(standard * ratio / (1 - ratio)))
    return standard, prior


def prior_share(plan: Plan) -> float | None:
    """The actual share of prior samples in an epoch."""
    standard, prior = epoch_counts(plan)
    return round(prior / (standard + prior), 3) if standard + prior else None


def practice_warnings(plan: Plan) -> list[str]:
    """Warn, and return the warnings, for the setups the guidance says work badly."""
    out = []
    standard = {s.caption for s in plan.training if not s.prior}
    shared = sorted({s.caption for s in plan.training if s.prior} & standard)
    if shared:
        out.append(
            f"{len(shared)} prior caption(s) repeat standard captions (e.g. {shared[0]!r}): a prior concept should be "
            "a related concept with its own simple captions, not the training set with the same captions"
        )
    share = prior_share(plan)
    if share and plan.cfg.optimizer.name in ADAPTIVE:
        out.append(
            f"optimizer.name = {plan.cfg.optimizer.name!r} adapts its step size to the loss, and the prior loss starts "
            "near zero: adaptive optimizers tend to struggle with prior prediction; consider adamw"
        )
    if share and not 1 / 3 <= share <= 2 / 3:
        prior = round(share / (1 - share), 2) if share < 1 else float("inf")
        out.append(f"prior:standard samples per epoch are {prior}:1 (repeats counted); about 1:1 is the tested start")
    for message in out:
        warn(message)
    return out


def batch_size_warning(batches: list[list], batch_size: int) -> str | None:
    """Warn, and return the warning, when train.batch_size is more than any bucket holds: a batch is drawn
    from one bucket, so every batch is smaller than asked (the step count and learning rate then differ
    from what the setting suggests)."""
    sizes = sorted({len(b) for b in batches}, reverse=True)
    if not sizes or sizes[0] >= batch_size:
        return None
    shown = ", ".join(map(str, sizes[:-1])) + (" and " if len(sizes) > 1 else "") + str(sizes[-1])
    message = (f"train.batch_size = {batch_size} is larger than every bucket (a batch holds one bucket's samples): "
               f"the real batch sizes are {shown}")
    warn(message)
    return message
