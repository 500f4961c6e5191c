"""The saved LoRA loads in FluxPipeline and the pipeline's denoiser then predicts what the trained model
predicts: in the diffusers format for every target preset (no missing or unexpected keys, bitwise), and
in kohya's layout, which diffusers converts on load. Plus how lora.targets / target_modules /
target_regex choose the layers."""

import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from conftest import CPU32, configure

from pipeline.cache.stage import run_cache
from pipeline.config import LoraConfig, ModelConfig
from pipeline.errors import UserError
from pipeline.families.flux.adapter import FluxFamily
from pipeline.denoiser.lora import diffusers_weights, resolve_targets
from pipeline.data.plan import make_plan
from pipeline.train.stage import train_lora

PRESETS = FluxFamily.target_presets


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    # keys hash contents, not paths: the tests here share one cache, each computing only what it lacks
    return tmp_path_factory.mktemp("lora-cache")


def train(project, cache, lora=None, train_table=None, **overrides):
    # fp32: the pipeline casts a LoRA to its own dtype, so only there can equality be bitwise
    path, _ = project(cache=cache, dtype="fp32", alpha=8.0, **overrides)  # alpha != rank: the scale must survive
    cfg = configure(path, lora=lora or {}, train=train_table or {})
    run_cache(cfg, progress=False)
    trained, summary = train_lora(cfg, progress=False)
    with safe_open(summary["lora"], "pt") as f:
        weights, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    return cfg, trained, summary, weights, meta


def predictions(family, *models):
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    text = {"prompt_embeds": torch.randn(2, 32, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g)}
    timesteps = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        return [family.predict(m.eval(), noisy, timesteps, text, **CPU32) for m in models]


def _image(pipe):
    return pipe(
        prompt="a photo of sks teapot", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.e2e
@pytest.mark.parametrize("targets,steps", [("attention", {"epochs": 2}), ("attention_mlp", {"max_steps": 3, "lr": 1e-2}),
                                           ("all_linear", {"max_steps": 3, "lr": 1e-2})])
def test_lora_loads_in_flux_pipeline_and_matches_the_trained_model(project, shared_cache, targets, steps):
    cfg, trained, summary, file_weights, meta = train(project, shared_cache, lora={"targets": targets}, **steps)
    plan = make_plan(cfg)
    file_keys = set(file_weights)
    assert file_keys and all(k.startswith("transformer.") for k in file_keys)
    assert json.loads(meta["prior_lora.config"])["train"]["dtype"] == "fp32"
    assert json.loads(meta["prior_lora.config"])["lora"]["targets"] == targets
    assert meta["prior_lora.base_model"] == plan.denoiser_fp
    adapter = json.loads(meta["lora_adapter_metadata"])
    # alpha/rank = 2 is folded into lora_B, so the file says alpha = rank (ComfyUI reads no alpha here)
    assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 4
    assert json.loads(meta["prior_lora.config"])["lora"]["alpha"] == 8.0
    modules = json.loads(meta["prior_lora.target_modules"])  # the resolved list, as trained
    assert modules == sorted({k.removeprefix("transformer.").split(".lora_")[0] for k in file_keys})
    linears = {n for n, m in trained.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    expected = {"attention": 14, "attention_mlp": 22, "all_linear": len(linears)}[targets]
    assert len(modules) == expected  # 1 double block x 8 + 2 single x 3; + 4 + 2 x 2 MLP layers; every Linear

    pipe = FluxPipeline.from_pretrained(plan.family.root, dtype=torch.float32)
    before = _image(pipe)
    pipe.load_lora_weights(summary["lora"], adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == file_keys  # nothing missing, nothing unexpected
    for k, v in loaded.items():
        assert torch.equal(v, file_weights[f"transformer.{k}"]), k
    peft_file = diffusers_weights(trained, "transformer")
    for k, v in peft_file.items():  # the trained B times alpha/rank, exactly (a power of two)
        assert torch.equal(file_weights[k], v * 2 if ".lora_B." in k else v), k
    assert pipe.transformer.peft_config["trained"].lora_alpha == 4
    after = _image(pipe)
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(after), atol=1e-3)

    ours, theirs = predictions(plan.family, trained, pipe.transformer)
    assert torch.equal(ours, theirs)


@pytest.mark.e2e
@pytest.mark.parametrize("targets", ["attention", "attention_mlp"])
def test_kohya_file_loads_in_flux_pipeline_and_matches_the_trained_model(
    project, shared_cache, tiny_flux_double_only, targets
):
    cfg, trained, summary, weights, meta = train(
        project, shared_cache, lora={"targets": targets}, train_table={"lora_format": "kohya"},
        model=tiny_flux_double_only, max_steps=3, lr=1e-2,
    )
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert all(k.startswith("lora_unet_double_blocks_0_") and k.endswith(suffixes) for k in weights)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in weights}
    assert all(n + s in weights for n in names for s in suffixes)
    assert weights["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)  # q, k, v: 3 x rank 4
    assert float(weights["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 24.0  # 3 x 8: alpha/rank kept
    assert float(weights["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 8.0
    assert ("lora_unet_double_blocks_0_img_mlp_0" in names) == (targets == "attention_mlp")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_network_module"] == "networks.lora_flux" and "prior_lora.config" in meta
    assert "lora_adapter_metadata" not in meta  # diffusers would apply it to the converted keys

    plan = make_plan(cfg)
    pipe = FluxPipeline.from_pretrained(plan.family.root, dtype=torch.float32)
    pipe.load_lora_weights(summary["lora"], adapter_name="trained")
    loaded = {k.split(".lora_")[0] for k in get_peft_model_state_dict(pipe.transformer, adapter_name="trained")}
    assert sorted(loaded) == json.loads(meta["prior_lora.target_modules"])
    ours, theirs = predictions(plan.family, trained, pipe.transformer)
    pipe.transformer.disable_lora()
    (base,) = predictions(plan.family, pipe.transformer)
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters, so agreement below means something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("lora,message", [
    ({"targets": "all_linear"}, r"train\.lora_format.*x_embedder.*lora\.targets = \"all_linear\""),
    ({"use_dora": True}, r"train\.lora_format.*DoRA"),
])
def test_kohya_refuses_before_training_what_diffusers_would_not_load(project, shared_cache, lora, message):
    with pytest.raises(UserError, match=message):
        train(project, shared_cache, lora=lora, train_table={"lora_format": "kohya"})
    assert not list((project.root / "out").glob("*.safetensors"))


@pytest.mark.parametrize("mlp", [False, True])
def test_kohya_layout_at_flux1_widths(mlp):
    """Single blocks at FLUX.1's real widths through diffusers' own converter: every module's update
    alpha/r * B @ A comes back (absent parts of a fused linear1 as zero)."""
    g, r, dim = torch.Generator().manual_seed(0), 2, 3072
    shapes = {"attn.to_q": (dim, dim), "attn.to_k": (dim, dim), "attn.to_v": (dim, dim), "proj_out": (dim, 5 * dim),
              "proj_mlp": (4 * dim, dim), "norm.linear": (3 * dim, dim)}
    shapes = {f"single_transformer_blocks.0.{k}": v for k, v in shapes.items()}
    shapes.update({"transformer_blocks.0.attn.to_k": (dim, dim), "transformer_blocks.0.norm1.linear": (6 * dim, dim)})
    if not mlp:
        for k in ("single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"):
            del shapes[k]
    sd = {}
    for module, (out, fan_in) in shapes.items():
        sd[f"transformer.{module}.lora_A.weight"] = torch.randn(r, fan_in, generator=g)
        sd[f"transformer.{module}.lora_B.weight"] = torch.randn(out, r, generator=g)
    kohya = FluxFamily(".", ModelConfig(path=".")).lora_layout.to_kohya(dict(sd), alpha=1.0)
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))  # diffusers then loads each with scale 1
    modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in back}
    assert set(shapes) <= modules
    for module in modules:
        a, b = back[f"transformer.{module}.lora_A.weight"], back[f"transformer.{module}.lora_B.weight"]
        x = torch.randn(a.shape[1], 3, generator=g)
        got = b @ (a @ x)
        if module in shapes:
            want = (1.0 / r) * sd[f"transformer.{module}.lora_B.weight"] @ (sd[f"transformer.{module}.lora_A.weight"] @ x)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # the zero block of a part the LoRA does not cover (k and v of the double block, proj_mlp)
            assert not got.any(), module


def test_targets_choose_the_layers(tiny_assets):
    model = FluxTransformer2DModel.from_pretrained(tiny_assets / "model", subfolder="transformer")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert FluxFamily.default_target_modules == PRESETS["attention"]
    assert resolve_targets(model, LoraConfig(targets="all_linear"), PRESETS) == linears
    mlp = set(resolve_targets(model, LoraConfig(targets="attention_mlp"), PRESETS))
    assert "single_transformer_blocks.1.proj_out" in mlp and "proj_out" not in mlp  # the final layer is not MLP
    # a list wins over the preset, a regex over both; a list entry is a suffix, a regex matches whole names
    both = LoraConfig(targets="all_linear", target_modules=["proj_out"])
    assert resolve_targets(model, both, PRESETS) == [
        "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out", "proj_out"]
    regex = LoraConfig(targets="all_linear", target_modules=["to_q"], target_regex=r"proj_out|transformer_blocks\.0\..*_q")
    assert resolve_targets(model, regex, PRESETS) == ["transformer_blocks.0.attn.to_q", "proj_out"]
    for cfg, key in [(LoraConfig(target_modules=["to_q", "to_qq"]), "lora.target_modules"),
                     (LoraConfig(target_modules=["attn.norm_q"]), "lora.target_modules"),  # an RMSNorm
                     (LoraConfig(target_regex="to_q"), "lora.target_regex")]:  # whole names only
        with pytest.raises(UserError, match=rf"config key '{key}'.* matches no Linear"):
            resolve_targets(model, cfg, PRESETS)
