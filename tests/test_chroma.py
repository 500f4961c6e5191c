"""Chroma on its tiny model, beyond the conformance suite (test_families.py): its conditioning and one
denoising step are exactly ChromaPipeline's (the T5 mask with one padding token unmasked, the mask over the
image tokens), the step-0 prior loss is zero in fp32 and bf16 and with gradient checkpointing (whose single
blocks diffusers calls without the mask), an interrupted run resumed ends bitwise where an uninterrupted one
does, 2 processes train what 1 trains, and a Chroma config on a Flux folder is one line."""

import json

import pytest
import torch
from diffusers import ChromaPipeline
from safetensors.torch import load_file

from conftest import CPU32, configure
from pipeline.cache.stage import run_cache
from pipeline.config import ModelConfig
from pipeline.data.plan import make_plan
from pipeline.errors import UserError
from pipeline.families.chroma.adapter import ChromaFamily
from pipeline.families.load import detect_family, get_family
from pipeline.train import step as train_step_module
from pipeline.train.stage import train_lora


@pytest.fixture(scope="session")
def chroma(tiny_family_model):
    return tiny_family_model("chroma")


def _family(root, **model):
    return ChromaFamily(root, ModelConfig(path=str(root), **model))


def test_detection_tells_chroma_from_flux(chroma, tiny_assets):
    assert detect_family(chroma) == "chroma" and detect_family(tiny_assets / "model") == "flux"
    with pytest.raises(UserError) as e:
        get_family(ModelConfig(path=str(tiny_assets / "model"), family="chroma"))
    assert "\n" not in str(e.value) and "holds a FluxPipeline, not a Chroma model" in str(e.value)
    with pytest.raises(UserError, match="'model.max_sequence_length' must be at most 512"):
        _family(chroma, max_sequence_length=513)


def test_conditioning_is_the_pipelines_with_one_padding_token_unmasked(chroma):
    family = _family(chroma, max_sequence_length=16)
    encoders = family.load_text_encoders(**CPU32)
    captions = ["a photo of sks teapot", ""]
    cond = family.encode_captions(encoders, captions)
    pipe = ChromaPipeline.from_pretrained(chroma, transformer=None, vae=None)
    tokens = pipe.tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").attention_mask
    for c, t in zip(cond, tokens):
        n = int(t.sum())
        assert c["prompt_attention_mask"].tolist() == [1.0] * (n + 1) + [0.0] * (16 - n - 1)
        # T5 saw the padding masked: the embeddings of the real tokens do not depend on the padding
        assert c["prompt_embeds"].shape == (16, 32)
    short = family.encode_captions(encoders, ["a photo of sks teapot"])[0]
    longer = _family(chroma, max_sequence_length=24).encode_captions(encoders, ["a photo of sks teapot"])[0]
    n = int(tokens[0].sum())
    torch.testing.assert_close(short["prompt_embeds"][:n], longer["prompt_embeds"][:n])


def test_a_prediction_is_the_pipelines_denoising_step(chroma):
    """The transformer's output in ChromaPipeline's first step, from the latents, prompt and mask it was
    given, equals family.predict's from the same (packed back: predict returns unpacked latents)."""
    family = _family(chroma, max_sequence_length=16)
    cond = family.encode_captions(family.load_text_encoders(**CPU32), ["a photo of sks teapot"])[0]
    pipe = ChromaPipeline.from_pretrained(chroma, dtype=torch.float32)
    seen = {}
    pipe.transformer.register_forward_hook(lambda m, a, kw, out: seen.update(kw=kw, out=out[0]), with_kwargs=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = ChromaPipeline._pack_latents(latents, 1, 4, 8, 8)
    pipe(prompt_embeds=cond["prompt_embeds"][None], prompt_attention_mask=cond["prompt_attention_mask"][None],
         latents=packed, height=64, width=64, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    timestep = seen["kw"]["timestep"] * 1000
    batch = {k: v[None] for k, v in cond.items()}
    with torch.no_grad():
        ours = family.predict(family.load_denoiser(**CPU32), latents, timestep, batch, **CPU32)
    assert torch.equal(ChromaPipeline._pack_latents(ours, 1, 4, 8, 8), seen["out"])
    mask = seen["kw"]["attention_mask"]  # the text mask extended over the 16 image tokens
    assert mask.shape == (1, 16 + 16) and torch.equal(mask[:, 16:], torch.ones(1, 16))


def test_gradient_checkpointing_keeps_the_mask(chroma):
    """diffusers' checkpointed single blocks get no mask; the family's hooks give it, so the training
    forward (grad enabled, checkpointing on) predicts what the cached prior's (no grad) does."""
    family = _family(chroma, max_sequence_length=16)
    cond = family.encode_captions(family.load_text_encoders(**CPU32), ["a photo of sks teapot", "a cat"])
    batch = family.collate(cond)
    model = family.load_denoiser(**CPU32)
    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 900.0])
    with torch.no_grad():
        prior = family.predict(model, latents, t, batch, **CPU32)
    model.enable_gradient_checkpointing()
    model.train()
    latents.requires_grad_(True)  # a graph, as the LoRA's parameters make one in training
    checkpointed = family.predict(model, latents, t, batch, **CPU32)
    assert torch.equal(checkpointed.detach(), prior)
    checkpointed.sum().backward()  # the recomputation in backward gets the mask too (no mismatch error)
    assert latents.grad is not None


@pytest.mark.e2e
@pytest.mark.parametrize("dtype,checkpointing", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_step_zero_prior_loss_is_zero(project, chroma, dtype, checkpointing):
    path, _ = project(model=chroma, dtype=dtype, max_steps=1, batch=4)
    cfg = configure(path, train={"gradient_checkpointing": checkpointing})
    run_cache(cfg, progress=False)
    _, summary = train_lora(cfg, progress=False)
    first = json.loads(open(summary["metrics"]).readline())
    assert first["n_prior"] > 0 and first["loss_prior"] <= 1e-10 * first["loss_standard"]


@pytest.mark.e2e
def test_the_prior_key_names_the_mask_rule_and_the_sequence_length(project, chroma):
    _, cfg = project(model=chroma)
    project(name="longer.toml", model=chroma)
    longer = configure(project.root / "longer.toml", model={"max_sequence_length": 24})
    plan, other = make_plan(cfg), make_plan(longer)
    assert "attention_mask" in plan.family.prediction_settings()
    sample = next(s for s in plan.samples if s.prior)
    same = next(s for s in other.samples if s.path == sample.path)
    assert sample.text_keys[0] != same.text_keys[0] and plan.prior_key(sample, 0) != other.prior_key(same, 0)


@pytest.mark.e2e
def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(project, chroma, monkeypatch):
    def config(name):
        path, _ = project(name=f"{name}.toml", model=chroma, dtype="fp32", max_steps=6, out=project.root / name)
        return configure(path, train={"checkpoint_every": 2})

    full, cut = config("full"), config("cut")
    run_cache(full, progress=False)
    expected = load_file(train_lora(full, progress=False)[1]["lora"])
    real, calls = train_step_module.train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C during step 3: the newest checkpoint is step 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_lora(cut, progress=False)
    monkeypatch.undo()
    _, summary = train_lora(cut, progress=False)
    assert summary["resumed_from_step"] == 2
    got = load_file(summary["lora"])
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_two_ranks_train_the_lora_one_trains(project, chroma, tmp_path):
    from test_dist import _train

    path, cfg = project(model=chroma, dtype="fp32", epochs=1)
    run_cache(cfg, progress=False)
    # no_sync on the first batch; checkpointing: the mask hooks under DDP's wrapper
    configure(path, train={"gradient_accumulation": 2, "gradient_checkpointing": True})
    one = _train(0, path, tmp_path / "one")[0]
    two = _train(2, path, tmp_path / "two")
    assert one.keys() == two[0].keys()
    assert max(float((one[k] - two[0][k]).abs().max()) for k in one) <= 1e-6
    assert max(float(one[k].abs().max()) for k in one if "lora_B" in k) > 1e-4  # it trained
    assert all(torch.equal(two[0][k], two[1][k]) for k in one)


@pytest.mark.e2e
def test_the_kohya_lora_of_the_double_blocks_loads_in_chroma_pipeline(project, chroma):
    """Flux's kohya layout through ChromaPipeline's loader on the tiny model: its double blocks (diffusers
    splits a single block's linear1 only at FLUX.1's widths, which test_lora_format.py checks)."""
    from test_families import check_lora_loads

    def double_blocks(**kw):
        path, _ = project(model=chroma, **kw)
        return path, configure(path, lora={"target_regex": r"transformer_blocks\.\d+\.(attn|ff|ff_context)\..*"})

    check_lora_loads(double_blocks, "kohya")


def test_chroma_single_files_in_bfl_layout_map_onto_the_full_size_model():
    """diffusers' Chroma converter is written for Chroma's own width (3072, fixed in it), so the names are
    checked at full size on the meta device: BFL's file, made by the converter's reverse, converts back to
    every parameter of the model with its shape."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    from pipeline.families.chroma.single_file import chroma_to_bfl
    from pipeline.families.chroma.planning import DENOISER

    with init_empty_weights():
        model = ChromaTransformer2DModel.from_config(DENOISER)
    state = model.state_dict()
    bfl = chroma_to_bfl(state)
    assert "single_blocks.0.linear1.weight" in bfl and "distilled_guidance_layer.norms.0.scale" in bfl
    back = convert_chroma_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in bfl.items()})
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}


def test_a_chroma_single_file_of_another_width_is_refused_in_one_line(chroma, tmp_path):
    model = chroma
    from diffusers import ChromaTransformer2DModel
    from safetensors.torch import save_file

    from pipeline.families.chroma.single_file import chroma_to_bfl

    reference = ChromaTransformer2DModel.from_pretrained(model, subfolder="transformer").state_dict()
    single = tmp_path / "chroma.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in chroma_to_bfl(reference).items()}, str(single))
    family = get_family(ModelConfig(path=str(model), denoiser_file=str(single)))
    with pytest.raises(UserError, match=r"^model.denoiser_file: '.*chroma.safetensors' does not load as the "
                                        r"transformer of") as e:
        family.load_denoiser(**CPU32)
    assert "\n" not in str(e.value)
