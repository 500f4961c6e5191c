"""The cache stage's text encoders (model.text_encoder_quantize, model.text_encoder_offload), on the tiny
FLUX.2 klein (one Qwen3, like dev's Mistral 3 and Chroma's T5):

- offloaded, the encoder's weights wait on the CPU (its parameters are meta until a layer runs) and the
  embeddings are bit for bit those of the resident encoder: nothing in the text key changes;
- int8 (torchao, runs on a CPU) quantizes its Linear layers as transformers loads them; the embeddings
  change, and so does every text key (and with it every prior key), while an unquantized config keeps
  the keys it had before the setting existed;
- nf4 without CUDA, a missing backend and quantize together with offload are one line naming the key;
- the cache stage holds one model at a time: the text phase sees no VAE or denoiser, and one text
  encoder; the VAE and the prior forward see no text encoder.
"""

import importlib
import weakref

import diffusers
import pytest
import torch
import transformers

from conftest import CPU32, configure
from pipeline.cache.stage import run_cache
from pipeline.config import ModelConfig
from pipeline.data.plan import make_plan
from pipeline.errors import UserError
from pipeline.families.flux2.adapter import Flux2Family
from pipeline.families.load import get_family
from pipeline.quantize import is_quantized
from pipeline.store.keys import digest

CAPTIONS = ["a photo of sks teapot on a blue table", ""]


@pytest.fixture(scope="module")
def klein(tiny_family_model):
    return tiny_family_model("flux2")


def embeddings(root, **model):
    family = get_family(ModelConfig(path=str(root), max_sequence_length=32, **model))
    encoders = family.load_text_encoders(**CPU32)
    return encoders, torch.stack([e["prompt_embeds"] for e in family.encode_captions(encoders, CAPTIONS)])


def test_offloaded_encoders_hold_no_weights_and_give_the_same_embeddings(klein):
    _, resident = embeddings(klein)
    pipe, offloaded = embeddings(klein, text_encoder_offload=True)
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"meta"}  # on the CPU, in accelerate's map
    assert torch.equal(offloaded, resident)


def test_an_int8_encoder_is_quantized_and_keyed(klein, project):
    _, plain = embeddings(klein)
    pipe, int8 = embeddings(klein, text_encoder_quantize="int8")
    linears = [m for m in pipe.text_encoder.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(is_quantized(m) for m in linears)
    assert not torch.equal(int8, plain) and torch.allclose(int8, plain, atol=0.05)

    path, cfg = project(model=klein)
    before = make_plan(cfg)
    caption = next(c for s in before.samples for c in s.captions)
    # the key as it was before the setting existed: caches made then stay valid
    assert before.text_key(caption) == digest("text", caption, before.text_fp, 32, cfg.model.encoder_dtype)
    offload = make_plan(configure(path, model={"text_encoder_offload": True}))
    after = make_plan(configure(path, model={"text_encoder_quantize": "int8", "text_encoder_offload": None}))
    assert offload.text_key(caption) == before.text_key(caption)
    assert after.text_key(caption) != before.text_key(caption)
    sample = next(s for s in before.samples if s.prior)
    twin = next(s for s in after.samples if s.path == sample.path)
    assert twin.latent_keys == sample.latent_keys and twin.text_keys != sample.text_keys
    assert after.prior_key(twin, 0) != before.prior_key(sample, 0)


def test_bad_text_encoder_settings_are_one_line(project, monkeypatch):
    path, _ = project()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"^.*'model\.text_encoder_quantize' is \"nf4\".*needs a CUDA GPU") as e:
            configure(path, model={"text_encoder_quantize": "nf4"})
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"'model\.text_encoder_offload' works with model\.text_encoder_quantize"):
        configure(path, model={"text_encoder_quantize": "int8", "text_encoder_offload": True})
    with pytest.raises(UserError, match=r"model\.text_encoder_quantize"):
        configure(path, model={"text_encoder_quantize": "int4", "text_encoder_offload": None})
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "torchao" else real(name, *a))
    cfg = configure(path, model={"text_encoder_quantize": "int8"})
    with pytest.raises(UserError, match=r"^config key 'model\.text_encoder_quantize' is 'int8', which needs torchao"):
        make_plan(cfg)


@pytest.mark.e2e
def test_the_cache_stage_holds_one_model_at_a_time(klein, project, monkeypatch):
    alive = {"encoder": weakref.WeakSet(), "diffusers": weakref.WeakSet()}
    seen = []

    def track(cls, group):
        init = cls.__init__

        def tracked(self, *args, **kwargs):
            init(self, *args, **kwargs)
            alive[group].add(self)
        monkeypatch.setattr(cls, "__init__", tracked)

    track(transformers.PreTrainedModel, "encoder")
    track(diffusers.ModelMixin, "diffusers")

    def roots(models):  # a Qwen3ForCausalLM holds a Qwen3Model, itself a PreTrainedModel: count the outer one
        inner = {id(sub) for m in models for sub in list(m.modules())[1:]}
        return [m for m in models if id(m) not in inner]

    def check(name):
        real = getattr(Flux2Family, name)

        def checked(self, *args, **kwargs):
            seen.append((name, len(roots(alive["encoder"])), sorted(type(m).__name__ for m in roots(alive["diffusers"]))))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(Flux2Family, name, checked)

    for name in ("encode_captions", "encode_images", "predict"):
        check(name)
    path, _ = project(model=klein, dtype="fp32")
    run_cache(configure(path, model={"text_encoder_quantize": "int8"}), progress=False)
    phases = {name for name, *_ in seen}
    assert phases == {"encode_captions", "encode_images", "predict"}
    for name, encoders, others in seen:
        if name == "encode_captions":
            assert encoders == 1 and others == [], (name, encoders, others)
        elif name == "encode_images":
            assert encoders == 0 and others == ["AutoencoderKLFlux2"], (name, encoders, others)
        else:
            assert encoders == 0 and others == ["Flux2Transformer2DModel"], (name, encoders, others)


def test_the_planner_counts_the_text_phase_as_the_stage_holds_it():
    from pipeline.config import LoraConfig
    from pipeline.families.flux2.planning import PLANNING
    from pipeline.memory import GiB, Settings, estimate
    from pipeline.tools.public_configs import encoder_params, public_family

    dev = PLANNING.variants[1]
    family, encoders = public_family("flux2", dev), encoder_params("flux2", dev)

    def text_phase(**settings):
        e = estimate(family, dict(dev.denoiser_config), LoraConfig(), Settings(encoder_dtype="bf16", **settings),
                     encoders, dict(dev.vae_config))
        return e.cache_parts["text_encoder"] / GiB

    plain, nf4, int8, offload = (text_phase(), text_phase(text_encoder_quantize="nf4"),
                                 text_phase(text_encoder_quantize="int8"), text_phase(text_encoder_offload=True))
    assert 44 < plain < 46  # Mistral Small 3.1 in bf16
    assert offload < nf4 < int8 < plain and nf4 < 18  # a 24 GB card runs dev's cache stage with nf4
    # several text encoders are held together: FLUX.1's CLIP and T5 are one phase
    flux = public_family("flux")
    from pipeline.tools.public_configs import ENCODERS, planning

    e = estimate(flux, dict(planning("flux").denoiser_config), LoraConfig(), Settings(encoder_dtype="bf16"),
                 ENCODERS["flux"], dict(planning("flux").vae_config))
    both = ENCODERS["flux"]["text_encoder"] + ENCODERS["flux"]["text_encoder_2"]
    assert e.cache_parts["text encoders"] == both * 2 + int(0.75 * GiB)
