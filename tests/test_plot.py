"""`python -m pipeline plot RUN_DIR` writes a PNG of a run's losses; a folder without metrics is one line."""

import subprocess
import sys

from PIL import Image
import pytest

from pipeline.cache.stage import run_cache
from pipeline.train.stage import run_train

pytestmark = pytest.mark.slow


def test_plot_writes_a_png(project):
    _, cfg = project(max_steps=3)
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    r = subprocess.run([sys.executable, "-m", "pipeline", "plot", cfg.train.output_dir], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Image.open(cfg.train.output_dir + "/loss.png") as im:
        assert im.format == "PNG" and im.size == (900, 600)


def test_plot_without_metrics_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "plot", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "metrics.jsonl' does not exist" in r.stderr and "Traceback" not in r.stderr
