"""The embedded default config through the command line, as `make train` runs it: the tiny model and
images are built on first use, the cache stage then says there is nothing to compute, training writes a LoRA."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=600)


def test_default_config_end_to_end(tmp_path):
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "tiny-flux.toml"
    text = (REPO / "configs" / "tiny-flux.toml").read_text()
    config.write_text(text.replace("epochs = 8", "epochs = 1").replace("checkpoint_every = 16", "checkpoint_every = 4"))

    first = _cli("cache", "--config", str(config), "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "cache" / "tiny-flux" / "base" / "model_index.json").is_file()
    summary = json.loads(first.stdout.strip().splitlines()[-1])["cache_summary"]
    # 8 prior images and 2 held-out prior images, 4 variants each
    assert summary["samples"] == 16 and summary["priors_computed"] == 40

    again = _cli("cache", "--config", str(config), "--quiet")
    assert again.returncode == 0 and "nothing to compute" in again.stdout

    trained = _cli("train", "--config", str(config), "--quiet")
    assert trained.returncode == 0, trained.stderr[-3000:]
    lora = tmp_path / "output" / "tiny-flux" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and "train: done" in trained.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(lora.stat().st_mode) == 0o666 & ~umask  # a file to share: the user's usual permissions
    # the demo trains the run without its prior concept too, and shows both side by side
    done = json.loads(trained.stdout.strip().splitlines()[-1])["train_summary"]
    assert done["comparison"] == str(tmp_path / "output" / "tiny-flux" / "comparison.png")
    assert done["without_priors"]["prior_drift"] > done["prior_drift"] > 0

    # what `make train RESUME=1` runs on the default config: it checkpoints, the last step too, so --resume
    # goes on from the end (nothing left to train)
    resumed = _cli("train", "--config", str(config), "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = json.loads(trained.stdout.strip().splitlines()[-1])["train_summary"]["steps"]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])["train_summary"]
    assert summary["steps"] == steps and summary["resumed_from_step"] == steps


def test_missing_cache_refuses_with_the_fix(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    config = tmp_path / "configs" / "tiny-flux.toml"
    r = _cli("cache", "--config", str(config), "--quiet", "--dtype", "fp32")  # builds model+data, caches fp32
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("train", "--config", str(config), "--quiet")  # bf16 priors were never cached
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: priors for bf16 are not cached (40 of 40 missing for this model and data): "
        f"run python -m pipeline cache --config {config} --dtype bf16"
    )
