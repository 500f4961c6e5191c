"""The memory planner (pipeline/memory.py) against real models: its weight bytes and LoRA sizes equal those
of the tiny models the trainer builds and trains, its swap arithmetic removes exactly the swapped blocks'
bytes, and `plan-memory` prints the table. (Peaks measured against it: `make bench-memory`.)"""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.config import LoraConfig, ModelConfig
from pipeline.families import family_class
from pipeline.lora import add_lora
from pipeline.memory import Settings, estimate, lora_bytes, meta_denoiser, weight_bytes
from pipeline.swap import swap_blocks, swapped_indices


def built(tiny_family_model, name, dtype=torch.float32):
    cls = family_class(name)
    root = tiny_family_model(name)
    real = cls.denoiser_class.from_pretrained(root, subfolder=cls.denoiser_component, dtype=dtype)
    config = cls.denoiser_class.load_config(root, subfolder=cls.denoiser_component)
    return cls, real, config


@pytest.mark.parametrize("name", ["flux", "sdxl", "hidream"])
def test_weights_and_lora_sizes_equal_the_built_models(tiny_family_model, name):
    cls, real, config = built(tiny_family_model, name)
    planned = meta_denoiser(cls, config)
    real_bytes = sum(t.numel() * t.element_size() for t in list(real.parameters()) + list(real.buffers()))
    assert weight_bytes(planned, "fp32", "none") == real_bytes
    assert weight_bytes(planned, "bf16", "none") * 2 == real_bytes
    linear = sum(m.weight.numel() for m in real.modules() if isinstance(m, torch.nn.Linear))
    assert weight_bytes(planned, "bf16", "int8") == real_bytes // 2 - linear  # 1 byte instead of 2 per weight
    for lora in (LoraConfig(rank=4), LoraConfig(rank=8, targets="all_linear", use_dora=True)):
        sizes = lora_bytes(planned, lora, cls.target_presets, "adamw")
        fresh = built(tiny_family_model, name)[1]
        n = sum(p.numel() for p in add_lora(fresh, lora, cls.target_presets))
        assert sizes == {"lora": 4 * n, "lora_grads": 4 * n, "optimizer_state": 8 * n}


@pytest.mark.parametrize("name", ["flux", "hidream"])
def test_swap_removes_the_swapped_blocks_but_the_two_largest(tiny_family_model, name):
    cls, real, config = built(tiny_family_model, name, torch.bfloat16)
    blocks = swap_blocks(real, cls)
    n = len(blocks) - 1
    sizes = sorted(sum(p.numel() * 2 for p in blocks[i].parameters()) for i in swapped_indices(len(blocks), n))
    settings = dict(dtype="bf16", resolution=64, max_sequence_length=16, cache_batch_size=1)
    family = cls(tiny_family_model(name), ModelConfig(path=str(tiny_family_model(name))))
    base = estimate(family, config, LoraConfig(rank=4), Settings(**settings))
    swap = estimate(family, config, LoraConfig(rank=4), Settings(blocks_to_swap=n, **settings))
    assert base.train_peak - swap.train_peak == sum(sizes[:-2]) == -swap.parts["swapped_out"]
    assert base.parts["activations"] > 0 and base.parts["activations"] == swap.parts["activations"]
    ckpt = estimate(family, config, LoraConfig(rank=4), Settings(gradient_checkpointing=True, **settings))
    assert ckpt.parts["activations"] < base.parts["activations"]


def test_activations_grow_with_batch_and_resolution(tiny_family_model):
    cls = family_class("flux")
    root = tiny_family_model("flux")
    config = cls.denoiser_class.load_config(root, subfolder="transformer")
    family = cls(root, ModelConfig(path=str(root)))
    act = lambda **kw: estimate(family, config, LoraConfig(rank=4), Settings(max_sequence_length=16, **kw)  # noqa: E731
                                ).parts["activations"]
    small = act(resolution=64, batch_size=1)
    # nearly every saved tensor has the batch dimension (the rotary embeddings are shared by the batch)
    assert 1.9 * small < act(resolution=64, batch_size=2) < 2 * small
    assert act(resolution=128, batch_size=1) > 2 * small  # 4x the image tokens


@pytest.mark.slow
def test_plan_memory_command_prints_the_parts(project):
    path, _ = project()
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan-memory", "--config", str(path), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert plan["train_peak"] == sum(plan["parts"].values()) and plan["parts"]["weights"] > 0
    assert plan["cache_phase"] in plan["cache_parts"]
