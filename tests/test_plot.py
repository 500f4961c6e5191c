"""`python -m pipeline plot RUN_DIR` writes a PNG of a run's losses, the prior loss on its own scale; a folder
without metrics is one line."""

import json
import subprocess
import sys

from PIL import Image
import pytest

from pipeline.cache.stage import run_cache
from pipeline.plot import loss_figure
from pipeline.train.stage import run_train


@pytest.mark.slow
def test_plot_writes_a_png(project):
    _, cfg = project(max_steps=3)
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    r = subprocess.run([sys.executable, "-m", "pipeline", "plot", cfg.train.output_dir], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Image.open(cfg.train.output_dir + "/loss.png") as im:
        assert im.format == "PNG" and im.size == (900, 700)  # loss, prior and lr panels


@pytest.mark.slow
def test_plot_without_metrics_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "plot", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "metrics.jsonl' does not exist" in r.stderr and "Traceback" not in r.stderr


def _lines(axis) -> dict:
    return {line.get_label(): line for line in axis.get_lines()}


def test_prior_loss_has_its_own_readable_axis(tmp_path):
    # a standard loss near 0.5 and a prior loss a thousand times smaller, as in a real run: on one linear
    # axis the prior would be a flat line at 0
    rows = [{"step": i, "loss_standard": 0.5 - 0.001 * i, "loss_prior": 1e-4 * i, "lr": 1e-4} for i in range(20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "validation.jsonl").write_text(json.dumps({"step": 19, "val_loss": 0.6, "prior_drift": 2e-3}) + "\n")
    fig = loss_figure(tmp_path)
    try:
        by_axis = [(axis, _lines(axis)) for axis in fig.axes]
        standard = next(a for a, lines in by_axis if "standard loss (smoothed)" in lines)
        prior = next(a for a, lines in by_axis if "prior loss (smoothed)" in lines)
        assert prior is not standard and not prior.get_shared_y_axes().joined(prior, standard)
        assert "prior drift (held out)" in _lines(prior) and "validation loss (held out)" in _lines(standard)
        low, high = prior.get_ylim()
        assert high < 0.01 and high - low > 1e-3  # scaled to the prior values, which fill it
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_without_priors_there_is_no_prior_panel(tmp_path):
    rows = [{"step": i, "loss_standard": 0.5, "lr": 1e-4} for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = loss_figure(tmp_path)
    try:
        assert len(fig.axes) == 2
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
