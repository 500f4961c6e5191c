"""GPU-only checks (`pytest -m gpu`): they skip without CUDA, so `make test` passes on a CPU machine, and
only then: on a machine with CUDA any other error fails them (nf4 needs the quant extra installed).
On a GPU: the step-0 prior loss in bf16 on CUDA (LoRA, LoKr, LoHa), block swap equal to no swap on CUDA (where the copies
and the side stream are real), the step-0 prior loss with an nf4 denoiser (bitsandbytes), and a full fine-tuning in bf16 (stochastic
rounding, fused backward, AdamW8bit and Adafactor) starting at zero prior loss."""

import json

import pytest
import torch

from pipeline.cache.stage import run_cache
from pipeline.train.stage import train_lora

from conftest import configure

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_run(project, steps=1, lora=None, **train):
    tag = f"{sorted(train)}{lora or ''}"
    path, _ = project(name=f"gpu{len(train)}{tag}.toml", dtype="bf16", max_steps=steps,
                      cache=project.root / f"cache-{sorted(train)}", out=project.root / f"out-{tag}")
    cfg = configure(path, train={"device": "cuda", **train}, cache={"device": "cuda"}, lora=lora or {})
    run_cache(cfg, progress=False)
    return train_lora(cfg, progress=False)


def _first_step(summary):
    return json.loads(open(summary["metrics"]).readline())


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_step0_prior_loss_is_zero_on_cuda_in_bf16(project, kind):
    _, summary = _cuda_run(project, lora={"type": kind})  # a LoKr or LoHa uses the LoRA's cache
    first = _first_step(summary)
    assert first["loss_prior"] <= 1e-4 * first["loss_standard"]  # the bound the CPU tests use for bf16


def test_block_swap_on_cuda_equals_no_swap(project):
    plain, _ = _cuda_run(project, steps=3)
    swapped, _ = _cuda_run(project, steps=3, blocks_to_swap=2)
    a = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in swapped.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_step0_prior_loss_with_nf4_on_cuda(project):
    path, _ = project(name="nf4.toml", dtype="bf16", max_steps=1)
    cfg = configure(path, model={"quantize": "nf4"}, train={"device": "cuda"}, cache={"device": "cuda"})
    run_cache(cfg, progress=False)
    _, summary = train_lora(cfg, progress=False)
    first = _first_step(summary)
    assert first["loss_prior"] <= 1e-3 * first["loss_standard"]


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor"])
def test_full_fine_tuning_on_cuda_starts_at_zero_prior_loss_and_moves_the_weights(project, optimizer):
    # bf16 weights with stochastic rounding (the random bits drawn on the GPU), the fused backward
    path, _ = project(name=f"full-{optimizer}.toml", dtype="bf16", max_steps=2, out=project.root / f"full-{optimizer}")
    cfg = configure(path, lora={"rank": None, "alpha": None}, optimizer={"name": optimizer, "max_grad_norm": 0},
                    train={"device": "cuda", "method": "full", "fused_backward": True}, cache={"device": "cuda"})
    run_cache(cfg, progress=False)
    trained, summary = train_lora(cfg, progress=False)
    first = _first_step(summary)
    assert first["loss_prior"] <= 1e-4 * first["loss_standard"]
    base = type(trained).from_pretrained(cfg.model.path, subfolder="transformer", torch_dtype=torch.bfloat16)
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, trained.state_dict()[k].cpu())]
    assert moved and all(p.grad is None for p in trained.parameters())
