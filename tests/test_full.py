"""train.method = "full": the denoiser's own weights train, with the priors from the cache.

- on the tiny Flux and SDXL, in fp32 and bf16: a cache made for a LoRA serves a full fine-tuning with
  nothing computed, and the step-0 prior loss is exactly zero; only the weights train.full_train_modules
  names change;
- the outputs: the pipeline folder loads with the denoiser's from_pretrained (the trained weights) and the
  family's DiffusionPipeline (the other components the base's, hard-linked); the single file holds every
  weight (SDXL: in the original UNet layout, which diffusers' from_single_file reads back); the extracted
  LoRA loads with load_lora_weights and at full rank gives the trained Linear weights;
- stochastic rounding is unbiased and seeded; the fused backward steps the weights to what the step
  after the backward gives, bit for bit; Adafactor and fp32 master weights train;
- bad combinations are one line naming the key.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import configure
from pipeline.errors import UserError
from pipeline.train.full import round_stochastic

FULL = {"method": "full"}
NO_LORA = {"rank": None, "alpha": None}  # the template's [lora] keys: a full run has no adapter


def full_config(project, model, dtype, **train):
    """A full fine-tuning config of the template (the template's LoRA keys removed)."""
    path, _ = project(model=model, dtype=dtype)
    return configure(path, lora=NO_LORA, train={**FULL, **train})


# -- unit ----------------------------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = torch.full((200_000,), 1.0 + 2 ** -10, dtype=torch.float32)  # a quarter of bf16's spacing above 1.0
    out = torch.empty_like(x, dtype=torch.bfloat16)
    round_stochastic(out, x, torch.Generator().manual_seed(0))
    values = set(out.float().unique().tolist())
    assert values == {1.0, 1.0 + 2 ** -7}  # the two bf16 neighbours
    assert abs(out.float().mean().item() - x[0].item()) < 2e-5  # nearest rounding would give 1.0 everywhere
    again = torch.empty_like(out)
    round_stochastic(again, x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    exact = torch.tensor([1.5, -2.0, 0.0])  # values bf16 holds stay as they are
    held = torch.empty(3, dtype=torch.bfloat16)
    round_stochastic(held, exact, torch.Generator().manual_seed(1))
    assert torch.equal(held.float(), exact)


@pytest.mark.parametrize("lora, train, message", [
    ({}, {"prior_mode": "online"}, "'train.prior_mode' = \"online\" does not work with train.method = \"full\": there is no second copy"),
    ({}, {"lora_format": "kohya"}, "config key 'train.lora_format' is for train.method = \"lora\""),
    ({}, {"ema": True}, "config key 'train.ema' is for train.method = \"lora\""),
    ({"rank": 8}, {}, "config key 'lora.rank' is for train.method = \"lora\""),
    ({"type": "lokr"}, {}, "config key 'lora.type' is for train.method = \"lora\""),
    ({}, {"dtype": "fp16"}, "'train.dtype' = \"fp16\" with train.method = \"full\" needs train.master_weights = true"),
    ({}, {"fused_backward": True}, "set optimizer.max_grad_norm = 0"),
    ({}, {"max_shard_size": "lots"}, "config key 'train.max_shard_size' must be a size"),
    ({}, {"method": "partial"}, "config key 'train.method' must be one of lora, full"),
    ({}, {"quantize": "int8"}, "'model.quantize' = 'int8' does not work with train.method = \"full\""),
])
def test_bad_full_keys_are_one_line(project, lora, train, message):
    path, _ = project()
    model = {"quantize": train.pop("quantize")} if "quantize" in train else {}
    with pytest.raises(UserError) as e:
        configure(path, lora={**NO_LORA, **lora}, train={**FULL, **train}, model=model)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key, value", [("master_weights", True), ("fused_backward", True), ("extract_rank", 4),
                                        ("full_train_modules", ["transformer_blocks.*"])])
def test_full_keys_with_a_lora_are_one_line(project, key, value):
    path, _ = project()
    with pytest.raises(UserError, match=f"config key 'train.{key}' is for train.method = \"full\""):
        configure(path, train={key: value})


def test_prodigy_is_refused(project):
    path, _ = project()
    with pytest.raises(UserError, match="'optimizer.name' = \"prodigy\" does not work with train.method = \"full\""):
        configure(path, lora=NO_LORA, train=FULL, optimizer={"name": "prodigy"})


def test_the_planner_counts_what_full_fine_tuning_holds(tiny_family_model):
    from pipeline.config import ModelConfig
    from pipeline.denoiser.full import train_weights
    from pipeline.families import family_class
    from pipeline.memory import Settings, full_bytes, meta_denoiser

    root = tiny_family_model("flux")
    fam = family_class("flux")(root, ModelConfig(path=str(root)))
    built = fam.load_denoiser(torch.device("cpu"), torch.bfloat16)
    trained = train_weights(built, ["transformer_blocks.*"])
    count, largest = sum(p.numel() for p in trained), max(p.numel() for p in trained)
    model = meta_denoiser(fam, fam.denoiser_class.load_config(root, subfolder="transformer"))
    s = Settings(method="full", full_train_modules=("transformer_blocks.*",), optimizer="adamw")
    assert full_bytes(model, s) == {"full_grads": count * 2, "master_weights": 0, "optimizer_state": count * 8,
                                    "step_temporaries": largest * 8}
    fused = full_bytes(model, Settings(method="full", full_train_modules=("transformer_blocks.*",), master_weights=True,
                                       fused_backward=True, optimizer="adamw8bit"))
    assert fused == {"full_grads": largest * 2, "master_weights": count * 4, "optimizer_state": count * 2,
                     "step_temporaries": largest * 8}


def test_sdxl_full_fine_tuning_plans_onto_a_24_gb_card():
    from pipeline.families import family_class
    from pipeline.memory import Settings, estimate
    from pipeline.config import LoraConfig
    from pipeline.tools.public_configs import public_family

    planning = family_class("sdxl").planning
    e = estimate(public_family("sdxl"), dict(planning.denoiser_config), LoraConfig(), Settings(
        method="full", optimizer="adafactor", fused_backward=True, gradient_checkpointing=True))
    assert e.parts["weights"] > 4.5 * 2**30 and "lora" not in e.parts  # 2.6 billion bf16 weights, no adapter
    assert e.train_peak <= 24e9


def test_a_pattern_that_takes_nothing_is_one_line(project):
    from pipeline.denoiser.full import train_weights
    from pipeline.families import family_class
    from pipeline.config import ModelConfig

    path, cfg = project()
    fam = family_class("flux")(cfg.model.path, ModelConfig(path=cfg.model.path))
    model = fam.load_denoiser(torch.device("cpu"), torch.float32)
    with pytest.raises(UserError, match="config key 'train.full_train_modules': 'transfomer_blocks.\\*' matches no"):
        train_weights(model, ["transformer_blocks.*", "transfomer_blocks.*"])
    params = train_weights(model, ["transformer_blocks.0"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("transformer_blocks.0.") for n in names) and len(params) == len(names)


# -- end to end ------------------------------------------------------------------------------------------

def _trained_and_base(cfg, summary, fam_name):
    from pipeline.data.plan import make_plan

    plan = make_plan(cfg)
    component = plan.family.denoiser_component
    cls = plan.family.denoiser_class
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.train.dtype]
    base = cls.from_pretrained(cfg.model.path, subfolder=component, torch_dtype=dtype).state_dict()
    saved = cls.from_pretrained(summary["model"], subfolder=component, torch_dtype=dtype).state_dict()
    return plan, base, saved


@pytest.mark.e2e
@pytest.mark.parametrize("name, dtype, modules", [
    ("flux", "fp32", []), ("flux", "bf16", ["transformer_blocks.*"]),
    ("sdxl", "fp32", ["up_blocks.1"]), ("sdxl", "bf16", []),
])
def test_full_fine_tuning_starts_at_zero_prior_loss_from_a_lora_cache(project, tiny_family_model, name, dtype,
                                                                       modules):
    from diffusers import DiffusionPipeline
    from pipeline.cache.stage import run_cache
    from pipeline.train.stage import train_lora

    path, cfg = project(model=tiny_family_model(name), max_steps=2, batch=4, dtype=dtype)
    assert run_cache(cfg, progress=False)["priors_computed"] > 0  # cached for a LoRA
    cfg = configure(path, lora=NO_LORA, train={**FULL, "full_train_modules": modules})
    again = run_cache(cfg, progress=False)
    assert not any(v for k, v in again.items() if k.endswith(("_computed", "_encoded")))
    trained, summary = train_lora(cfg, progress=False)
    first = json.loads(open(summary["metrics"]).readline())
    assert first["n_prior"] > 0 and first["loss_standard"] > 0
    # zero up to the rounding of kernels that differ where weights need a gradient (as for a LoRA)
    assert first["loss_prior"] <= 1e-10 * first["loss_standard"]
    plan, base, saved = _trained_and_base(cfg, summary, name)
    assert saved.keys() == base.keys()
    for k, v in trained.state_dict().items():  # the folder holds the weights as trained
        assert torch.equal(saved[k], v), k
    changed = {k for k in base if not torch.equal(base[k], saved[k])}
    taken = {k for k in base if not modules or any(k.startswith(m.rstrip("*").rstrip(".") + ".") for m in modules)}
    assert changed and changed <= taken
    # the family's pipeline loads the folder; its other components are the base's files
    pipe = DiffusionPipeline.from_pretrained(summary["model"])
    assert type(pipe).__name__ in plan.family.pipeline_classes
    if name == "flux" and dtype == "fp32":  # `sample` renders with the trained folder
        from pipeline.sample import sample

        grid = sample(cfg, None, ["a photo of sks teapot"], None, steps=1)
        assert grid == project.root / "out" / "model-sample.png" and grid.is_file()


@pytest.mark.e2e
def test_outputs_load_where_they_should(project, tiny_family_model):
    """SDXL: the single file in the original UNet layout (from_single_file reads it back), the extracted
    LoRA at full rank gives the trained Linear weights through load_lora_weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from pipeline.cache.stage import run_cache
    from pipeline.train.stage import train_lora

    cfg = full_config(project, model=tiny_family_model("sdxl"), dtype="fp32", extract_rank=512,
                      full_train_modules=["mid_block.*"])
    run_cache(cfg, progress=False)
    trained, summary = train_lora(cfg, progress=False)
    out = project.root / "out"
    unet = trained.module if hasattr(trained, "module") else trained
    want = {k: v.detach() for k, v in unet.state_dict().items()}
    single = load_file(summary["model_file"])
    assert all(k.startswith("model.diffusion_model.") for k in single) and len(single) == len(want)
    folder = out / "model"
    back = UNet2DConditionModel.from_single_file(summary["model_file"], config=str(folder), subfolder="unet")
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    # every file beside the UNet is the base's own (hard-linked here)
    base_vae = next((project.root / "out" / "model" / "vae").glob("*.safetensors"))
    assert base_vae.stat().st_nlink >= 2
    pipe = StableDiffusionXLPipeline.from_pretrained(cfg.model.path)
    pipe.load_lora_weights(summary["extracted_lora"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay, plain
    lora_weights = pipe.unet.state_dict()
    linear = [k for k, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and k.startswith("mid_block.")]
    assert linear
    for k in linear:
        assert torch.allclose(lora_weights[f"{k}.weight"], want[f"{k}.weight"], atol=1e-5), k


@pytest.mark.e2e
@pytest.mark.parametrize("dtype, master, optimizer", [("bf16", False, "adamw"), ("bf16", True, "adafactor")])
def test_fused_backward_steps_as_the_step_after_the_backward(project, monkeypatch, dtype, master, optimizer):
    from pipeline.cache.stage import run_cache
    from pipeline.train.full import FullOptimizer
    from pipeline.train.stage import train_lora

    got, grads_left = {}, []
    step = FullOptimizer.step

    def after_backward(self):  # what the step after the backward finds: fused, every gradient used and freed
        grads_left.append(sum(p.grad is not None for p in self.params))
        step(self)

    monkeypatch.setattr(FullOptimizer, "step", after_backward)
    for fused in (False, True):
        grads_left.clear()
        out = project.root / f"out-{fused}"
        path, _ = project(name=f"{fused}.toml", out=out, max_steps=3, dtype=dtype)
        cfg = configure(path, lora=NO_LORA, optimizer={"name": optimizer, "max_grad_norm": 0},
                        train={**FULL, "fused_backward": fused, "master_weights": master, "gradient_accumulation": 2,
                               "full_train_modules": ["single_transformer_blocks.*"]})
        run_cache(cfg, progress=False)
        trained, summary = train_lora(cfg, progress=False)
        got[fused] = load_file(summary["model_file"])
        assert len(grads_left) == 3 and (not any(grads_left) if fused else all(grads_left))
    assert got[False].keys() == got[True].keys()
    for k in got[False]:
        assert torch.equal(got[False][k], got[True][k]), k


@pytest.mark.e2e
def test_block_swap_and_gradient_checkpointing_train_as_without(project):
    """The frozen weights of swapped blocks leave the device and come back; the trained ones stay: the
    result is the plain run's, bit for bit (fp32)."""
    from pipeline.cache.stage import run_cache
    from pipeline.train.stage import train_lora

    got = {}
    for memory in (False, True):
        path, _ = project(name=f"{memory}.toml", out=project.root / f"out-{memory}", max_steps=2, dtype="fp32")
        cfg = configure(path, lora=NO_LORA, train={**FULL, "full_train_modules": ["transformer_blocks.*"],
                                                   "blocks_to_swap": 2 if memory else 0,
                                                   "gradient_checkpointing": memory})
        run_cache(cfg, progress=False)
        trained, summary = train_lora(cfg, progress=False)
        assert bool(trained._forward_pre_hooks) == memory  # the block swap's hook on the model
        got[memory] = load_file(summary["model_file"])
    for k in got[False]:
        assert torch.equal(got[False][k], got[True][k]), k


def test_sharded_full_fine_tuning_plans_a_share_of_the_trained_state():
    """train.fsdp over N processes: weights, gradients, master copies and optimizer state are 1/N a GPU."""
    from pipeline.config import LoraConfig
    from pipeline.families import family_class
    from pipeline.memory import Settings, estimate
    from pipeline.tools.public_configs import public_family

    planning = family_class("flux").planning
    plan = {n: estimate(public_family("flux"), dict(planning.denoiser_config), LoraConfig(), Settings(
        method="full", optimizer="adamw", master_weights=True, gradient_checkpointing=True, fsdp_processes=n))
        for n in (1, 8)}
    for part in ("weights", "full_grads", "master_weights", "optimizer_state"):
        assert plan[8].parts[part] == plan[1].parts[part] // 8, part
    assert plan[8].train_peak < 80e9 < plan[1].train_peak  # 12B weights: AdamW with masters on 8 80 GB GPUs
