"""`make bench` and `make bench-scale` run and report the numbers the issue asks for (smoke tests: no timing
assertions)."""

import json
import subprocess
import sys

import pytest


pytestmark = pytest.mark.slow


def test_bench_reports_medians_and_ratios():
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.bench", "--steps", "1", "--warmup", "0", "--resolution", "64", "--batch-size", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result["median_seconds"]) == {"standard", "prior_cached", "prior_online", "standard_in_step", "bare"}
    assert all(v > 0 for v in result["median_seconds"].values())
    ms = result["median_seconds"]
    # the medians are printed rounded, the ratios computed before rounding
    assert abs(result["ratio_prior_to_standard"] - ms["prior_cached"] / ms["standard"]) < 2e-3
    assert abs(result["ratio_online_to_cached"] - ms["prior_online"] / ms["prior_cached"]) < 2e-3
    assert abs(result["ratio_step_to_bare"] - ms["standard"] / ms["bare"]) < 2e-3
    assert "prior samples, cached target" in r.stdout and "bare compute" in r.stdout
    # 2 items of latent (4x8x8 floats), text, noise (3 scalars) and prior: every byte a prior step reads is hashed
    assert result["checksum_bytes"] > 2 * 2 * 4 * 8 * 8 * 4 and result["checksum_seconds"] > 0
    assert abs(result["checksum_share"] - result["checksum_seconds"] / ms["prior_cached"]) < 1e-4 + 1e-2 * result["checksum_share"]


def test_bench_scale_reports_each_command_under_a_low_open_file_limit():
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.bench_scale", "--images", "24", "--captions", "4", "--segment-mb", "0", "--batch-size", "1",
         "--nofile", "64"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["entries"] == 24 + 4 + 2 * 4 + 2 * 4  # latents, captions, the 2 prior images' noise draws and priors
    assert result["segment_files"] > 64 // 4  # more than the store may hold open under this limit
    assert set(result["commands"]) == {"imports only", "cache", "cache status", "cache verify", "train start (max_steps 1)"}
    assert all(c["exit"] == 0 and c["seconds"] > 0 and c["peak_rss_mib"] > 0 for c in result["commands"].values())
    assert result["verify"].startswith(f"verify: {result['entries']} entries checked, 0 damaged")
