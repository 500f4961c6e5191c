"""`make bench-quality`'s pieces: the drift at fresh draws, and the JSON line of issue 22 on a 2-step run
of every mode (a smoke test: the numbers themselves are the benchmark's, not asserted)."""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.cache.stage import run_cache
from pipeline.data.plan import make_plan
from pipeline.denoiser.build import build_denoiser
from pipeline.store.store import Store
from pipeline.tools.bench_quality import MODES, drift


@pytest.mark.e2e
def test_drift_is_zero_for_a_zero_lora_and_positive_deterministic_for_a_trained_one(project):
    _, cfg = project(dtype="fp32")
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    priors = [s for s in plan.training if s.prior][:2]
    torch.manual_seed(0)
    denoiser, _ = build_denoiser(cfg, plan.family, torch.device("cpu"), torch.float32)
    assert drift(plan, store, denoiser, priors, draws=2) == 0.0  # B = 0: the LoRA model is the base
    with torch.no_grad():
        for name, p in denoiser.module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    moved = drift(plan, store, denoiser, priors, draws=2)
    assert moved > 0 and drift(plan, store, denoiser, priors, draws=2) == moved
    assert drift(plan, store, denoiser, priors, draws=2, label="other draws") != moved  # the seeds are its own
    assert denoiser.module.training  # left in train mode, adapters on
    store.close()


@pytest.mark.slow
def test_bench_quality_prints_the_issues_json_for_every_mode(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.bench_quality", "--steps", "2", "--images", "1,2,1", "--seeds", "1",
         "--sample-steps", "1", "--prompts", "1", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert list(line) == ["bench_quality"] and list(line["bench_quality"]) == ["base_caption_accuracy", "modes"]
    modes = line["bench_quality"]["modes"]
    assert list(modes) == list(MODES) == ["none", "cached_k1", "cached_k4", "cached_k16", "online_fresh"]
    for result in modes.values():
        assert list(result) == ["drift_train_prior", "drift_heldout_prior", "class_preservation", "concept_match",
                                "seconds_per_step"]
        assert all(isinstance(v, float) and v >= 0 for v in result.values())
        assert 0 <= result["class_preservation"] <= 1 and 0 <= result["concept_match"] <= 1
    assert 0 <= line["bench_quality"]["base_caption_accuracy"] <= 1
    assert {p.name for p in tmp_path.glob("samples-*.png")} == {f"samples-{m}.png" for m in [*MODES, "base"]}
