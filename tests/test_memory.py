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
from pipeline.denoiser.lora import add_lora
from pipeline.memory import (Settings, activations, estimate, lora_bytes, meta_denoiser, prior_working,
                             weight_bytes)
from pipeline.denoiser.swap import swap_blocks, swapped_indices


def built(tiny_family_model, name, dtype=torch.float32):
    cls = family_class(name)
    root = tiny_family_model(name)
    real = cls.denoiser_class.from_pretrained(root, subfolder=cls.denoiser_component, dtype=dtype)
    config = cls.denoiser_class.load_config(root, subfolder=cls.denoiser_component)
    return cls, real, config


@pytest.mark.parametrize("name", ["flux", "sdxl", "hidream", "qwenimage"])
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
@pytest.mark.parametrize("name", ["flux", "hidream"])
def test_sharding_keeps_a_share_of_the_weights_and_lora_and_the_root_and_two_blocks_whole(tiny_family_model, name):
    cls, real, config = built(tiny_family_model, name, torch.bfloat16)
    blocks = sorted(sum(p.numel() * 2 for p in b.parameters()) for b in swap_blocks(real, cls))
    weights = sum(t.numel() * 2 for t in list(real.parameters()) + list(real.buffers()))
    settings = dict(dtype="bf16", resolution=64, max_sequence_length=16, cache_batch_size=1, blocks_to_swap=2)
    family = cls(tiny_family_model(name), ModelConfig(path=str(tiny_family_model(name))))
    one = estimate(family, config, LoraConfig(rank=4), Settings(**settings))
    four = estimate(family, config, LoraConfig(rank=4), Settings(fsdp_processes=4, **settings))
    assert four.parts["weights"] == weights // 4 and "swapped_out" not in four.parts  # sharded training swaps nothing
    assert four.parts["gathered_root_and_2_blocks"] == weights - sum(blocks) + sum(blocks[-2:])
    assert all(four.parts[k] == one.parts[k] // 4 for k in ("lora", "lora_grads", "optimizer_state"))
    assert four.parts["activations"] == one.parts["activations"]  # at the whole batch: a bound on a rank's share
    assert four.cache_parts == one.cache_parts  # the cache stage does not shard (it swaps its 2 blocks)


def test_plan_memory_command_prints_the_parts(project):
    path, _ = project()
    r = subprocess.run([sys.executable, "-m", "pipeline", "plan-memory", "--config", str(path), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert plan["train_peak"] == sum(plan["parts"].values()) and plan["parts"]["weights"] > 0
    assert plan["cache_phase"] in plan["cache_parts"]


def test_stages_say_the_estimate_on_a_gpu_only(project, capsys):
    from pipeline.memory import plan_memory, say_estimate

    _, cfg = project()
    say_estimate(cfg, torch.device("cpu"))
    assert capsys.readouterr().err == ""  # a GPU's figure says nothing on a CPU
    say_estimate(cfg, torch.device("cuda"), cache=False)  # only the device type is read: no GPU needed
    line = capsys.readouterr().err.strip()
    assert line == plan_memory(cfg, False).line(False) and line.startswith("estimated peak GPU memory: training ")


@pytest.mark.parametrize("name,depths", [("flux", {"num_layers": 3, "num_single_layers": 4}),
                                         ("hidream", {"num_layers": 3, "num_single_layers": 4}),
                                         ("sdxl", {"transformer_layers_per_block": [1, 3]}),
                                         ("qwenimage", {"num_layers": 3})])
def test_cut_dry_runs_stand_for_the_whole_model(tiny_family_model, name, depths, monkeypatch):
    # the planner's dry runs of one- and two-block models, extrapolated, give what a dry run of the whole
    # (deeper) model gives: the same saved bytes, and with checkpointing what is kept to within 1%
    cls, _, config = built(tiny_family_model, name)
    family = cls(tiny_family_model(name), ModelConfig(path=str(tiny_family_model(name))))
    deep = {**config, **depths} if name != "hidream" else family.planning.with_depths(config, depths)
    if name == "hidream":  # a llama layer per block, as the public config has
        deep["llama_layers"] = list(range(deep["num_layers"] + deep["num_single_layers"]))
    assert all(n > 1 for n in family.planning.block_depths(deep).values()) and family.planning.block_depths(deep)
    args = (LoraConfig(rank=4), 1, 64, torch.float32, 16)
    cut = activations(family, deep, *args)
    cut_prior = prior_working(family, deep, 2, 64, torch.float32, 16)
    monkeypatch.setattr(family.planning, "block_depths", lambda config: {})  # the class's: restored after
    whole = activations(family, deep, *args)
    assert cut.saved == whole.saved and cut.unit == whole.unit
    assert abs(cut.kept - whole.kept) <= 0.01 * whole.kept
    # a no-grad forward holds one block at a time: the cut model's working set is the whole one's
    assert cut_prior == prior_working(family, deep, 2, 64, torch.float32, 16) > 0


def test_sdxl_checkpointing_keeps_less(tiny_family_model):
    # SDXL's units are its resnets and transformer blocks (what diffusers' UNet checkpoints)
    cls, _, config = built(tiny_family_model, "sdxl")
    family = cls(tiny_family_model("sdxl"), ModelConfig(path=str(tiny_family_model("sdxl"))))
    act = lambda ckpt: estimate(family, config, LoraConfig(rank=4), Settings(  # noqa: E731
        resolution=64, gradient_checkpointing=ckpt)).parts
    assert 0 < act(True)["activations"] < act(False)["activations"]
    assert 0 < act(True)["backward_temporaries"] < act(False)["activations"]


@pytest.mark.parametrize("name", ["flux", "sdxl", "hidream"])
def test_cut_public_configs_keep_the_public_widths(name):
    from pipeline.tools.public_configs import ENCODERS, cut_config

    cls = family_class(name)
    model = meta_denoiser(cls, cut_config(name, 1))
    full = cls.planning.denoiser_config
    if name == "sdxl":
        assert [b.resnets[0].out_channels for b in model.down_blocks] == full["block_out_channels"]
        assert model.config.transformer_layers_per_block == [1, 1, 1]
        assert model.down_blocks[2].attentions[0].transformer_blocks[0].attn2.to_k.in_features == 2048
    else:
        width = full["num_attention_heads"] * full["attention_head_dim"]  # 3072 (Flux), 2560 (HiDream)
        blocks = [getattr(model, n) for n in cls.swap_blocks]
        assert [len(b) for b in blocks] == [1, 1]
        assert all(m.in_features == width for b in blocks for m in b[0].modules()
                   if isinstance(m, torch.nn.Linear) and m.in_features in (width, width // 2))
        to_q = [m for n, m in blocks[0][0].named_modules() if n.endswith("to_q")]
        assert to_q and all(m.out_features == width for m in to_q)
    # the parameter counts the cache stage's phases use, from the public encoder configs
    expected = {"flux": {"vae": 83_819_683, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656},
                "sdxl": {"vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
                "hidream": {"vae": 83_819_683, "text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
                            "text_encoder_3": 4_762_310_656, "text_encoder_4": 8_030_261_248}}
    assert ENCODERS[name] == expected[name]


def test_live_peak_counts_what_a_no_grad_forward_holds_at_once():
    from pipeline.memory import live_peak

    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(1000, 1000) for _ in range(3)])
        x = torch.zeros(8, 1000)
    # each output lives until the next one is made: two at once, never the weights (or their views)
    assert live_peak(model, lambda: model(x)) == 2 * 8 * 1000 * 4
    keep = []
    assert live_peak(model, lambda: keep.extend([model[0](x), model[1](x)])) == 2 * 8 * 1000 * 4


@pytest.mark.slow  # the whole table: every family's public models on meta, about 40 s on 2 cores
def test_memory_table_gives_each_public_variant_rows_of_its_own():
    from click.testing import CliRunner

    from pipeline.families import FAMILIES
    from pipeline.tools.memory_table import main

    result = CliRunner().invoke(main)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    variants = 0
    for name in FAMILIES:
        planning = family_class(name).planning
        if planning is None:
            continue
        assert sum(line.startswith(f"| {name} |") for line in lines) == len(planning.table_rows)
        for variant in planning.variants:
            variants += 1
            assert sum(line.startswith(f"| {name} ({variant.label}) |") for line in lines) == len(variant.table_rows)
    assert variants  # a family with two public sizes (FLUX.2 klein 4B and 9B) has rows for both
