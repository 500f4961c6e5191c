"""`make bench` and `make bench-scale` run and report the numbers the issue asks for (smoke tests: no timing
assertions)."""

import json
import subprocess
import sys

import pytest


pytestmark = pytest.mark.slow


def test_bench_reports_medians_and_ratios_per_family():
    # the first registered family and the last one with a bench model: a table each, and the JSON line keeps
    # the first's numbers at its top level (two families keep the smoke test fast; the default runs them all)
    from pipeline.tools.bench import bench_families

    names = bench_families()
    names = [names[0], names[-1]]
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.bench", "--steps", "1", "--warmup", "0", "--resolution", "64", "--batch-size", "2",
         *(a for n in names for a in ("--family", n))],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(line["families"]) == names
    assert {k: v for k, v in line.items() if k != "families"} == line["families"][names[0]]
    for name, result in line["families"].items():
        assert result["family"] == name and f"\n{name}: seconds per training step" in r.stdout
        assert set(result["median_seconds"]) == {"standard", "prior_cached", "prior_online", "standard_in_step", "bare"}
        assert all(v > 0 for v in result["median_seconds"].values())
        ms = result["median_seconds"]
        # the medians are printed rounded, the ratios computed before rounding
        assert abs(result["ratio_prior_to_standard"] - ms["prior_cached"] / ms["standard"]) < 2e-3
        assert abs(result["ratio_online_to_cached"] - ms["prior_online"] / ms["prior_cached"]) < 2e-3
        assert abs(result["ratio_step_to_bare"] - ms["standard"] / ms["bare"]) < 2e-3
        # 2 items of latent (at least 4x8x8 floats), text, noise and prior: every byte a prior step reads is hashed
        assert result["checksum_bytes"] > 2 * 2 * 4 * 8 * 8 * 4 and result["checksum_seconds"] > 0
        assert abs(result["checksum_share"] - result["checksum_seconds"] / ms["prior_cached"]) < 1e-4 + 1e-2 * result["checksum_share"]
    assert r.stdout.count("prior samples, cached target") == 2 and r.stdout.count("bare compute") == 2


def test_bench_defaults_to_every_family_with_a_bench_model_and_refuses_others():
    from pipeline.families import FAMILIES, tiny_module
    from pipeline.tools.bench import bench_families

    assert bench_families() == [n for n in FAMILIES if "bench" in tiny_module(n).PRESETS]
    assert len(bench_families()) > 1
    r = subprocess.run([sys.executable, "-m", "pipeline.tools.bench", "--family", "no-such-family"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "'--family'" in r.stderr and "no-such-family" in r.stderr


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
