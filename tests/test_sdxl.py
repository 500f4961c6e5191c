"""The SDXL family on a tiny random-weight SDXL pipeline: its conditioning, UNet call, noise, targets and
loss weights are diffusers' own; cache and train run end to end; the LoRA loads in StableDiffusionXLPipeline
in diffusers' format and in kohya's; a single-file UNet (original SDXL layout) loads via from_single_file."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FluxTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from pipeline import tiny
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.config import LoraConfig, ModelConfig, TrainConfig, check_paths, load_config
from pipeline.data.images import prepare_image
from pipeline.errors import UserError
from pipeline.families import family_class
from pipeline.families.load import detect_family
from pipeline.families.sdxl.adapter import SDXLFamily
from pipeline.families.sdxl.kohya import ldm_unet_name, peft_names
from pipeline.families.sdxl.tiny import build as build_tiny_sdxl
from pipeline.denoiser.lora import add_lora, diffusers_weights, save_lora
from pipeline.data.plan import make_plan
from pipeline.train.stage import train_lora

from conftest import CPU32

REPO = Path(__file__).resolve().parents[1]
CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl") / "model"
    build_tiny_sdxl(root)
    return root


def family(root, **model) -> SDXLFamily:
    return SDXLFamily(root, ModelConfig(path=str(root), **model))


def cond_for(fam, captions, original_size, crop_top_left):
    enc = fam.encode_captions(fam.load_text_encoders(CPU, F32), captions)
    cond = {k: torch.stack([e[k] for e in enc]) for k in enc[0]}
    n = len(captions)
    cond["original_size"] = torch.tensor([original_size] * n, dtype=F32)
    cond["crop_top_left"] = torch.tensor([crop_top_left] * n, dtype=F32)
    return cond


class WarningsOf:
    """Collects what diffusers logs at warning level or above (missing or unexpected LoRA keys...), except
    its note that a UNet-only LoRA has nothing for the text encoders."""

    def __enter__(self):
        self.records, self.logger = [], logging.getLogger("diffusers")
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda r: None if r.getMessage().startswith("No LoRA keys associated to CLIPText") \
            else self.records.append(r)
        self.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def test_embedded_build_is_deterministic_and_detected(sdxl_root, tmp_path):
    tiny.ensure_embedded(tmp_path / "model", [], family="sdxl")  # what [embedded] family = "sdxl" runs
    files = sorted(p.relative_to(sdxl_root) for p in sdxl_root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "model") for p in (tmp_path / "model").rglob("*") if p.is_file())
    assert all((sdxl_root / f).read_bytes() == (tmp_path / "model" / f).read_bytes() for f in files)
    unet = UNet2DConditionModel.from_pretrained(sdxl_root, subfolder="unet")
    assert sum(p.numel() for p in unet.parameters()) < 500_000
    assert detect_family(sdxl_root) == "sdxl" and family_class("sdxl") is SDXLFamily
    fam = family(sdxl_root)
    assert fam.default_target_modules == fam.target_presets["attention"]
    for name in ("tiny-sdxl.toml", "sdxl.example.toml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.data.resolution % fam.pixel_multiple == 0
    assert load_config(REPO / "configs" / "tiny-sdxl.toml").embedded.family == "sdxl"


def test_conditioning_equals_encode_prompt(sdxl_root):
    captions = ["a photo of sks teapot", "", "a red teapot on a wooden table"]  # "": caption dropout
    fam = family(sdxl_root)
    ours = fam.encode_captions(fam.load_text_encoders(CPU, F32), captions)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_root, unet=None, vae=None)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert negative is None and negative_pooled is None
    for i, entry in enumerate(ours):
        assert entry["prompt_embeds"].shape == (77, 64) and entry["pooled_prompt_embeds"].shape == (32,)
        assert torch.equal(entry["prompt_embeds"], embeds[i]) and torch.equal(entry["pooled_prompt_embeds"], pooled[i])
    assert ours[1]["prompt_embeds"].abs().sum() > 0  # the empty caption is encoded, not zeroed


def test_fp16_vae_encodes_in_fp32(sdxl_root, capsys):
    fam = family(sdxl_root)
    assert fam.load_vae(CPU, torch.float16).dtype == F32  # force_upcast, as the pipeline and LoRA script
    assert "model.encoder_dtype = fp16" in capsys.readouterr().err
    assert fam.load_vae(CPU, torch.bfloat16).dtype == torch.bfloat16


def test_predict_equals_the_unet_call_inside_the_pipeline(sdxl_root):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_root)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs, out[0])),
                                           with_kwargs=True)
    prompt, original, crop = "a photo of sks teapot", (90, 200), (7, 12)
    pipe(prompt, height=64, width=128, num_inference_steps=2, guidance_scale=1.0, original_size=original,
         crops_coords_top_left=crop, output_type="latent", generator=torch.Generator().manual_seed(0))
    hook.remove()
    (sample, t), kwargs, expected = calls[1]  # the second step: a timestep below the first
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[90, 200, 7, 12, 64, 128]]
    fam = family(sdxl_root)
    cond = cond_for(fam, [prompt], original, crop)
    with torch.no_grad():
        ours = fam.predict(pipe.unet, sample, t.reshape(1).float(), cond, **CPU32)
        moved = {**cond, "crop_top_left": torch.zeros(1, 2)}
        other_crop = fam.predict(pipe.unet, sample, t.reshape(1).float(), moved, **CPU32)
    assert ours.shape == (1, 4, 8, 16)
    assert torch.equal(ours, expected)
    assert not torch.allclose(other_crop, expected)  # the geometry reaches the UNet


def test_noise_targets_and_v_prediction(sdxl_root, tmp_path):
    vroot = tmp_path / "v-model"
    (vroot / "scheduler").mkdir(parents=True)
    config = json.loads((sdxl_root / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config = vroot / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    eps, v = family(sdxl_root), family(vroot)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10.0, 500.0, 999.0])
    ac = DDPMScheduler.from_pretrained(sdxl_root, subfolder="scheduler").alphas_cumprod[t.long()].reshape(3, 1, 1, 1)
    assert torch.allclose(eps.noisy_input(latents, noise, t, None), ac.sqrt() * latents + (1 - ac).sqrt() * noise,
                          atol=1e-6)
    assert torch.equal(eps.target(latents, noise, t), noise)
    assert torch.allclose(v.target(latents, noise, t), ac.sqrt() * noise - (1 - ac).sqrt() * latents, atol=1e-6)
    assert eps.timestep_spec()["prediction_type"] == "epsilon"
    assert v.timestep_spec()["prediction_type"] == "v_prediction"
    timesteps, sigmas = eps.timestep_table()
    assert torch.equal(timesteps, torch.arange(1000).float())
    assert torch.allclose(sigmas[t.long()] ** -2, (ac / (1 - ac)).flatten(), rtol=1e-4)  # 1/sigma^2 is the SNR
    assert eps.default_timestep_sampling == "uniform" and eps.prediction_settings() == {}
    scheduler_config.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        family(vroot).timestep_table()


def test_min_snr_weights_are_the_formula(sdxl_root, tmp_path):
    vroot = tmp_path / "v-model"
    shutil.copytree(sdxl_root / "scheduler", vroot / "scheduler")
    path = vroot / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    t = torch.tensor([0.0, 20.0, 100.0, 500.0, 999.0])
    ac = DDPMScheduler.from_pretrained(sdxl_root, subfolder="scheduler").alphas_cumprod[t.long()].double()
    snr = ac / (1 - ac)
    clipped = torch.minimum(snr, torch.tensor(3.0))
    train = TrainConfig(loss_weighting="min_snr", min_snr_gamma=3.0)
    eps, v = family(sdxl_root), family(vroot)
    assert torch.allclose(eps.loss_weights(train, t, None).double(), clipped / snr, rtol=1e-5)
    assert torch.allclose(v.loss_weights(train, t, None).double(), clipped / (snr + 1), rtol=1e-5)
    assert eps.loss_weights(train, t, None)[-1] == 1.0 and eps.loss_weights(train, t, None)[0] < 0.01
    assert torch.equal(eps.loss_weights(TrainConfig(loss_weighting="none"), t, None), torch.ones(5))
    with pytest.raises(UserError, match="train.loss_weighting"):
        eps.loss_weights(TrainConfig(loss_weighting="cosmap"), t, None)


def load_kohya(root, state_dict, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(state_dict, str(path))
    pipe = StableDiffusionXLPipeline.from_pretrained(root)
    with WarningsOf() as warnings:
        pipe.load_lora_weights(str(path))
    assert not warnings, [w.getMessage() for w in warnings]
    return pipe


@pytest.mark.e2e
def test_cache_then_train_end_to_end(project, sdxl_root, tmp_path):
    _, cfg = project(model=sdxl_root, timestep_sampling="uniform", dtype="fp32", cache_batch=1, batch=8, max_steps=3,
                     lr=1e-2, alpha=8.0)
    summary = run_cache(cfg, progress=False)
    assert summary["priors_computed"] == 16 and summary["images_per_bucket"] == {"64x64": 16}

    # one prior, recomputed with diffusers alone from the stored seed and timestep
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    sample = next(s for s in plan.samples if s.prior and s.path.name == "001.png")  # 96x72: cropped at the sides
    variant = 1
    prior = store.read("prior/fp32", plan.prior_key(sample, variant))[0]["prediction"]
    noise_entry = store.read("noise", sample.noise_keys[variant])[0]
    t = noise_entry["timestep"].reshape(1)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_root)
    pixels, geometry = prepare_image(sample.path, sample.bucket)
    assert geometry == {"original_size": (72, 96), "crop_top_left": (0, 10)}
    with torch.no_grad():
        z = pipe.vae.encode(pixels[None]).latent_dist.mode() * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(sample.captions[variant], do_classifier_free_guidance=False)
        noise = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(int(noise_entry["seed"])))[None]
        x_t = DDPMScheduler.from_pretrained(sdxl_root, subfolder="scheduler").add_noise(z, noise, t.long())
        time_ids = torch.tensor([[72, 96, 0, 10, 64, 64]], dtype=F32)
        fresh = pipe.unet(x_t, t, encoder_hidden_states=embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample[0]
    assert torch.equal(prior, fresh)
    store.close()

    trained, result = train_lora(cfg, progress=False)
    first = json.loads(open(result["metrics"]).readline())
    assert first["n_prior"] > 0 and first["n_standard"] > 0
    assert first["loss_standard"] > 0.1 and first["loss_prior"] <= 1e-10 * first["loss_standard"]

    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"prompt_embeds": torch.randn(2, 77, 64, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
            "original_size": torch.tensor([[64.0, 64.0], [80.0, 120.0]]),
            "crop_top_left": torch.tensor([[0.0, 0.0], [8.0, 4.0]])}
    timesteps = torch.tensor([300.0, 800.0])
    fam = plan.family
    trained.eval()
    with torch.no_grad():
        ours = fam.predict(trained, noisy, timesteps, cond, **CPU32)
        trained.disable_adapters()
        base = fam.predict(trained, noisy, timesteps, cond, **CPU32)
        trained.enable_adapters()
    assert not torch.allclose(ours, base, atol=1e-4)  # training moved the model

    # the diffusers-format file: loads with nothing missing or unexpected, predicts exactly the same
    with WarningsOf() as warnings:
        pipe.load_lora_weights(result["lora"], adapter_name="trained")
    assert not warnings, [w.getMessage() for w in warnings]
    file_weights = load_file(result["lora"])
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="trained")
    # under the attention-processor names that ComfyUI maps too; alpha/rank = 2 folded into lora_B
    assert {f"unet.{k}" for k in loaded} == set(peft_names(file_weights, "unet"))
    assert not any(".lora_A." in k or ".lora_B." in k for k in file_weights)
    with torch.no_grad():
        assert torch.equal(fam.predict(pipe.unet, noisy, timesteps, cond, **CPU32), ours)

    # kohya's layout, with original SDXL module names: diffusers' kohya converter loads it
    kohya = fam.lora_layout.to_kohya(diffusers_weights(trained, "unet"), alpha=8.0)
    assert len(kohya) == 3 * len(file_weights) // 2
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in kohya)
    with torch.no_grad():
        from_kohya = fam.predict(load_kohya(sdxl_root, kohya, tmp_path).unet, noisy, timesteps, cond, **CPU32)
    assert torch.allclose(from_kohya, ours, atol=1e-5)


def test_kohya_export_of_every_linear_layer(sdxl_root, tmp_path):
    fam = family(sdxl_root)
    unet = fam.load_denoiser(CPU, F32)
    linear = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    lora_cfg = LoraConfig(rank=4, alpha=2.0, targets="all_linear")
    add_lora(unet, lora_cfg, fam.target_presets)
    assert {n for n, m in unet.named_modules() if hasattr(m, "lora_A")} == linear  # all_linear is every Linear
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero; give every layer an effect
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_lora(tmp_path / "lora.safetensors", unet, fam, {}, lora_cfg)
    kohya = fam.lora_layout.to_kohya(diffusers_weights(unet, "unet"), alpha=2.0)
    assert "lora_unet_time_embed_0.alpha" in kohya and "lora_unet_label_emb_0_2.lora_up.weight" in kohya
    assert "lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight" in kohya  # first level's resnet
    pipe = load_kohya(sdxl_root, kohya, tmp_path)
    cond = cond_for(fam, ["a photo of sks teapot"], (64, 64), (0, 0))
    noisy, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400.0])
    unet.eval()
    with torch.no_grad():
        expected = fam.predict(unet, noisy, t, cond, **CPU32)
        assert torch.allclose(fam.predict(pipe.unet, noisy, t, cond, **CPU32), expected, atol=1e-5)
        unet.disable_adapters()
        assert not torch.allclose(fam.predict(unet, noisy, t, cond, **CPU32), expected, atol=1e-3)
    with pytest.raises(UserError, match="no kohya equivalent"):
        fam.lora_layout.to_kohya({"unet.conv_in.lora_magnitude_vector": torch.ones(3)}, alpha=1.0)


def test_single_file_unet_in_the_original_layout(project, sdxl_root, tmp_path):
    model = tmp_path / "model"  # a copy whose unet folder can be changed
    shutil.copytree(sdxl_root, model)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    # cloned: the loaded tensors map the weights file, which this test overwrites
    reference = {k: v.clone() for k, v in unet.state_dict().items()}
    # original SDXL layout (model.diffusion_model.input_blocks...), which from_single_file converts back
    # with diffusers' convert_ldm_unet_checkpoint; and diffusers' own layout, which it takes as it is
    ldm = {f"model.diffusion_model.{ldm_unet_name(k, dict(unet.config))}": v for k, v in reference.items()}
    assert len(ldm) == len(reference) and not any("down_blocks" in k or "resnets" in k for k in ldm)
    path, _ = project(model=model)
    template = path.read_text()
    save_file(ldm, str(path.parent / "original-layout.safetensors"))
    save_file(reference, str(path.parent / "diffusers-layout.safetensors"))
    fps = {"folder": make_plan(load_config(path)).denoiser_fp}
    for name in ("original-layout.safetensors", "diffusers-layout.safetensors"):
        path.write_text(template.replace("[model]\n", f'[model]\ndenoiser_file = "{name}"\n', 1))
        cfg = load_config(path)  # relative to the config file
        assert cfg.model.denoiser_file == str(path.parent / name)
        assert json.loads(cfg.portable_json())["model"]["denoiser_file"] == name
        loaded = family_class("sdxl")(model, cfg.model).load_denoiser(CPU, F32).state_dict()
        assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
        fps[name] = make_plan(cfg).denoiser_fp
    assert len(set(fps.values())) == 3
    # the fingerprint is the file's (and the folder's config's), not the folder's weights'
    next((model / "unet").glob("*.safetensors")).write_bytes(b"not the weights any more")
    assert make_plan(cfg).denoiser_fp == fps["diffusers-layout.safetensors"]
    save_file({**reference, "conv_in.bias": reference["conv_in.bias"] + 1}, cfg.model.denoiser_file)
    assert make_plan(cfg).denoiser_fp != fps["diffusers-layout.safetensors"]
    Path(cfg.model.denoiser_file).unlink()
    with pytest.raises(UserError, match="model.denoiser_file: .* does not exist"):
        check_paths(cfg)
    path.write_text(template.replace("[model]\n", '[model]\ndenoiser_file = "model.ckpt"\n', 1))
    with pytest.raises(UserError, match="model.denoiser_file"):
        load_config(path)


# SDXL base 1.0's unet/config.json, the keys that shape the model
SDXL_UNET = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 2816, "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True, "sample_size": 128,
}


def test_original_names_at_full_sdxl_size():
    """The real SDXL layout (2 layers per block, 3 levels, 10-block transformers), without weights:
    diffusers' own ldm converter maps every original name back to the parameter it came from."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
    config = dict(unet.config)
    names = {k: f"model.diffusion_model.{ldm_unet_name(k, config)}" for k in unet.state_dict()}
    back = convert_ldm_unet_checkpoint({ldm: torch.tensor([i]) for i, ldm in enumerate(names.values())}, config)
    assert len(names) == len(back) == 1680
    assert {k: int(v) for k, v in back.items()} == {k: i for i, k in enumerate(names)}
    for known in ("input_blocks.3.0.op.weight", "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
                  "middle_block.1.proj_in.weight", "output_blocks.2.2.conv.weight",
                  "output_blocks.8.0.skip_connection.weight", "label_emb.0.0.weight", "time_embed.2.bias", "out.2.weight"):
        assert f"model.diffusion_model.{known}" in names.values()


def test_flux_single_file_denoiser(tiny_assets, tmp_path):
    root = tiny_assets / "model"
    reference = FluxTransformer2DModel.from_pretrained(root, subfolder="transformer").state_dict()
    single = tmp_path / "flux-transformer.safetensors"  # diffusers layout: from_single_file takes it as it is
    save_file(reference, str(single))
    fam = family_class("flux")(root, ModelConfig(path=str(root), denoiser_file=str(single)))
    loaded = fam.load_denoiser(CPU, F32).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
