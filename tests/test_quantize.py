"""model.quantize on the tiny Flux: int8 and fp8 (torchao, on the CPU) load quantized, their cached priors
equal a fresh forward of the quantized base and the training step's step-0 prediction, changing the scheme
recomputes only priors (kept side by side), the prior key covers the numerics (scheme, library versions,
device type) and a change shows in `cache status` and training's refusal with why and the fix; the LoRA is
a normal diffusers LoRA. nf4 (bitsandbytes) needs CUDA: refused in one line without it, tested on a GPU."""

import importlib
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, TorchAoConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

from conftest import configure
from pipeline import quantize
from pipeline.data.batches import load_inputs
from pipeline.cache.maintenance import status
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.errors import UserError
from pipeline.data.plan import make_plan
from pipeline.train.stage import run_train, train_lora

CPU = torch.device("cpu")
TORCHAO = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}
COUNTS = ("latents_encoded", "texts_encoded", "noise_computed", "priors_computed")


def quantized(project, scheme, **overrides):
    path, _ = project(name=f"{scheme}.toml", **overrides)
    return path, configure(path, model={"quantize": scheme})


def test_takes_is_what_torchao_can_quantize():
    for scheme, cls in TORCHAO.items():
        for shape in [(o, i) for o in (1, 2, 5) for i in (1, 2, 3, 16)]:
            layer = torch.nn.Linear(shape[1], shape[0]).bfloat16()
            try:
                quantize_(layer, cls(set_inductor_config=False))
                layer(torch.randn(2, shape[1], dtype=torch.bfloat16))
                ok = quantize.is_quantized(layer)
            except RuntimeError:
                ok = False
            assert quantize.takes(scheme, shape) == ok, (scheme, shape)


def test_nf4_without_cuda_and_a_missing_backend_are_one_line_errors(project, monkeypatch):
    path, _ = project()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"model\.quantize.*nf4.*needs a CUDA GPU") as e:
            configure(path, model={"quantize": "nf4"})
        assert "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match=r"'model\.quantize' is \"nf4\", which runs on CUDA only, but train\.device"):
        configure(path, model={"quantize": "nf4"}, train={"device": "cpu"})
    monkeypatch.undo()
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "torchao" else real(name, *a))
    cfg = configure(path, model={"quantize": "int8"})
    with pytest.raises(UserError, match=r"model\.quantize.*needs torchao.*pip install 'prior-lora\[quant\]'"):
        make_plan(cfg)


def test_the_prior_key_covers_scheme_versions_and_device(project, monkeypatch):
    _, cfg = project()
    plan = make_plan(cfg)
    sample = next(s for s in plan.samples if s.prior)
    keys = {plan.prior_key(sample, 0)}
    for scheme in ("int8", "fp8"):
        keys.add(make_plan(configure(project.root / "config.toml", model={"quantize": scheme})).prior_key(sample, 0))
    configure(project.root / "config.toml", model={"quantize": "none"})
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    keys.add(make_plan(cfg).prior_key(sample, 0))
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # train.device = "auto" would pick cuda
    keys.add(make_plan(cfg).prior_key(sample, 0))
    assert len(keys) == 5
    n = make_plan(configure(project.root / "config.toml", model={"quantize": "int8"})).numerics
    assert {"torch", "diffusers", "peft", "torchao", "device"} <= set(n) and n["device"] == "cuda"
    assert n["quantize"]["config"]["_type"] == "Int8WeightOnlyConfig"


@pytest.mark.e2e
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_cached_prior_equals_a_fresh_quantized_forward_and_step0_prior_loss_is_zero(project, scheme, capfd):
    _, cfg = quantized(project, scheme, cache_batch=1, max_steps=1, batch=4)
    run_cache(cfg, progress=False)
    err = capfd.readouterr().err
    assert err.count(f"model.quantize = {scheme}: 36 of 36 linear layers of the transformer in {scheme} (torchao)") == 1
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    sample = next(s for s in plan.samples if s.prior)
    prior, attrs = store.read(f"prior/bf16-{scheme}", plan.prior_key(sample, 1))
    assert json.loads(attrs["numerics"]) == quantize.describe(plan.numerics)
    # the quantized base through diffusers alone (no LoRA, eval, no grad), on the same inputs
    base = FluxTransformer2DModel.from_pretrained(plan.family.root, subfolder="transformer", dtype=torch.bfloat16,
                                                  quantization_config=TorchAoConfig(TORCHAO[scheme]())).eval()
    assert all(quantize.is_quantized(m) for m in base.modules() if isinstance(m, torch.nn.Linear))
    inputs = load_inputs(plan, store, [(sample, 1)])
    with torch.no_grad():
        fresh = plan.family.predict(base, inputs.noisy, inputs.timesteps, inputs.cond, device=CPU, dtype=torch.bfloat16)
    assert torch.equal(prior["prediction"], fresh[0])
    plain = make_plan(configure(project.root / f"{scheme}.toml", model={"quantize": "none"}))
    assert plain.prior_key(sample, 1) != plan.prior_key(sample, 1)

    configure(project.root / f"{scheme}.toml", model={"quantize": scheme})
    run_train(cfg, progress=False)
    first = json.loads(open(cfg.train.output_dir + "/metrics.jsonl").readline())
    assert first["n_prior"] > 0 and first["loss_standard"] > 0.1
    assert first["loss_prior"] <= 1e-4 * first["loss_standard"], first


@pytest.mark.e2e
def test_changing_quantize_recomputes_only_priors_and_status_says_why(project, monkeypatch):
    path, cfg = project()
    run_cache(cfg, progress=False)
    int8 = configure(path, model={"quantize": "int8"})
    with pytest.raises(UserError) as e:  # training refuses, naming the numerics and the fix
        run_train(int8, progress=False)
    assert str(e.value).startswith("priors for bf16 with model.quantize = int8 are not cached (16 of 16 missing")
    assert "run python -m pipeline cache --config " in str(e.value)
    s = status(int8)
    assert s["kinds"]["prior/bf16-int8"]["missing"] == 16 and s["kinds"]["prior/bf16"]["stale"] == 16
    assert s["priors_missing"].startswith("16 of 16 priors for bf16 with model.quantize = int8 are missing")
    again = run_cache(int8, progress=False)
    assert {k: again[k] for k in COUNTS} == {"latents_encoded": 0, "texts_encoded": 0, "noise_computed": 0,
                                             "priors_computed": 16}
    back = configure(path, model={"quantize": "none"})
    assert run_cache(back, progress=False)["priors_computed"] == 0  # side by side, as dtypes
    assert sorted(status(back)["dtypes_with_priors"]) == ["bf16", "bf16-int8"]

    # another torch (an upgrade) or another device type: the same kind, stale, and status says what changed
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    s = status(back)
    assert s["kinds"]["prior/bf16"]["missing"] == 16
    assert "other numerics: torch " in s["priors_missing"] and "-> 2.99.0" in s["priors_missing"]
    assert "run python -m pipeline cache" in s["priors_missing"]
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match=r"other numerics: device cpu -> cuda\): run python -m pipeline cache"):
        run_train(back, progress=False)


@pytest.mark.e2e
def test_unquantizable_layers_stay_plain_and_are_listed_once(project, monkeypatch, capfd):
    _, cfg = quantized(project, "int8")
    monkeypatch.setattr(quantize, "takes", lambda scheme, shape: shape != (16, 32))  # as if torchao refused these
    model = make_plan(cfg).family.load_denoiser(CPU, torch.bfloat16)
    plain = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not quantize.is_quantized(m)}
    assert plain and all(tuple(model.get_submodule(n).weight.shape) == (16, 32) for n in plain)
    lines = [x for x in capfd.readouterr().err.splitlines() if x.startswith("model.quantize = int8")]
    assert len(lines) == 1 and "left unquantized (shapes torchao cannot take): " in lines[0]
    assert all(n in lines[0] for n in sorted(plain)[:8])


@pytest.mark.e2e
def test_the_lora_of_a_quantized_base_is_a_normal_diffusers_lora(project):
    _, cfg = quantized(project, "int8", max_steps=2, lr=1e-2)
    run_cache(cfg, progress=False)
    trained, summary = train_lora(cfg, progress=False)
    weights = load_file(summary["lora"])
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in weights.values())
    pipe = FluxPipeline.from_pretrained(make_plan(cfg).family.root, dtype=torch.float32)
    pipe.load_lora_weights(summary["lora"], adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == set(weights)  # nothing missing, nothing unexpected
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in weights.items() if ".lora_B." in k)


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nf4 (bitsandbytes 4-bit) needs CUDA")
def test_nf4_priors_equal_the_training_forward(project):
    """On a GPU: nf4's cached prior equals a fresh forward of the model as training holds it, the step-0
    prior loss is zero up to rounding, and switching to nf4 recomputes only priors."""
    from pipeline.denoiser.build import build_denoiser

    path, cfg = project(cache_batch=1, max_steps=1, batch=4)
    run_cache(cfg, progress=False)
    nf4 = configure(path, model={"quantize": "nf4"})
    s = run_cache(nf4, progress=False)
    assert {k: s[k] for k in COUNTS} == {"latents_encoded": 0, "texts_encoded": 0, "noise_computed": 0,
                                         "priors_computed": 16}
    plan, store = make_plan(nf4), Store(nf4.cache.dir)
    sample = next(x for x in plan.samples if x.prior)
    prior = store.read("prior/bf16-nf4", plan.prior_key(sample, 1))[0]["prediction"]
    denoiser, _ = build_denoiser(plan.cfg, plan.family, torch.device("cuda"), torch.bfloat16, checks=False)
    inputs = load_inputs(plan, store, [(sample, 1)])
    fresh = plan.family.predict(denoiser.module, inputs.noisy, inputs.timesteps, inputs.cond, device=denoiser.device,
                                dtype=denoiser.dtype).detach().cpu()
    assert torch.equal(prior, fresh[0])
    del denoiser
    run_train(nf4, progress=False)
    first = json.loads(open(nf4.train.output_dir + "/metrics.jsonl").readline())
    assert first["n_prior"] > 0 and first["loss_prior"] <= 1e-3 * first["loss_standard"], first
