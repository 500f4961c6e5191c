"""Messages name the way the user ran the command: make's variables (RESUME=1, DTYPE=fp32, CONFIG=...)
under make, which marks the commands it runs with PIPELINE_VIA_MAKE=1; the options (--resume, --dtype
fp32, --config ...) on the command line."""

import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data.kinds import DEFAULT_CONFIG, fix_command
from pipeline.errors import option
from pipeline.train.checkpoint import start_over

REPO = Path(__file__).resolve().parents[1]


def test_an_option_as_make_and_as_the_command_line_give_it(monkeypatch):
    monkeypatch.delenv("PIPELINE_VIA_MAKE", raising=False)
    assert (option("--resume"), option("--restart"), option("--dtype", "fp32")) == ("--resume", "--restart", "--dtype fp32")
    assert start_over() == "train with --restart to start over (the run is moved aside)"
    monkeypatch.setenv("PIPELINE_VIA_MAKE", "1")
    assert (option("--resume"), option("--restart"), option("--dtype", "fp32")) == ("RESUME=1", "RESTART=1", "DTYPE=fp32")
    assert option("--config", "a.toml") == "CONFIG=a.toml"
    assert start_over() == "train with RESTART=1 to start over (the run is moved aside)"


def test_the_cache_command_is_makes_under_make_and_the_clis_else(monkeypatch, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(DEFAULT_CONFIG.read_text())
    default, mine = load_config(DEFAULT_CONFIG), load_config(path)
    monkeypatch.delenv("PIPELINE_VIA_MAKE", raising=False)
    assert fix_command(mine, "fp32") == f"python -m pipeline cache --config {path} --dtype fp32"
    monkeypatch.setenv("PIPELINE_VIA_MAKE", "1")
    assert fix_command(mine, "fp32") == f"make cache CONFIG={path} DTYPE=fp32"
    assert fix_command(default) == "make cache"  # the Makefile's default config needs no CONFIG=


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_the_makefile_marks_its_pipeline_commands_and_passes_restart_on():
    def commands(*variables, pipeline=True):
        r = subprocess.run(["make", "-n", "-C", str(REPO), *variables, "PYTHON=python"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if " -m pipeline" in line or not pipeline]

    for target in ("train", "cache", "cache-status", "plan-memory"):
        lines = commands(target)
        assert lines and all(line.startswith("PIPELINE_VIA_MAKE=1 ") for line in lines), lines
    train = commands("train", "RESUME=1", "DTYPE=fp32")[-1]
    assert "--dtype fp32" in train and train.split()[-1] == "--resume"
    for variable in ("RESTART=1", "OVERWRITE=1"):  # OVERWRITE=1: the former name
        assert commands("train", variable)[-1].split()[-1] == "--restart"
    # the tests run without it: their messages are the command line's
    assert not any("PIPELINE_VIA_MAKE" in line for line in commands("test-fast", pipeline=False))
