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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Standard and prior loss (raw and smoothed), validation loss and prior drift (when validated) and the
    learning rate against the step; returns the PNG."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"'{path}' does not exist: give the train.output_dir of a run")
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError:
        raise UserError(f"'{path}' is not JSON lines") from None
    if not records:
        raise UserError(f"'{path}' has no steps yet")
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[3, 1])
    for key, label, colour in (("loss_standard", "standard", "tab:blue"), ("loss_prior", "prior", "tab:orange")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            top.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
            top.plot(steps, _smooth(list(values)), color=colour, label=f"{label} loss (smoothed)")
    validation = run_dir / "validation.jsonl"
    if validation.is_file():  # held-out scores, at the validation steps
        rows = [json.loads(line) for line in validation.read_text().splitlines() if line.strip()]
        for key, label, colour in (("val_loss", "validation loss", "tab:green"), ("prior_drift", "prior drift", "tab:red")):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                top.plot(*zip(*points), color=colour, marker="o", markersize=3, label=f"{label} (held out)")
    top.set_ylabel("loss (MSE × weight)")
    top.legend()
    top.grid(alpha=0.3)
    top.set_title(f"{run_dir.name}: {len(records)} steps")
    bottom.plot([r["step"] for r in records], [r["lr"] for r in records], color="tab:gray")
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    try:
        with replacing(out, ".png") as tmp:  # the suffix: matplotlib picks the format by it
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out
