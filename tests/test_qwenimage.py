"""The Qwen-Image family on its tiny model: the conditioning is QwenImagePipeline's encode_prompt (template
tokens dropped, each caption at its own length; a batch padded to max_sequence_length is the pipeline's
embeddings and mask), the
latents its img2img _encode_vae_image (latents_mean/latents_std; its decode step inverts them), `predict` the
transformer call of one of its denoising steps (packing, img_shapes, the text mask) bit for bit; step-0
prior loss zero in bf16 with captions of several lengths and an interrupted run resumed bitwise; the
ComfyUI file with alpha; a single-file transformer; bad input in one line; 2 ranks train what 1 trains."""

import json
import shutil

import pytest
import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file

from conftest import CPU32, configure
from pipeline.cache.stage import run_cache
from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.families.load import get_family
from pipeline.train import step as train_step_module
from pipeline.train.stage import run_train

CAPTIONS = ["a photo of sks teapot on a blue table", "zebra xylophone!", ""]


@pytest.fixture(scope="module")
def model(tiny_family_model):
    return tiny_family_model("qwenimage")


@pytest.fixture(scope="module")
def family(model):
    return get_family(ModelConfig(path=str(model), max_sequence_length=32))


def test_detected_with_the_pipelines_layout(family, model):
    assert family.name == "qwenimage" and family.text_lengths_vary
    assert family.latent_shape((64, 96)) == (4, 8, 12)
    assert "text_padding" in family.prediction_settings()
    # the scheduler shifts dynamically at inference: the training table is unshifted
    timesteps, sigmas = family.timestep_table()
    assert torch.allclose(timesteps, sigmas * 1000) and abs(float(sigmas[len(sigmas) // 2]) - 0.5) < 0.01


def test_text_is_encode_prompts_at_each_captions_length(family, model):
    pipe = QwenImagePipeline.from_pretrained(model)
    ours = family.encode_captions(family.load_text_encoders(**CPU32), CAPTIONS)
    for caption, entry in zip(CAPTIONS, ours):
        theirs, mask = pipe.encode_prompt([caption], device=torch.device("cpu"), max_sequence_length=32)
        assert mask is None and torch.equal(entry["prompt_embeds"], theirs[0])
    # the template's 34 tokens are dropped; its closing tokens (<|im_end|>, the assistant's turn) stay
    words = len(pipe.tokenizer(CAPTIONS[0]).input_ids)
    assert ours[0]["prompt_embeds"].shape[0] == words + 5 and ours[2]["prompt_embeds"].shape[0] == 5
    # collate pads to max_sequence_length: the pipeline's padded batch, its mask, zeros after each caption
    batch = family.collate(ours)
    theirs, mask = pipe.encode_prompt(CAPTIONS, device=torch.device("cpu"), max_sequence_length=32)
    n = theirs.shape[1]
    assert batch["prompt_embeds"].shape == (3, 32, theirs.shape[2]) and not batch["prompt_embeds"][:, n:].any()
    assert torch.equal(batch["prompt_embeds_mask"][:, :n], mask) and not batch["prompt_embeds_mask"][:, n:].any()
    torch.testing.assert_close(batch["prompt_embeds"][:, :n], theirs, rtol=1e-5, atol=1e-6)
    # the cut at max_sequence_length is encode_prompt's
    short = get_family(ModelConfig(path=str(model), max_sequence_length=4))
    assert short.encode_captions(pipe, CAPTIONS[:1])[0]["prompt_embeds"].shape[0] == 4


def test_latents_are_the_pipelines(family, model, monkeypatch):
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = family.encode_images(family.load_vae(**CPU32), pixels)
    assert latents.shape == (2, *family.latent_shape((64, 96)))
    # QwenImageImg2ImgPipeline._encode_vae_image, with the distribution's mode where it samples
    pipe = QwenImageImg2ImgPipeline.from_pretrained(model)
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    theirs = pipe._encode_vae_image(pixels[:, :, None], generator=None)
    assert torch.equal(latents, theirs[:, :, 0])
    # the text-to-image pipeline's decode step (its lines before vae.decode) inverts it
    c = pipe.vae.config
    std_inv = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1)
    back = latents / std_inv + torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1)
    torch.testing.assert_close(back, pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0])


def test_predict_is_the_pipelines_denoising_step(family, model):
    pipe = QwenImagePipeline.from_pretrained(model)
    cond = family.collate(family.encode_captions(pipe, CAPTIONS[:2]))  # padded, with its mask
    latents = torch.randn(2, 4, 8, 12)
    calls = []
    real = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append((k, real(*a, **k))) or calls[-1][1]
    packed = QwenImagePipeline._pack_latents(latents, 2, 4, 8, 12)
    pipe(prompt_embeds=cond["prompt_embeds"], prompt_embeds_mask=cond["prompt_embeds_mask"], latents=packed,
         height=64, width=96, num_inference_steps=2, true_cfg_scale=1.0, output_type="latent")
    kwargs, out = calls[0]  # the first step (two: one step stretched to the terminal sigma divides by zero)
    assert kwargs["img_shapes"] == [[(1, 4, 6)]] * 2 and kwargs["encoder_hidden_states_mask"] is not None
    theirs = QwenImagePipeline._unpack_latents(out[0], 64, 96, 8)[:, :, 0]
    ours = family.predict(pipe.transformer, latents, torch.full((2,), float(pipe.scheduler.timesteps[0])), cond,
                          **CPU32)
    assert torch.equal(ours, theirs)


@pytest.mark.e2e
def test_step_zero_prior_loss_in_bf16_and_resume_is_bitwise(project, model, monkeypatch):
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


def test_the_comfyui_file_holds_alpha_and_diffusers_reads_it(family, tmp_path):
    from pipeline.config import LoraConfig
    from pipeline.denoiser.lora import add_lora, save_lora

    model = family.load_denoiser(**CPU32)
    cfg = LoraConfig(rank=4, alpha=8.0, targets="all_linear")
    add_lora(model, cfg, family.target_presets)
    path = tmp_path / "lora.safetensors"
    save_lora(path, model, family, {}, cfg, "kohya")
    written = load_file(path)
    alphas = [k for k in written if k.endswith(".alpha")]
    assert all(k.startswith("diffusion_model.") for k in written) and alphas
    assert all(float(written[k]) == 8.0 for k in alphas) and 3 * len(alphas) == len(written)
    # every Linear of the transformer has its module in ComfyUI's layout, but the last block's text stream
    linears = {n for n, m in QwenImageTransformer2DModel.from_pretrained(family.root, subfolder="transformer")
               .named_modules() if isinstance(m, torch.nn.Linear)}
    dead = {f"transformer_blocks.1.{m}" for m in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj",
                                                  "txt_mlp.net.2")}
    assert {k.removeprefix("diffusion_model.").removesuffix(".alpha") for k in alphas} == linears - dead
    # diffusers' converter reads the scale from alpha: every pair placed, nothing left over
    pairs = QwenImagePipeline.lora_state_dict(str(path))
    assert len(pairs) == 2 * len(alphas) and all(k.startswith("transformer.") for k in pairs)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_both_files_load_in_the_pipeline_every_pair_placed_at_the_trained_strength(family, fmt, tmp_path):
    from pipeline.config import LoraConfig
    from pipeline.denoiser.lora import add_lora, save_lora
    from pipeline.families.base import load_full_pipeline

    model = family.load_denoiser(**CPU32)
    cfg = LoraConfig(rank=4, alpha=8.0, targets="all_linear")  # alpha != rank: the strength must survive
    add_lora(model, cfg, family.target_presets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = tmp_path / "lora.safetensors"
    save_lora(path, model, family, {}, cfg, fmt)
    pipe = load_full_pipeline(family, **CPU32)
    pipe.load_lora_weights(str(path), adapter_name="file")
    ours = {n: m.get_delta_weight("default") for n, m in model.named_modules() if hasattr(m, "get_delta_weight")}
    theirs = {n: m.get_delta_weight("file") for n, m in pipe.transformer.named_modules()
              if hasattr(m, "get_delta_weight") and "file" in getattr(m, "lora_A", {})}
    assert theirs.keys() == ours.keys() and len(ours) == 30  # every pair placed (14 + 10 in the blocks, 6 outside)
    for n in ours:
        torch.testing.assert_close(theirs[n], ours[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "all_linear"])
def test_every_layer_of_each_preset_gets_a_gradient(family, preset):
    # the last block's text stream makes nothing the output depends on: the presets leave it out, so that
    # no LoRA layer waits for a gradient that never comes (DDP would wait forever)
    from pipeline.config import LoraConfig
    from pipeline.denoiser.lora import add_lora
    from pipeline.processes import refuse_missing_gradients

    model = family.load_denoiser(**CPU32)
    add_lora(model, LoraConfig(rank=4, targets=preset), family.target_presets)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B starts at zero, and A's gradient with it
            torch.nn.init.normal_(p.data)
    cond = family.collate(family.encode_captions(family.load_text_encoders(**CPU32), CAPTIONS[:2]))
    family.predict(model, torch.randn(2, 4, 8, 8), torch.tensor([500.0, 200.0]), cond, **CPU32).square().mean().backward()
    refuse_missing_gradients(model, "lora.targets")
    assert any(".add_q_proj." in n for n, _ in model.named_parameters())


def test_a_single_file_transformer_loads(family, model, tmp_path):
    reference = QwenImageTransformer2DModel.from_pretrained(model, subfolder="transformer").state_dict()
    single = tmp_path / "qwen_image.safetensors"  # ComfyUI's split file: diffusers' names, no prefix
    save_file(reference, str(single))
    fam = get_family(ModelConfig(path=str(model), denoiser_file=str(single)))
    loaded = fam.load_denoiser(**CPU32).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_bad_input_is_one_line(model, tmp_path):
    with pytest.raises(UserError, match=r"^config key 'model.max_sequence_length' must be at most 1024") as e:
        get_family(ModelConfig(path=str(model), max_sequence_length=2048))
    assert "\n" not in str(e.value)
    other = tmp_path / "other"
    shutil.copytree(model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match=r"^model.path: .* holds a FluxPipeline, not a Qwen-Image model") as e:
        get_family(ModelConfig(path=str(other), family="qwenimage"))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_two_ranks_train_the_lora_one_trains(project, model, tmp_path):
    from test_dist import _train

    path, cfg = project(model=model, dtype="fp32", epochs=1)
    run_cache(cfg, progress=False)
    one = _train(0, path, tmp_path / "one")[0]
    two = _train(2, path, tmp_path / "two")
    assert one.keys() == two[0].keys()
    assert max(float((one[k] - two[0][k]).abs().max()) for k in one) <= 1e-6
    assert all(torch.equal(two[0][k], two[1][k]) for k in one)


def test_the_public_configs_give_the_published_sizes():
    from pipeline.families import family_class
    from pipeline.memory import meta_denoiser, vae_working
    from pipeline.tools.public_configs import encoder_params

    planning = family_class("qwenimage").planning
    model = meta_denoiser(family_class("qwenimage"), dict(planning.denoiser_config))
    assert len(model.transformer_blocks) == 60 and 20.3e9 < sum(p.numel() for p in model.parameters()) < 20.5e9
    counts = encoder_params("qwenimage")
    # Qwen2.5-VL-7B-Instruct with its vision tower (8.29B); the VAE is AutoencoderKLQwenImage's 127M, not an
    # AutoencoderKL's: the planner builds the class the VAE config names
    assert 8.2e9 < counts["text_encoder"] < 8.4e9 and 126e6 < counts["vae"] < 128e6
    assert vae_working(dict(planning.vae_config), 1, 64, torch.bfloat16) > 0  # a video VAE encodes one frame
