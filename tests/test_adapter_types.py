"""lora.type = "lokr" | "loha": peft's LoKr and LoHa in place of the LoRA.

- the LyCORIS file (train.lora_format = "lycoris") has ComfyUI's names for every family and, read back by
  ComfyUI's rules (comfyui_rules.py: kron(w1, w2) or the Hadamard product, alpha / rank), gives the update
  of the trained peft model; the diffusers file (peft's names and config, the scale folded) gives it too
  through the denoiser's load_lora_adapter (LoKr) or peft (LoHa), and the families' pipelines that do not
  read LoKr are the ones training says so for;
- the planner counts the adapter's parameters as peft makes them;
- bad combinations are one line naming the key;
- on the tiny Flux: a cache made for a LoRA serves a LoKr or LoHa with nothing recomputed, and training
  starts at zero prior loss (the adapter starts as the identity).
"""

import json

import pytest
import torch
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors import safe_open
from safetensors.torch import load_file

import comfyui_rules as comfy
from conftest import CPU32, configure
from pipeline.cache.stage import run_cache
from pipeline.config import LoraConfig, ModelConfig, load_config
from pipeline.denoiser.lora import ADAPTER_METADATA_KEY, add_lora, load_into_pipeline, save_lora
from pipeline.errors import UserError
from pipeline.families import family_class
from pipeline.families.base import load_full_pipeline
from pipeline.memory import lora_bytes
from test_comfyui_keys import targets_of

FAMILIES = ("flux", "sdxl", "hidream")
RANK, ALPHA = 4, 8.0  # alpha != rank: the strength must survive


def adapted(name, root, kind, preset="all_linear", seed=0, rank=RANK, **lora):
    """The tiny family's denoiser with a LoKr or LoHa whose every tensor is random (none zero)."""
    fam = family_class(name)(root, ModelConfig(path=str(root)))
    model = fam.load_denoiser(**CPU32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(rank=rank, alpha=ALPHA, targets=preset, type=kind, **lora)
    config = json.loads((root / fam.denoiser_component / "config.json").read_text())
    targets = targets_of(name, model, config)
    add_lora(model, cfg, fam.target_presets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return fam, model, cfg, base, targets


def deltas(model):
    """peft's own update of each adapted module (its one adapter, whatever its name): '<module>.weight' -> delta."""
    with torch.no_grad():
        return {f"{n}.weight": m.get_delta_weight(next(iter(m._available_adapters)))
                for n, m in model.named_modules() if isinstance(m, LycorisLayer)}


def plus(base, delta):
    return {k: v + delta[k] if k in delta else v for k, v in base.items()}


@pytest.mark.parametrize("kind", ["lokr", "loha"])
@pytest.mark.parametrize("name", FAMILIES)
def test_the_lycoris_file_has_comfyuis_names_and_gives_the_trained_update(name, kind, tiny_family_model, tmp_path):
    fam, model, cfg, base, targets = adapted(name, tiny_family_model(name), kind)
    path = tmp_path / "lycoris.safetensors"
    save_lora(path, model, fam, {}, cfg, "lycoris")
    lora = load_file(path)
    assert any(k.endswith(".lokr_w1" if kind == "lokr" else ".hada_w1_a") for k in lora)
    if kind == "lokr":  # the tiny widths give both: w2 a product (with .alpha) and w2 whole (scale in w1)
        assert any(k.endswith(".lokr_w2_a") for k in lora) and any(k.endswith(".lokr_w2") for k in lora)
    diffs, unloaded = comfy.load_lycoris(lora, comfy.key_map(name, targets))
    assert diffs and not unloaded  # every key is a ComfyUI name
    assert len(diffs) == len(deltas(model))  # one stem per adapted module
    ours = comfy.merge_lycoris(comfy.to_comfy(base, targets), diffs)
    theirs = comfy.to_comfy(plus(base, deltas(model)), targets)
    before = comfy.to_comfy(base, targets)
    for w in {d.target.weight for d in diffs}:
        assert not torch.equal(ours[w], before[w]), w
        torch.testing.assert_close(ours[w], theirs[w], rtol=1e-5, atol=1e-6)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == kind


def test_a_lokr_whose_factors_are_whole_has_its_scale_in_lokr_w1(tiny_family_model, tmp_path):
    # a rank as large as the factors: peft keeps w2 whole, where ComfyUI applies no alpha
    fam, model, cfg, base, targets = adapted("flux", tiny_family_model("flux"), "lokr", preset="attention", rank=64)
    path = tmp_path / "lycoris.safetensors"
    save_lora(path, model, fam, {}, cfg, "lycoris")
    lora = load_file(path)
    assert any(k.endswith(".lokr_w2") for k in lora) and not any(k.endswith(".alpha") for k in lora)
    diffs, unloaded = comfy.load_lycoris(lora, comfy.key_map("flux", targets))
    assert diffs and not unloaded
    ours = comfy.merge_lycoris(comfy.to_comfy(base, targets), diffs)
    theirs = comfy.to_comfy(plus(base, deltas(model)), targets)
    for w in {d.target.weight for d in diffs}:
        torch.testing.assert_close(ours[w], theirs[w], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_diffusers_lokr_file_loads_with_load_lora_adapter_not_the_pipeline(name, tiny_family_model, tmp_path):
    root = tiny_family_model(name)
    fam, model, cfg, base, _ = adapted(name, root, "lokr")
    path = tmp_path / "lokr.safetensors"
    save_lora(path, model, fam, {}, cfg, "diffusers")
    denoiser = fam.load_denoiser(**CPU32)
    denoiser.load_lora_adapter(str(path), prefix=fam.denoiser_component, adapter_name="file")
    ours, theirs = deltas(model), deltas(denoiser)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6)
    # what training says at the start: these families' pipelines do not read a LoKr file; `sample` loads it
    # into the pipeline's denoiser instead
    assert "lokr" not in fam.pipeline_adapter_types
    pipe = load_full_pipeline(fam, **CPU32)
    with pytest.raises((ValueError, KeyError, RuntimeError)):
        pipe.load_lora_weights(str(path))
    pipe = load_full_pipeline(fam, **CPU32)
    load_into_pipeline(pipe, fam, path)
    loaded = deltas(getattr(pipe, fam.denoiser_component))
    for k in ours:
        torch.testing.assert_close(loaded[k], ours[k], rtol=1e-5, atol=1e-6)


def test_the_diffusers_loha_file_loads_with_peft_and_the_lycoris_file_nowhere_in_diffusers(tiny_family_model, tmp_path):
    fam, model, cfg, base, _ = adapted("flux", tiny_family_model("flux"), "loha")
    path = tmp_path / "loha.safetensors"
    save_lora(path, model, fam, {}, cfg, "diffusers")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[ADAPTER_METADATA_KEY])
    assert meta["transformer.alpha"] == meta["transformer.r"] == RANK  # the scale is in the tensors
    pipe = load_full_pipeline(fam, **CPU32)
    load_into_pipeline(pipe, fam, path)
    ours, theirs = deltas(model), deltas(pipe.transformer)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6)
    save_lora(tmp_path / "lycoris.safetensors", model, fam, {}, cfg, "lycoris")
    with pytest.raises(UserError, match="is a LoHa in the LyCORIS layout, which ComfyUI reads and diffusers does not"):
        load_into_pipeline(load_full_pipeline(fam, **CPU32), fam, tmp_path / "lycoris.safetensors")


@pytest.mark.parametrize("kind", ["lokr", "loha"])
@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_the_planner_counts_the_adapter_as_peft_makes_it(name, kind, tiny_family_model):
    root = tiny_family_model(name)
    fam = family_class(name)(root, ModelConfig(path=str(root)))
    for cfg in (LoraConfig(rank=RANK, targets="all_linear", type=kind),
                LoraConfig(rank=32, targets="attention", type=kind)):
        planned = lora_bytes(fam.load_denoiser(**CPU32), cfg, fam.target_presets, "adamw")["lora"]
        model = fam.load_denoiser(**CPU32)
        params = add_lora(model, cfg, fam.target_presets)
        assert planned == 4 * sum(p.numel() for p in params), cfg


def test_plan_memory_plans_a_lokr_and_a_loha(project):
    # peft builds a LoKr's and LoHa's whole update per layer in the forward: the dry run (the trainer's own
    # add_lora on the meta device) counts what it keeps for the backward
    from pipeline.memory import plan_memory

    path, _ = project()
    plans = {kind: plan_memory(configure(path, lora={"type": kind}), False) for kind in ("lora", "lokr", "loha")}
    for kind, plan in plans.items():
        assert plan.parts["lora"] > 0 and plan.parts["activations"] > 0, kind
    assert plans["loha"].parts["lora"] == 2 * plans["lora"].parts["lora"]  # two LoRA-sized pairs per layer
    assert plans["lokr"].parts["activations"] > plans["lora"].parts["activations"]


@pytest.mark.parametrize("lora, train, message", [
    ({"type": "lokr"}, {"lora_format": "kohya"},
     "config key 'train.lora_format' = \"kohya\" holds LoRA's down/up pairs only, no lokr"),
    ({"type": "loha"}, {"lora_format": "kohya"}, "no loha (lora.type = 'loha'): use \"lycoris\""),
    ({}, {"lora_format": "lycoris"}, "'train.lora_format' = \"lycoris\" is for lora.type = \"lokr\" or \"loha\""),
    ({"type": "lokr", "use_dora": True}, {}, "config key 'lora.use_dora' = true is for lora.type = \"lora\" only"),
    ({"type": "loha", "dropout": 0.1}, {}, "config key 'lora.dropout' = 0.1 is for lora.type = \"lora\" only"),
    ({"type": "lokr", "init": "gaussian"}, {}, "config key 'lora.init' = \"gaussian\" is for lora.type"),
    ({"type": "lokr", "lokr_factor": 0}, {}, "config key 'lora.lokr_factor' must be -1"),
    ({"type": "lokr", "lokr_factor": -2}, {}, "config key 'lora.lokr_factor' must be -1"),
    ({"type": "loha", "lokr_factor": 4}, {}, "config key 'lora.lokr_factor' is for lora.type = \"lokr\""),
    ({"type": "oft"}, {}, "lora.type"),
    ({"type": "lokr"}, {"quantize": "nf4"}, "config key 'model.quantize' = \"nf4\" works with lora.type = \"lora\""),
])
def test_bad_adapter_keys_are_one_line(project, lora, train, message):
    path, _ = project()
    model = {"quantize": train.pop("quantize")} if "quantize" in train else {}
    with pytest.raises(UserError) as e:
        configure(path, lora=lora, train=train, model=model)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sharded_training_takes_a_lora_only(project):
    from pipeline.settings import refuse_sharding

    path, _ = project()
    cfg = configure(path, lora={"type": "loha"}, train={"fsdp": True})
    with pytest.raises(UserError, match="config key 'train.fsdp' works with lora.type = \"lora\" only \\(got 'loha'\\)"):
        refuse_sharding(cfg, None)


@pytest.mark.e2e
@pytest.mark.parametrize("name, kind, fmt, said", [
    ("flux", "lokr", "lycoris", "the LoKr file is in the layout ComfyUI reads; flux's diffusers pipeline does not"),
    ("flux", "loha", "diffusers", "diffusers has no loader for LoHa files"),
    ("sdxl", "lokr", "diffusers", "sdxl's diffusers pipeline does not load LoKr files (load_lora_weights)"),
])
def test_switching_to_lokr_or_loha_recomputes_nothing_and_starts_at_zero_prior_loss(
    project, tiny_family_model, capsys, name, kind, fmt, said
):
    from pipeline.train.stage import train_lora

    # bf16: the adapter's zero update leaves bf16 outputs as they are
    path, cfg = project(model=tiny_family_model(name), max_steps=2, batch=4)
    first = run_cache(cfg, progress=False)  # cached for a LoRA
    assert first["priors_computed"] > 0
    cfg = configure(path, lora={"type": kind}, train={"lora_format": fmt})
    again = run_cache(cfg, progress=False)
    computed = {k: v for k, v in again.items() if k.endswith(("_computed", "_encoded"))}
    assert computed and not any(computed.values()), computed
    capsys.readouterr()
    trained, summary = train_lora(cfg, progress=False)
    err = capsys.readouterr().err
    assert said in err
    metrics = json.loads(open(summary["metrics"]).readline())
    assert metrics["n_prior"] > 0 and metrics["loss_standard"] > 0
    assert metrics["loss_prior"] <= 1e-10 * metrics["loss_standard"]
    written = load_file(summary["lora"])
    assert any(f".{'lokr_w1' if kind == 'lokr' else 'hada_w1_a'}" in k for k in written)
    assert all(torch.isfinite(v).all() for v in written.values())
    assert any(torch.count_nonzero(d) for d in deltas(trained.module if hasattr(trained, "module") else trained).values())
    assert load_config(path).lora.type == kind
