"""The Z-Image family on its tiny model: the conditioning is ZImagePipeline's encode_prompt (a list of
captions at their own lengths), the latents the inverse of its decode step, and `predict` the transformer
call of its denoising step with the pipeline's timestep and sign convention (pinned: the scheduler's step on
`predict` is the pipeline's step); a padded batch predicts what each caption alone does; step-0 prior loss
zero in bf16 and an interrupted run resumed bitwise; the ComfyUI-layout LoRA (alpha honoured) and LoKr files
give the weights diffusers' load_lora_weights gives; bad folders in one line; 2 ranks train the LoRA 1
rank trains (`slow`)."""

import json
import shutil

import pytest
import torch
from diffusers import ZImagePipeline
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

import comfyui_rules as comfy
from conftest import CPU32, configure
from pipeline.cache.stage import run_cache
from pipeline.config import LoraConfig, ModelConfig
from pipeline.denoiser.lora import add_lora, save_lora
from pipeline.errors import UserError
from pipeline.families.base import load_full_pipeline
from pipeline.families.load import get_family
from pipeline.data.plan import make_plan
from pipeline.config import load_config
from pipeline.train import step as train_step_module
from pipeline.train.stage import run_train

CAPTIONS = ["a photo of sks teapot on a blue table", "zebra xylophone!", ""]


@pytest.fixture(scope="module")
def model(tiny_family_model):
    return tiny_family_model("zimage")


@pytest.fixture(scope="module")
def family(model):
    return get_family(ModelConfig(path=str(model), max_sequence_length=32))


def test_detected_with_the_pipelines_layout(family):
    assert family.name == "zimage" and family.text_lengths_vary
    assert family.prediction_settings()["timestep"] == "(1000 - t) / 1000, output negated"
    assert family.latent_shape((64, 96)) == (4, 8, 12)
    # a fixed shift of 3: the training table is the shifted one
    timesteps, sigmas = family.timestep_table()
    assert torch.allclose(timesteps, sigmas * 1000) and float(sigmas[len(sigmas) // 2]) > 0.7


def test_text_and_latents_are_the_pipelines(family, model):
    pipe = ZImagePipeline.from_pretrained(model)
    ours = family.encode_captions(family.load_text_encoders(**CPU32), CAPTIONS)
    theirs, _ = pipe.encode_prompt(list(CAPTIONS), device=torch.device("cpu"), do_classifier_free_guidance=False,
                                   max_sequence_length=32)
    assert len({e["prompt_embeds"].shape[0] for e in ours}) == 3  # each at its own length, none padded
    assert all(torch.equal(o["prompt_embeds"], t) for o, t in zip(ours, theirs))
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = family.encode_images(family.load_vae(**CPU32), pixels)
    # the pipeline's decode step (latents / scaling_factor + shift_factor) inverts it
    vae = pipe.vae
    back = latents / vae.config.scaling_factor + vae.config.shift_factor
    torch.testing.assert_close(back, vae.encode(pixels).latent_dist.mode())


def test_predict_is_the_pipelines_denoising_step_and_its_sign_the_schedulers(family, model):
    pipe = ZImagePipeline.from_pretrained(model)
    embeds = [e["prompt_embeds"] for e in family.encode_captions(pipe, CAPTIONS[:2])]
    latents = torch.randn(2, 4, 8, 12)
    calls = []
    real = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append((a, real(*a, **k))) or calls[-1][1]
    out = pipe(prompt_embeds=embeds, latents=latents, height=64, width=96, num_inference_steps=1,
               guidance_scale=0.0, output_type="latent").images
    (args, (theirs, *_)), = calls
    t = pipe.scheduler.timesteps[0]
    assert torch.equal(args[1], (1000 - t.expand(2)) / 1000)  # the timestep the transformer was fed
    cond = family.collate([{"prompt_embeds": e} for e in embeds])
    ours = family.predict(pipe.transformer, latents, torch.full((2,), float(t)), cond, **CPU32)
    assert torch.equal(ours, -torch.stack(theirs).squeeze(2))  # the output, negated
    # the convention the pipeline samples with: its scheduler's Euler step to sigma 0 on `predict`, so
    # `predict` estimates noise - x0, the standard target (and a cached prior is such a prediction)
    sigma = float(pipe.scheduler.sigmas[0])
    torch.testing.assert_close(out, latents - sigma * ours, rtol=0, atol=1e-6)
    x0, noise = torch.randn(2, 4, 8, 12), torch.randn(2, 4, 8, 12)
    torch.testing.assert_close(family.noisy_input(x0, noise, None, torch.full((2,), sigma))
                               - sigma * family.target(x0, noise, None), x0)


def test_a_padded_batch_predicts_what_each_caption_alone_does(family):
    embeds = [torch.randn(n, 16) for n in (5, 19, 40)]
    denoiser = family.load_denoiser(**CPU32)
    noisy, timesteps = torch.randn(3, 4, 8, 8), torch.tensor([900.0, 500.0, 20.0])
    batch = family.collate([{"prompt_embeds": e} for e in embeds])
    assert batch["prompt_embeds"].shape == (3, 40, 16) and batch["prompt_attention_mask"].sum(1).tolist() == [5, 19, 40]
    with torch.no_grad():
        together = family.predict(denoiser, noisy, timesteps, batch, **CPU32)
        alone = [family.predict(denoiser, noisy[i : i + 1], timesteps[i : i + 1], family.collate([{"prompt_embeds": e}]),
                                **CPU32) for i, e in enumerate(embeds)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-6)


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


def _adapted(family, kind, preset="all_linear"):
    model = family.load_denoiser(**CPU32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(rank=4, alpha=8.0, targets=preset, type=kind)  # alpha != rank: the strength must survive
    add_lora(model, cfg, family.target_presets)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, base, cfg


def _targets(family, model_root):
    return comfy.zimage_targets(json.loads((model_root / "transformer" / "config.json").read_text()))


def _pipeline_weights(family, path, base):
    """The denoiser's weights after ZImagePipeline.load_lora_weights(path)."""
    pipe = load_full_pipeline(family, **CPU32)
    pipe.load_lora_weights(str(path), adapter_name="file")
    merged = dict(base)
    for n, layer in pipe.transformer.named_modules():
        adapters = {*getattr(layer, "lora_A", {}), *getattr(layer, "lokr_w1", {}), *getattr(layer, "lokr_w1_a", {})}
        if hasattr(layer, "get_delta_weight") and "file" in adapters:
            merged[f"{n}.weight"] = layer.base_layer.weight + layer.get_delta_weight("file")
    return merged


def test_the_comfyui_file_patched_by_comfyuis_rules_gives_diffusers_weights(family, model, tmp_path):
    denoiser, base, cfg = _adapted(family, "lora")
    targets = _targets(family, model)
    assert set(targets) >= {n for n, m in denoiser.named_modules() if hasattr(m, "lora_A")}  # every Linear has a place
    path = tmp_path / "lora.safetensors"
    save_lora(path, denoiser, family, {}, cfg, "kohya")
    written = load_file(path)
    assert all(k.startswith("diffusion_model.") for k in written)
    assert {float(v) for k, v in written.items() if k.endswith(".alpha")} == {8.0}
    patches, unloaded = comfy.load(written, comfy.key_map("zimage", targets))
    assert patches and not unloaded and {p.scale for p in patches} == {2.0}  # alpha / rank
    ours = comfy.merge(comfy.to_comfy(base, targets), patches)
    theirs = comfy.to_comfy(_pipeline_weights(family, path, base), targets)
    trained = comfy.to_comfy(_pipeline_weights(family, _diffusers_file(denoiser, family, cfg, tmp_path), base), targets)
    for w in {p.target.weight for p in patches}:
        assert not torch.equal(ours[w], comfy.to_comfy(base, targets)[w]), w
        torch.testing.assert_close(ours[w], theirs[w], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[w], trained[w], rtol=1e-5, atol=1e-6)


def _diffusers_file(denoiser, family, cfg, tmp_path):
    path = tmp_path / "diffusers.safetensors"
    save_lora(path, denoiser, family, {}, cfg, "diffusers")
    return path


@pytest.mark.parametrize("fmt", ["diffusers", "lycoris"])
def test_a_lokr_loads_in_the_pipeline_and_in_comfyui_with_the_trained_update(family, model, fmt, tmp_path):
    from peft.tuners.lycoris_utils import LycorisLayer

    assert "lokr" in family.pipeline_adapter_types
    denoiser, base, cfg = _adapted(family, "lokr")
    with torch.no_grad():
        trained = {f"{n}.weight": base[f"{n}.weight"] + m.get_delta_weight("default")
                   for n, m in denoiser.named_modules() if isinstance(m, LycorisLayer)}
    path = tmp_path / f"{fmt}.safetensors"
    save_lora(path, denoiser, family, {}, cfg, fmt)
    loaded = _pipeline_weights(family, path, base)
    assert trained
    for k, w in trained.items():
        torch.testing.assert_close(loaded[k], w, rtol=1e-5, atol=1e-6)
    if fmt == "lycoris":
        targets = _targets(family, model)
        lora = load_file(path)
        diffs, unloaded = comfy.load_lycoris(lora, comfy.key_map("zimage", targets))
        assert len(diffs) == len(trained) and not unloaded
        ours = comfy.merge_lycoris(comfy.to_comfy(base, targets), diffs)
        want = comfy.to_comfy({**base, **trained}, targets)
        for w in {d.target.weight for d in diffs}:
            torch.testing.assert_close(ours[w], want[w], rtol=1e-5, atol=1e-6)


def test_comfyuis_layout_is_what_diffusers_reads_from_a_single_file(family):
    # ComfyUI's model names, made from the diffusers weights by the rules' table, are what diffusers'
    # single-file converter turns back into the diffusers weights
    denoiser = family.load_denoiser(**CPU32)
    sd = denoiser.state_dict()
    targets = comfy.zimage_targets(dict(denoiser.config))
    reference = {f"model.{k}": v for k, v in comfy.to_comfy(sd, targets).items()}
    back = convert_z_image_transformer_checkpoint_to_diffusers(reference)
    for d in targets:
        assert torch.equal(back[f"{d}.weight"], sd[f"{d}.weight"]), d


def test_another_pipeline_and_a_one_layer_text_encoder_are_refused_in_one_line(model, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match=r"^model.path: .* holds a FluxPipeline, not a Z-Image model") as e:
        get_family(ModelConfig(path=str(other), family="zimage"))
    assert "\n" not in str(e.value)
    short = tmp_path / "short"
    shutil.copytree(model, short)
    config = short / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 1}))
    with pytest.raises(UserError, match=r"text_encoder/config.json' has 1 hidden layers.*at least 2") as e:
        get_family(ModelConfig(path=str(short))).load_text_encoders(**CPU32)
    assert "\n" not in str(e.value)


# ComfyUI's (the reference) names of the Z-Image weights that are not Linears, from diffusers' (the inverse of
# convert_z_image_transformer_checkpoint_to_diffusers's renames)
_REFERENCE = ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
              (".attention.norm_k.", ".attention.k_norm."), ("all_final_layer.2-1.", "final_layer."),
              ("all_x_embedder.2-1.", "x_embedder."))


def _reference_layout(sd, dim):
    """A diffusers Z-Image state dict in the layout of the single files users download for ComfyUI
    (Comfy-Org's z_image_turbo_bf16.safetensors): reference names, q, k and v fused in attention.qkv."""
    out = {}
    for k, v in sd.items():
        if ".attention.to_k." in k or ".attention.to_v." in k:
            continue
        if ".attention.to_q." in k:
            out[k.replace(".to_q.", ".qkv.")] = torch.cat([v, sd[k.replace(".to_q.", ".to_k.")],
                                                          sd[k.replace(".to_q.", ".to_v.")]])
            continue
        for d, r in _REFERENCE:
            k = k.replace(d, r) if k.startswith(d) or d.startswith(".") else k
        out[k] = v
    assert len(out) < len(sd) and any(".attention.qkv." in k for k in out) and "x_embedder.weight" in out
    return out


def test_a_single_file_denoiser_in_comfyuis_layout(project, model, tmp_path):
    denoiser = get_family(ModelConfig(path=str(model))).load_denoiser(**CPU32)
    reference = {k: v.clone() for k, v in denoiser.state_dict().items()}
    single = tmp_path / "z_image_bf16.safetensors"
    save_file(_reference_layout(reference, denoiser.config.dim), str(single))
    path, _ = project(model=model)
    folder_fp = make_plan(load_config(path)).denoiser_fp
    path.write_text(path.read_text().replace("[model]\n", f'[model]\ndenoiser_file = "{single}"\n', 1))
    cfg = load_config(path)
    loaded = get_family(cfg.model).load_denoiser(**CPU32).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert make_plan(cfg).denoiser_fp != folder_fp  # the file's weights key the priors


def _adapter_file(family, tmp_path, preset="attention_mlp"):
    """A random LoRA in ai-toolkit's Z-Image layout (diffusion_model.<module>, .alpha), as the Turbo training
    adapter is, and the denoiser's weights with it merged."""
    from peft.tuners.lora import LoraLayer

    denoiser, base, cfg = _adapted(family, "lora", preset=preset)
    path = tmp_path / "adapter.safetensors"
    save_lora(path, denoiser, family, {}, cfg, "kohya")
    with torch.no_grad():
        merged = {**base, **{f"{n}.weight": base[f"{n}.weight"] + m.get_delta_weight("default")
                             for n, m in denoiser.named_modules() if isinstance(m, LoraLayer)}}
    return path, base, merged


def test_a_training_adapter_is_merged_into_the_denoiser_and_keys_the_priors(project, model, tmp_path):
    path, plain = project(model=model)
    adapter, base, merged = _adapter_file(get_family(plain.model), tmp_path)
    cfg = configure(path, model={"training_adapter": str(adapter)})
    loaded = get_family(cfg.model).load_denoiser(**CPU32).state_dict()  # a plain denoiser again, no adapter left
    assert loaded.keys() == merged.keys()
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert len(changed) > 20
    for k in merged:
        torch.testing.assert_close(loaded[k], merged[k], rtol=1e-5, atol=1e-6)
    assert make_plan(cfg).denoiser_fp != make_plan(plain).denoiser_fp
    assert json.loads(cfg.portable_json())["model"]["training_adapter"] == "adapter.safetensors"  # beside the config


@pytest.mark.e2e
def test_with_a_training_adapter_only_priors_are_recomputed_and_training_starts_at_zero_prior_loss(
    project, model, tmp_path
):
    path, plain = project(model=model, dtype="fp32", max_steps=1)
    adapter, *_ = _adapter_file(get_family(plain.model), tmp_path)
    run_cache(plain, progress=False)
    cfg = configure(path, model={"training_adapter": str(adapter)})
    again = run_cache(cfg, progress=False)
    assert (again["latents_encoded"], again["texts_encoded"], again["noise_computed"]) == (0, 0, 0)
    assert again["priors_computed"] == again["prior_samples"] * cfg.cache.variants  # the merged model's own
    summary = run_train(cfg, progress=False)
    first = json.loads(open(summary["metrics"]).readline())
    assert first["n_prior"] > 0 and first["loss_prior"] <= 1e-10 * first["loss_standard"]


@pytest.mark.parametrize("keys, message", [
    ({"training_adapter": "adapter.pt"}, r"config.toml: config key 'model.training_adapter' must name a .safetensors file"),
    ({"training_adapter": "ADAPTER", "quantize": "int8"},
     r"config.toml: config keys 'model.training_adapter' and 'model.quantize' exclude each other"),
])
def test_bad_training_adapter_keys_are_one_line(project, model, tmp_path, keys, message):
    path, _ = project(model=model)
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    keys = {k: str(tmp_path / "adapter.safetensors") if v == "ADAPTER" else v for k, v in keys.items()}
    with pytest.raises(UserError, match=message) as e:
        configure(path, model=keys)
    assert "\n" not in str(e.value)


def test_a_training_adapter_for_another_model_is_refused_in_one_line(family, tmp_path):
    adapter, *_ = _adapter_file(family, tmp_path, preset="attention")
    lora = load_file(adapter)
    save_file({k.replace(".attention.", ".attn."): v for k, v in lora.items()}, str(adapter))
    other = get_family(ModelConfig(path=str(family.root), training_adapter=str(adapter)))
    with pytest.raises(UserError, match=r"^model.training_adapter: .* (is not a LoRA|names \d+ module)") as e:
        other.load_denoiser(**CPU32)
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
