"""train.ema: an EMA of the LoRA's weights (diffusers' EMAModel), written beside the LoRA in its layout so
that it loads in the family's pipeline as the LoRA does, and held in each checkpoint (its resume is in
test_resume.py); it never changes what trains."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.cache.stage import run_cache
from pipeline.data.batches import load_inputs
from pipeline.data.plan import make_plan
from pipeline.denoiser.lora import CHECKPOINT_LORA
from pipeline.errors import UserError
from pipeline.families.base import load_full_pipeline
from pipeline.store.store import Store
from pipeline.train.stage import run_train

from conftest import CPU32, configure

pytestmark = pytest.mark.e2e


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_the_ema_is_written_beside_the_lora_and_loads_like_it(project):
    path, _ = project(dtype="fp32", max_steps=4, lr=1e-2)
    plain = configure(path, train={"output_dir": str(project.root / "plain")})
    run_cache(plain, progress=False)
    expected = load_file(run_train(plain, progress=False)["lora"])
    cfg = configure(path, train={"output_dir": str(project.root / "out"), "ema": True, "ema_decay": 0.9,
                                 "checkpoint_every": 2})
    summary = run_train(cfg, progress=False)
    lora, ema = load_file(summary["lora"]), load_file(summary["lora_ema"])
    assert summary["lora_ema"] == str(project.root / "out" / "pytorch_lora_weights-ema.safetensors")
    assert all(torch.equal(lora[k], expected[k]) for k in expected)  # the average never feeds back
    assert ema.keys() == lora.keys() and any(not torch.equal(ema[k], lora[k]) for k in lora)
    meta, ema_meta = _metadata(summary["lora"]), _metadata(summary["lora_ema"])
    assert ema_meta == meta  # the same layout, adapter metadata and steps
    folder = project.root / "out" / "checkpoints" / "step-00000002"
    assert (folder / CHECKPOINT_LORA.replace(".safetensors", "-ema.safetensors")).is_file()

    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    inputs = load_inputs(plan, store, [(next(s for s in plan.training if s.prior), 0)])
    outputs = []
    for weights in (None, summary["lora"], summary["lora_ema"]):
        pipe = load_full_pipeline(plan.family, torch.device("cpu"), torch.float32)
        if weights is not None:
            pipe.load_lora_weights(weights)
            assert pipe.transformer.peft_config, "no LoRA keys were loaded"
        with torch.no_grad():
            outputs.append(plan.family.predict(pipe.transformer, inputs.noisy, inputs.timesteps, inputs.cond, **CPU32))
    base, trained, averaged = outputs
    assert not torch.equal(averaged, base) and not torch.equal(averaged, trained)

    # a decay of 0 averages nothing: the EMA file is the LoRA file (to rounding: EMAModel computes s - (s - p))
    zero = configure(path, train={"output_dir": str(project.root / "zero"), "ema": True, "ema_decay": 0.0,
                                  "checkpoint_every": 0})
    summary = run_train(zero, progress=False)
    lora, ema = load_file(summary["lora"]), load_file(summary["lora_ema"])
    assert all(torch.allclose(ema[k], lora[k], rtol=1e-6, atol=1e-8) for k in lora)


def test_resuming_with_the_ema_turned_on_or_off_is_refused(project):
    path, _ = project(dtype="fp32", max_steps=2)
    cfg = configure(path, train={"ema": True, "checkpoint_every": 1})
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    cfg = configure(path, train={"ema": False, "max_steps": 3})
    with pytest.raises(UserError, match=r"train\.ema true -> false"):
        run_train(cfg, progress=False, resume=True)
