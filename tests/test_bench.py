"""`make bench` runs and reports the numbers the issue asks for (a smoke test: no timing assertions)."""

import json
import subprocess
import sys

import pytest


pytestmark = pytest.mark.slow


def test_bench_reports_medians_and_ratios():
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "--steps", "1", "--warmup", "0", "--resolution", "64", "--batch-size", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result["median_seconds"]) == {"standard", "prior_cached", "prior_online"}
    assert all(v > 0 for v in result["median_seconds"].values())
    ms = result["median_seconds"]
    # the medians are printed rounded, the ratios computed before rounding
    assert abs(result["ratio_prior_to_standard"] - ms["prior_cached"] / ms["standard"]) < 2e-3
    assert abs(result["ratio_online_to_cached"] - ms["prior_online"] / ms["prior_cached"]) < 2e-3
    assert "prior samples, cached target" in r.stdout
