"""The FLUX.2 family on its tiny models (klein; dev where named): the conditioning is Flux2KleinPipeline's encode_prompt, the
latents its _encode_vae_image (patchified, batch-norm normalised), `predict` the transformer call of one of
its denoising steps; step-0 prior loss zero in bf16, bitwise resume and 2 processes on klein; the BFL file
patched by ComfyUI's naming rules gives the weights diffusers loads; bad folders in one line."""

import json
import shutil

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from safetensors.torch import load_file

import comfyui_rules as comfy
from conftest import CPU32, configure
from pipeline.cache.stage import run_cache
from pipeline.config import LoraConfig, ModelConfig
from pipeline.denoiser.lora import add_lora, save_lora
from pipeline.errors import UserError
from pipeline.families.base import load_full_pipeline
from pipeline.families.flux2.kohya import bfl_name
from pipeline.families.load import get_family
from pipeline.train import step as train_step_module
from pipeline.train.stage import run_train

CAPTIONS = ["a photo of sks teapot on a blue table", "zebra xylophone!", ""]


@pytest.fixture(scope="module")
def model(tiny_family_model):
    return tiny_family_model("flux2")


@pytest.fixture(scope="module")
def family(model):
    return get_family(ModelConfig(path=str(model), max_sequence_length=32))


def test_detected_with_the_pipelines_layout(family, model):
    assert family.name == "flux2" and family.prediction_settings() == {}
    assert family.latent_shape((64, 96)) == (16, 4, 6)
    # FLUX.2's scheduler shifts dynamically: the training table is unshifted
    timesteps, sigmas = family.timestep_table()
    assert torch.allclose(timesteps, sigmas * 1000) and abs(float(sigmas[len(sigmas) // 2]) - 0.5) < 0.01


def test_text_and_latents_are_the_pipelines(family, model):
    pipe = Flux2KleinPipeline.from_pretrained(model)
    ours = family.encode_captions(family.load_text_encoders(**CPU32), CAPTIONS)
    theirs, _ = pipe.encode_prompt(CAPTIONS, device=torch.device("cpu"), max_sequence_length=32)
    assert torch.equal(torch.stack([e["prompt_embeds"] for e in ours]), theirs)
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = family.encode_images(family.load_vae(**CPU32), pixels)
    assert latents.shape == (2, *family.latent_shape((64, 96)))
    assert torch.equal(latents, pipe._encode_vae_image(pixels, generator=None))
    # the pipeline's decode step (un-normalise, unpatchify) inverts it
    bn = pipe.vae.bn
    back = pipe._unpatchify_latents(latents * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
                                    + bn.running_mean.view(1, -1, 1, 1))
    torch.testing.assert_close(back, pipe.vae.encode(pixels).latent_dist.mode())


def test_predict_is_the_pipelines_denoising_step(family, model):
    pipe = Flux2KleinPipeline.from_pretrained(model)
    embeds = torch.stack([e["prompt_embeds"] for e in family.encode_captions(pipe, CAPTIONS[:2])])
    latents = torch.randn(2, 16, 4, 6)
    calls = []
    real = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append(real(*a, **k)) or calls[-1]
    pipe(prompt_embeds=embeds, latents=latents, height=64, width=96,
         num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    theirs = Flux2KleinPipeline._unpack_latents_with_ids(calls[0][0], Flux2KleinPipeline._prepare_latent_ids(latents))
    ours = family.predict(pipe.transformer, latents, torch.full((2,), float(pipe.scheduler.timesteps[0])),
                          {"prompt_embeds": embeds}, **CPU32)
    assert torch.equal(ours, theirs)


@pytest.mark.e2e
@pytest.mark.parametrize("tiny", ["flux2", "flux2-dev"])
def test_step_zero_prior_loss_in_bf16_and_resume_is_bitwise(project, tiny, tiny_family_model, monkeypatch):
    model = tiny_family_model(tiny)

    def config(name):
        path, _ = project(name=f"{name}.toml", model=model, out=project.root / name, dtype="bf16", epochs=2)
        return configure(path, train={"checkpoint_every": 3})

    full = config("full")
    run_cache(full, progress=False)
    summary = run_train(full, progress=False)
    first = json.loads(open(project.root / "full" / "metrics.jsonl").readline())
    assert first["n_prior"] > 0 and first["loss_prior"] <= 1e-10 * first["loss_standard"]
    cut, real, calls = config("cut"), train_step_module.train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # Ctrl-C during step 4, after the checkpoint at 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(cut, progress=False)
    monkeypatch.undo()
    resumed = run_train(cut, progress=False)
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == summary["steps"]
    want, got = load_file(summary["lora"]), load_file(resumed["lora"])
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_the_bfl_file_patched_by_comfyui_rules_gives_diffusers_weights(family, tmp_path):
    model = family.load_denoiser(**CPU32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    # ComfyUI's model: BFL names, q, k, v fused in rows of one weight per stream; stems diffusion_model.<m>
    h = model.config.num_attention_heads * model.config.attention_head_dim
    targets = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and (place := bfl_name(n)) is not None:
            rows = None if place[1] is None else (place[1] * h, h)
            targets[n] = comfy.Target(f"diffusion_model.{place[0]}.weight", rows)
    cfg = LoraConfig(rank=4, alpha=8.0, targets="attention_mlp")
    add_lora(model, cfg, family.target_presets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / "lora.safetensors"
    save_lora(path, model, family, {}, cfg, "kohya")
    written = load_file(path)
    assert all(k.startswith("diffusion_model.") for k in written)
    assert any(".img_attn.qkv." in k for k in written) and any(".txt_attn.qkv." in k for k in written)

    patches, unloaded = comfy.load(written, comfy.key_map("flux2", targets))
    assert patches and not unloaded
    ours = comfy.merge(comfy.to_comfy(base, targets), patches)

    pipe = load_full_pipeline(family, **CPU32)
    pipe.load_lora_weights(str(path), adapter_name="file")
    merged = dict(base)
    for n, layer in pipe.transformer.named_modules():
        if hasattr(layer, "get_delta_weight") and "file" in getattr(layer, "lora_A", {}):
            merged[f"{n}.weight"] = layer.base_layer.weight + layer.get_delta_weight("file")
    theirs = comfy.to_comfy(merged, targets)
    for w in {p.target.weight for p in patches}:
        assert not torch.equal(ours[w], comfy.to_comfy(base, targets)[w]), w
        torch.testing.assert_close(ours[w], theirs[w], rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_norm_out_in_the_bfl_layout_is_refused_before_training(project, model):
    path, _ = project(model=model, max_steps=1)
    cfg = configure(path, train={"lora_format": "kohya"}, lora={"targets": "all_linear"})
    run_cache(cfg, progress=False)
    with pytest.raises(UserError, match=r"train.lora_format.*norm_out.linear.*lora.targets = \"all_linear\""):
        run_train(cfg, progress=False)
    assert not (project.root / "out" / "metrics.jsonl").exists()


def test_a_klein_folder_labelled_dev_is_refused_in_one_line(model, tmp_path):
    dev = tmp_path / "dev"
    shutil.copytree(model, dev)
    index = json.loads((dev / "model_index.json").read_text())
    (dev / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2Pipeline"}))
    family = get_family(ModelConfig(path=str(dev), family="flux2"))
    assert family.dev
    with pytest.raises(UserError, match=r"^model.path: .*text_encoder/config.json' is a Qwen3ForCausalLM; FLUX.2 "
                                        r"dev \(Flux2Pipeline in model_index.json\) encodes text with Mistral3") as e:
        family.load_text_encoders(**CPU32)
    assert "\n" not in str(e.value)


def test_a_text_encoder_with_too_few_layers_is_refused_in_one_line(model, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(model, short)
    config = short / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 12}))
    family = get_family(ModelConfig(path=str(short)))
    with pytest.raises(UserError, match=r"text_encoder/config.json' has 12 hidden layers.*needs at least 27") as e:
        family.load_text_encoders(**CPU32)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("tiny", ["flux2", "flux2-dev"])
def test_two_ranks_train_the_lora_one_trains(project, tiny, tiny_family_model, tmp_path):
    from test_dist import _train

    path, cfg = project(model=tiny_family_model(tiny), dtype="fp32", epochs=1)
    run_cache(cfg, progress=False)
    one = _train(0, path, tmp_path / "one")[0]
    two = _train(2, path, tmp_path / "two")
    assert one.keys() == two[0].keys()
    # a batch of 2 on one rank and two of 1 averaged by the all-reduce round differently, and AdamW's division
    # by sqrt(v) enlarges that where a gradient is near zero: equal to 1e-4 of the LoRA's own size (measured:
    # klein 5e-6, dev 1.1e-5, of its largest weight)
    scale = max(float(one[k].abs().max()) for k in one)
    assert max(float((one[k] - two[0][k]).abs().max()) for k in one) <= 1e-4 * scale
    assert all(torch.equal(two[0][k], two[1][k]) for k in one)


def test_klein_9b_is_a_planning_variant_with_its_public_widths():
    from pipeline.families.flux2.planning import PLANNING
    from pipeline.memory import meta_denoiser
    from pipeline.families import family_class
    from pipeline.tools.public_configs import encoder_params

    nine, dev = PLANNING.variants
    assert nine.label == "FLUX.2 klein 9B" and not nine.variants and dev.label == "FLUX.2 dev"
    model = meta_denoiser(family_class("flux2"), dict(nine.denoiser_config))
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (8, 24)
    assert model.x_embedder.out_features == 4096 and model.context_embedder.in_features == 3 * 4096
    assert 8.5e9 < sum(p.numel() for p in model.parameters()) < 9.5e9  # "9B"
    # its text encoder is Qwen3-8B (8.19B parameters with its untied head), not klein 4B's Qwen3-4B
    assert 8.1e9 < encoder_params("flux2", nine)["text_encoder"] < 8.3e9


# -- FLUX.2 dev: Flux2Pipeline, a Mistral 3 text encoder with BFL's system message, embedded guidance ----------

@pytest.fixture(scope="module")
def dev_model(tiny_family_model):
    return tiny_family_model("flux2-dev")


def test_dev_text_and_step_are_flux2pipelines(dev_model):
    family = get_family(ModelConfig(path=str(dev_model), max_sequence_length=32, guidance=3.5))
    assert family.name == "flux2" and family.dev and family.sampling.pipeline_class == "Flux2Pipeline"
    # the embedded guidance changes every prediction: it is in the prior key
    assert family.prediction_settings() == {"guidance": 3.5}
    pipe = Flux2Pipeline.from_pretrained(dev_model)
    ours = torch.stack([e["prompt_embeds"] for e in family.encode_captions(family.load_text_encoders(**CPU32),
                                                                            CAPTIONS)])
    theirs, _ = pipe.encode_prompt(CAPTIONS, device=torch.device("cpu"), max_sequence_length=32)
    assert torch.equal(ours, theirs) and ours.shape == (3, 32, 48)  # Mistral layers 10, 20, 30 side by side
    assert not torch.equal(ours[0], ours[2])  # the caption survives the system message's tokens
    latents, calls, real = torch.randn(2, 16, 4, 6), [], pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append((k["guidance"], real(*a, **k))) or calls[-1][1]
    pipe(prompt_embeds=ours[:2], latents=latents, height=64, width=96, num_inference_steps=1, guidance_scale=3.5,
         output_type="latent")
    assert torch.equal(calls[0][0], torch.full([2], 3.5))
    theirs = Flux2Pipeline._unpack_latents_with_ids(calls[0][1][0], Flux2Pipeline._prepare_latent_ids(latents))
    step = torch.full((2,), float(pipe.scheduler.timesteps[0]))
    assert torch.equal(family.predict(pipe.transformer, latents, step, {"prompt_embeds": ours[:2]}, **CPU32), theirs)
    other = get_family(ModelConfig(path=str(dev_model), max_sequence_length=32, guidance=1.0))
    assert not torch.equal(other.predict(pipe.transformer, latents, step, {"prompt_embeds": ours[:2]}, **CPU32),
                           theirs)


def test_dev_is_a_planning_variant_with_its_public_widths():
    from pipeline.families import family_class
    from pipeline.families.flux2.planning import PLANNING
    from pipeline.memory import meta_denoiser
    from pipeline.tools.public_configs import encoder_params, public_family

    dev = PLANNING.variants[1]
    model = meta_denoiser(family_class("flux2"), dict(dev.denoiser_config))
    assert (len(model.transformer_blocks), len(model.single_transformer_blocks)) == (8, 48)
    assert model.context_embedder.in_features == 3 * 5120 and model.time_guidance_embed.guidance_embedder
    assert 31.5e9 < sum(p.numel() for p in model.parameters()) < 32.5e9  # "32B"
    assert 23e9 < encoder_params("flux2", dev)["text_encoder"] < 24.5e9  # Mistral Small 3.1 "24B"
    assert public_family("flux2", dev).dev  # the planner's forward embeds the guidance


@pytest.mark.parametrize("tiny", ["flux2", "flux2-dev"])
def test_the_diffusers_lokr_file_loads_with_the_pipelines_load_lora_weights(tiny, tiny_family_model, tmp_path):
    from peft.tuners.lycoris_utils import LycorisLayer

    from pipeline.denoiser.lora import load_into_pipeline

    family = get_family(ModelConfig(path=str(tiny_family_model(tiny))))
    assert "lokr" in family.pipeline_adapter_types  # training says nothing about another loader
    model = family.load_denoiser(**CPU32)
    cfg = LoraConfig(rank=4, alpha=8.0, targets="attention_mlp", type="lokr")
    add_lora(model, cfg, family.target_presets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / "lokr.safetensors"
    save_lora(path, model, family, {}, cfg, "diffusers")

    def deltas(m):
        with torch.no_grad():
            return {n: layer.get_delta_weight(next(iter(layer._available_adapters)))
                    for n, layer in m.named_modules() if isinstance(layer, LycorisLayer)}

    pipe = load_full_pipeline(family, **CPU32)
    assert type(pipe).__name__ == ("Flux2Pipeline" if family.dev else "Flux2KleinPipeline")
    pipe.load_lora_weights(str(path))  # the pipeline's own loader, as users call it
    ours, theirs = deltas(model), deltas(pipe.transformer)
    assert ours and ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6)
    pipe = load_full_pipeline(family, **CPU32)
    load_into_pipeline(pipe, family, path)  # `sample` goes the same way
    assert deltas(pipe.transformer).keys() == ours.keys()


@pytest.mark.parametrize("tiny", ["flux2", "flux2-dev"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])  # BFL's file; ComfyUI's checkpoint names
def test_the_single_file_full_fine_tuning_writes_is_bfls_layout_and_loads_as_model_denoiser_file(tiny, prefix, tiny_family_model, tmp_path):
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    from pipeline.denoiser.full import single_file

    root = tiny_family_model(tiny)
    model = Flux2Transformer2DModel.from_pretrained(root, subfolder="transformer")
    reference = model.state_dict()
    bfl = single_file(model, get_family(ModelConfig(path=str(root))))  # what full fine-tuning writes
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "final_layer.adaLN_modulation.1.weight" in bfl
    single = tmp_path / "flux2.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, str(single))
    family = get_family(ModelConfig(path=str(root), denoiser_file=str(single)))
    loaded = family.load_denoiser(**CPU32).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_a_single_file_that_is_no_flux2_denoiser_is_refused_in_one_line(model, tmp_path):
    from safetensors.torch import save_file

    single = tmp_path / "other.safetensors"
    save_file({"single_stream_modulation.lin.weight": torch.zeros(2, 2), "img_in.weight": torch.zeros(2, 2)},
              str(single))
    family = get_family(ModelConfig(path=str(model), denoiser_file=str(single)))
    with pytest.raises(UserError, match=r"^model.denoiser_file: '.*other.safetensors' does not load as the "
                                        r"transformer of") as e:
        family.load_denoiser(**CPU32)
    assert "\n" not in str(e.value)


def test_the_dev_configs_read():
    from pathlib import Path

    from pipeline.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    tiny = load_config(configs / "tiny-flux2-dev.toml")
    assert (tiny.embedded.family, tiny.embedded.preset) == ("flux2", "dev")
    example = load_config(configs / "flux2-dev.example.toml")
    assert example.model.path == "black-forest-labs/FLUX.2-dev" and example.model.text_encoder_offload
