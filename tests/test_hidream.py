"""The HiDream-I1 family on the tiny HiDream model: its conditioning is the pipeline's encode_prompt, its
prediction is the transformer call the pipeline makes in a denoising step, and cache + train + LoRA
export work end to end as for Flux (diffusers format and kohya/ComfyUI format)."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, HiDreamImagePipeline, HiDreamImageTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_hidream_lora_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from pipeline import tiny
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.config import LoraConfig, ModelConfig
from pipeline.data.images import load_image
from pipeline.errors import UserError
from pipeline.families.load import get_family
from pipeline.families.hidream.tiny import build as build_tiny_hidream
from pipeline.denoiser.lora import add_lora, diffusers_weights
from pipeline.data.plan import make_plan
from pipeline.train.stage import run_train, train_lora

from conftest import CPU32

CAPTIONS = ["a photo of sks teapot on a blue table", "zebra xylophone!", ""]  # known words, unknown words, empty


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_hidream") / "model"
    build_tiny_hidream(root)
    return root


@pytest.fixture(scope="module")
def family(model):
    return get_family(ModelConfig(path=str(model), max_sequence_length=32))


def _stack(entries):
    return {k: torch.stack([e[k] for e in entries]) for k in entries[0]}


def test_registered_and_detected(family, model):
    assert family.name == "hidream" and family.root == model
    assert family.default_target_modules == family.target_presets["attention"]
    assert set(family.target_presets) == {"attention", "attention_mlp", "all_linear"}
    # the fixed shift of the model's scheduler shapes the training table (shift 3: skewed toward noise)
    timesteps, sigmas = family.timestep_table()
    assert family.timestep_spec() == {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    assert torch.allclose(timesteps, sigmas * 1000) and float(sigmas[len(sigmas) // 2]) > 0.7


def test_build_is_deterministic(model, tmp_path):
    tiny.ensure_embedded(tmp_path / "again", [], family="hidream")  # [embedded] family = "hidream" builds it
    files = sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".safetensors"]) == 6  # transformer, VAE, four text encoders
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert all((model / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)


def test_llama_beside_the_hub_layout(family, model, tmp_path):
    """HiDream's hub folders list no text_encoder_4 in model_index.json: a Llama downloaded into
    text_encoder_4/ (its tokenizer files alongside, as the Llama repository has them) is loaded from there."""
    root = tmp_path / "hub-layout"
    shutil.copytree(model, root)
    index = json.loads((root / "model_index.json").read_text())
    index.update(text_encoder_4=[None, None], tokenizer_4=[None, None])
    (root / "model_index.json").write_text(json.dumps(index))
    for f in (root / "tokenizer_4").iterdir():
        f.rename(root / "text_encoder_4" / f.name)
    (root / "tokenizer_4").rmdir()
    hub = get_family(ModelConfig(path=str(root), max_sequence_length=32))
    cpu = torch.device("cpu")
    ours = hub.encode_captions(hub.load_text_encoders(cpu, torch.float32), CAPTIONS)
    ref = family.encode_captions(family.load_text_encoders(cpu, torch.float32), CAPTIONS)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ours, ref) for k in a)
    shutil.rmtree(root / "text_encoder_4")
    with pytest.raises(UserError, match="no text_encoder_4.*Llama-3.1-8B-Instruct"):
        hub.load_text_encoders(cpu, torch.float32)


def _lora_gradients(family, **targets):
    """Adapter name -> whether its lora_B got a gradient from one training-mode forward and backward."""
    m = family.load_denoiser(torch.device("cpu"), torch.float32)
    add_lora(m, LoraConfig(rank=2, alpha=2.0, **targets), family.target_presets)
    m.train()
    g = torch.Generator().manual_seed(0)
    cond = {"prompt_embeds_t5": torch.randn(2, 8, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
            "prompt_embeds_llama3": torch.randn(2, 2, 8, 32, generator=g)}
    loss = family.predict(m, torch.randn(2, 4, 6, 10, generator=g), torch.tensor([300.0, 700.0]), cond, **CPU32).square().mean()
    if loss.requires_grad:  # not so when no adapter is on the gradient's path at all
        loss.backward()
    unwrapped = {n for n, x in m.named_modules() if type(x) is torch.nn.Linear and ".lora_" not in n
                 and not n.endswith(".base_layer")}
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0)
            for n, p in m.named_parameters() if "lora_B" in n}, unwrapped


def test_target_presets_wrap_what_trains(family):
    for name in family.target_presets:
        grads, unwrapped = _lora_gradients(family, targets=name)
        assert grads and all(grads.values()), name  # every adapter of every preset learns
    # all_linear leaves out exactly the routed experts: the inference MoE path runs them without gradient
    assert unwrapped and all(".ff_i.experts." in n for n in unwrapped)
    grads, _ = _lora_gradients(family, target_modules=["experts.0.w1"])
    assert grads and not any(grads.values())


def test_conditioning_is_the_pipelines_encode_prompt(family, model):
    ours = family.encode_captions(family.load_text_encoders(torch.device("cpu"), torch.float32), CAPTIONS)
    pipe = HiDreamImagePipeline.from_pretrained(model, transformer=None, vae=None)
    with torch.no_grad():  # as the pipeline's __call__
        t5, _, llama, _, pooled, _ = pipe.encode_prompt(CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=32)
    batched = _stack(ours)
    assert torch.equal(batched["prompt_embeds_t5"], t5)
    assert torch.equal(batched["prompt_embeds_llama3"].transpose(0, 1), llama)  # every Llama layer, as returned
    assert torch.equal(batched["pooled_prompt_embeds"], pooled)
    assert llama.shape[0] == pipe.text_encoder_4.config.num_hidden_layers and pooled.shape[1] == 32
    assert all(v.dtype == torch.float32 for e in ours for v in e.values())


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])  # square, and the padded/masked non-square path
def test_predict_is_the_pipelines_transformer_call(family, model, size):
    pipe = HiDreamImagePipeline.from_pretrained(model)
    pipe.default_sample_size = 8  # the pipeline rescales every request to this many latent pixels squared
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, out: calls.append((kw, out[0])), with_kwargs=True)
    pipe(prompt=CAPTIONS[:2], height=size[0], width=size[1], num_inference_steps=2, guidance_scale=1.0,
         max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    hook.remove()
    cond = _stack(family.encode_captions(family.load_text_encoders(torch.device("cpu"), torch.float32), CAPTIONS[:2]))
    trained = family.load_denoiser(torch.device("cpu"), torch.float32).train()  # as the train stage holds it
    for kw, out in calls:
        latents, timesteps = kw["hidden_states"], kw["timesteps"]
        assert latents.shape == (2, 4, size[0] // 8, size[1] // 8) and timesteps.dtype == torch.float32
        with torch.no_grad():
            pred = family.predict(pipe.transformer, latents, timesteps, cond, **CPU32)
            assert torch.equal(pred, -out)  # the pipeline steps its scheduler with -output
            assert torch.equal(family.predict(trained, latents, timesteps, cond, **CPU32), pred)  # train() == eval()


@pytest.mark.e2e
def test_cache_train_and_both_lora_formats(project, model):
    # fp32: the pipeline casts a LoRA to its own dtype, so only there can equality be bitwise;
    # cache_batch 1: every forward by hand below is a batch of one; alpha != rank: the scale must survive
    _, cfg = project(model=model, dtype="fp32", cache_batch=1, batch=4, epochs=1, alpha=8.0)
    first = run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    assert plan.family.name == "hidream" and first["priors_computed"] == 16

    # A cached prior equals a forward done by hand with diffusers alone, from the stored seed and timestep.
    sample = next(s for s in plan.samples if s.prior)
    prior = store.read("prior/fp32", plan.prior_key(sample, 1))[0]["prediction"]
    noise_entry = store.read("noise", sample.noise_keys[1])[0]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    with torch.no_grad():
        z = vae.encode(load_image(sample.path, sample.bucket, sample.flips[1])[None]).latent_dist.mode()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = HiDreamImagePipeline.from_pretrained(model, transformer=None, vae=None).encode_prompt(
            sample.captions[1], do_classifier_free_guidance=False, max_sequence_length=32)
    gen = torch.Generator().manual_seed(int(noise_entry["seed"]))
    noise = torch.randn(z.shape[1:], generator=gen)[None]
    t = noise_entry["timestep"].reshape(1)
    sigma = t / 1000
    transformer = HiDreamImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    with torch.no_grad():
        out = transformer(hidden_states=(1 - sigma) * z + sigma * noise, timesteps=t, encoder_hidden_states_t5=t5,
                          encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)[0]
    assert torch.equal(prior, -out[0])

    trained, summary = train_lora(cfg, progress=False)
    lines = [json.loads(x) for x in open(summary["metrics"])]
    assert lines[0]["n_prior"] > 0 and lines[0]["n_standard"] > 0
    assert lines[0]["loss_prior"] <= 1e-10 * lines[0]["loss_standard"]  # step 0: the LoRA changes nothing yet
    assert lines[-1]["loss_prior"] is None or lines[-1]["loss_prior"] > 0  # ...later it has moved the model
    _, bf16 = project(name="bf16.toml", model=model, dtype="bf16", batch=4, max_steps=1,
                       out=project.root / "out-bf16")  # the same cache: only the bf16 priors are new
    run_cache(bf16, progress=False)
    run_train(bf16, progress=False)
    step0 = json.loads(open(bf16.train.output_dir + "/metrics.jsonl").readline())
    assert step0["n_prior"] > 0 and step0["loss_prior"] <= 1e-4 * step0["loss_standard"]

    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    text = {"prompt_embeds_t5": torch.randn(2, 32, 32, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
            "prompt_embeds_llama3": torch.randn(2, 2, 32, 32, generator=g)}
    timesteps = torch.tensor([300.0, 800.0])
    fam = plan.family

    def predict(m):
        with torch.no_grad():
            return fam.predict(m, noisy, timesteps, text, **CPU32)

    ours = predict(trained.eval())
    weights = load_file(summary["lora"])
    assert weights and all(k.startswith("transformer.") for k in weights)
    pipe = HiDreamImagePipeline.from_pretrained(model, transformer=None, vae=None, text_encoder=None, text_encoder_2=None,
                                                text_encoder_3=None, text_encoder_4=None)
    pipe.transformer = HiDreamImageTransformer2DModel.from_pretrained(model, subfolder="transformer")
    base = predict(pipe.transformer)
    assert not torch.allclose(base, ours, atol=1e-4)  # the LoRA learned something
    pipe.load_lora_weights(summary["lora"], adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == set(weights)  # nothing missing, nothing unexpected
    assert pipe.transformer.peft_config["trained"].lora_alpha == 4  # alpha/rank is folded into lora_B
    assert torch.equal(predict(pipe.transformer), ours)

    # kohya/ComfyUI: diffusion_model.<module>, alpha/rank folded into lora_B; diffusers' loader converts it back
    kohya = fam.lora_layout.to_kohya(diffusers_weights(trained, "transformer"), alpha=cfg.lora.alpha)
    assert len(kohya) == len(weights) and all(k.startswith("diffusion_model.") for k in kohya)
    assert set(_convert_non_diffusers_hidream_lora_to_diffusers(kohya)) == set(weights)
    pipe.delete_adapters("trained")
    assert torch.equal(predict(pipe.transformer), base)
    pipe.load_lora_weights(kohya, adapter_name="kohya")
    assert pipe.transformer.peft_config["kohya"].lora_alpha == pipe.transformer.peft_config["kohya"].r  # scale 1
    assert torch.allclose(predict(pipe.transformer), ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="cannot be exported"):
        fam.lora_layout.to_kohya({"transformer.x.lora_magnitude_vector": torch.ones(1)}, alpha=1.0)
