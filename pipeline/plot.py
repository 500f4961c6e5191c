"""`python -m pipeline plot RUN_DIR`: a PNG of a run's loss curves from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import replacing
from pipeline.errors import UserError


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider does."""
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def _read(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError:
        raise UserError(f"'{path}' is not JSON lines") from None


def _series(rows: list[dict], key: str) -> list[tuple]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def loss_figure(run_dir: str | Path):
    """The figure plot_run saves. The prior loss and prior drift get their own panel: they start at zero and
    stay orders of magnitude below the standard loss, so on its scale they would be a flat line at 0."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"'{path}' does not exist: give the train.output_dir of a run")
    records = _read(path)
    if not records:
        raise UserError(f"'{path}' has no steps yet")
    validation = run_dir / "validation.jsonl"
    rows = _read(validation) if validation.is_file() else []  # held-out scores, at the validation steps
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    has_prior = bool(_series(records, "loss_prior") or _series(rows, "prior_drift"))
    ratios = [3, 2, 1] if has_prior else [3, 1]
    fig, axes = plt.subplots(len(ratios), 1, figsize=(9, 7 if has_prior else 6), sharex=True, height_ratios=ratios)
    top, bottom = axes[0], axes[-1]
    prior_axis = axes[1] if has_prior else None
    for key, label, colour, axis in (("loss_standard", "standard", "tab:blue", top),
                                     ("loss_prior", "prior", "tab:orange", prior_axis)):
        points = _series(records, key)
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            axis.plot(steps, _smooth(list(values)), color=colour, label=f"{label} loss (smoothed)")
    for key, label, colour, axis in (("val_loss", "validation loss", "tab:green", top),
                                     ("prior_drift", "prior drift", "tab:red", prior_axis)):
        points = _series(rows, key)
        if points:
            axis.plot(*zip(*points), color=colour, marker="o", markersize=3, label=f"{label} (held out)")
    top.set_ylabel("loss (MSE × weight)")
    top.set_title(f"{run_dir.name}: {len(records)} steps")
    if prior_axis is not None:
        prior_axis.set_ylabel("prior (own scale)")
        prior_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for axis in axes[:-1]:
        axis.legend()
        axis.grid(alpha=0.3)
    bottom.plot([r["step"] for r in records], [r["lr"] for r in records], color="tab:gray")
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Standard and prior loss (raw and smoothed; the prior on its own scale), validation loss and prior
    drift (when validated) and the learning rate against the step; returns the PNG."""
    import matplotlib.pyplot as plt

    fig = loss_figure(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    try:
        with replacing(out, ".png") as tmp:  # the suffix: matplotlib picks the format by it
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out
