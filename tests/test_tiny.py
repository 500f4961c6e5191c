"""The embedded tiny Flux model and synthetic data set: deterministic, loadable, runnable offline."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image

from pipeline import tiny
from pipeline.families import tiny_parts
from pipeline.families.flux import tiny as flux_tiny


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_model")
    flux_tiny.build(root / "a", seed=0)
    flux_tiny.build(root / "b", seed=0)
    return root


def test_build_is_deterministic_and_atomic(built):
    a, b = _files(built / "a"), _files(built / "b")
    weights = [k for k in a if k.endswith(".safetensors")]
    assert len(weights) == 4  # transformer, vae, both text encoders
    assert all(a[k] == b[k] for k in weights)
    assert a.keys() == b.keys()
    assert [p.name for p in built.iterdir() if p.name.startswith(".")] == []  # no temporary folders left


def test_other_seed_gives_other_weights(built, tmp_path):
    flux_tiny.build(tmp_path / "c", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "c" / name).read_bytes() != (built / "a" / name).read_bytes()


def test_pipeline_loads_and_generates(built):
    pipe = FluxPipeline.from_pretrained(built / "a")
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.guidance_embeds
    out = pipe(
        prompt="a photo of sks teapot", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all()


def test_tokenizers_reload_and_handle_unknown_words(built):
    pipe = FluxPipeline.from_pretrained(built / "a", transformer=None, vae=None)
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2
    assert clip.model_max_length == 77
    # A reloaded tokenizer encodes exactly like the one that was built.
    for fresh, loaded in [(tiny_parts.clip_tokenizer(), clip), (tiny_parts.t5_tokenizer(), t5)]:
        text = "A photo of sks teapot, Zyzzyva-42 é!"
        assert fresh(text).input_ids == loaded(text).input_ids
    assert all(len(clip.tokenize(w)) == 1 and len(t5.tokenize(w)) == 1 for w in tiny_parts.WORDS)
    ids = clip("a photo of sks teapot", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id
    ids = t5("a teapot", padding="max_length", max_length=8).input_ids
    assert ids[:3] == t5.convert_tokens_to_ids(["▁a", "▁teapot", "</s>"]) and ids[3:] == [t5.pad_token_id] * 5

    embeds, pooled, text_ids = pipe.encode_prompt(
        ["a photo of sks teapot next to a xylophone", "Ünïcödé 🫖"], prompt_2=None, max_sequence_length=32
    )
    assert embeds.shape == (2, 32, 32) and pooled.shape == (2, 32) and text_ids.shape == (32, 3)
    assert torch.isfinite(embeds).all() and torch.isfinite(pooled).all()


def test_bench_preset_and_unknown_names(tmp_path):
    flux_tiny.build(tmp_path / "bench", preset="bench")
    transformer = FluxTransformer2DModel.from_pretrained(tmp_path / "bench", subfolder="transformer")
    assert 1e6 < sum(p.numel() for p in transformer.parameters()) < 2e7
    with pytest.raises(ValueError):
        flux_tiny.build(tmp_path / "m", preset="huge")
    with pytest.raises(ValueError):
        tiny.ensure_embedded(tmp_path / "m", [], family="sd15")


def test_synthetic_concepts(tmp_path):
    first = tiny.build_synthetic_concepts(tmp_path / "one", n=6)
    second = tiny.build_synthetic_concepts(tmp_path / "two", n=6)
    assert set(first) == {"standard", "prior", "heldout-standard", "heldout-prior"}
    for kind, folder in first.items():
        pngs = sorted(folder.glob("*.png"))
        n = 6 if kind in ("standard", "prior") else 2  # two held-out images of each
        assert len(pngs) == n and len(list(folder.iterdir())) == 2 * n
        for png in pngs:
            caption = png.with_suffix(".txt").read_text(encoding="utf-8").strip()
            assert ("sks teapot" in caption) == kind.endswith("standard") and "teapot" in caption
        sizes = {_image_size(p) for p in pngs}
        assert len(sizes) > 1 and all(min(s) > 64 for s in sizes)
        assert _files(folder) == _files(second[kind])
    # Existing folders are left alone.
    marker = first["prior"] / "keep.txt"
    marker.write_text("mine")
    tiny.build_synthetic_concepts(tmp_path / "one", n=6)
    assert marker.read_text() == "mine"


def test_scene_concepts_for_the_demo_on_the_base(tmp_path):
    """The demo's data set on the shipped base: its own scenes, the judge reading each as its caption (the
    subject as a yellow round teapot), the prior teapots of trained combinations, the held-out ones not."""
    from pipeline.tinybase import judge, scenes

    first = tiny.build_scene_concepts(tmp_path / "one")
    second = tiny.build_scene_concepts(tmp_path / "two")
    assert {k: len(list(f.glob("*.png"))) for k, f in first.items()} == tiny.FOLDERS
    for kind, folder in first.items():
        assert _files(folder) == _files(second[kind])
        for png in sorted(folder.glob("*.png")):
            caption = png.with_suffix(".txt").read_text(encoding="utf-8").strip()
            wanted = scenes.parse(caption)
            assert wanted.sks == kind.endswith("standard")
            if kind == "prior":
                assert wanted in scenes.TRAIN
            if kind == "heldout-prior":
                assert wanted in scenes.HELDOUT
            assert judge.matches(Image.open(png), caption.replace("sks", "yellow round"))
    assert len({p.with_suffix(".txt").read_text() for p in first["prior"].glob("*.png")}) == tiny.FOLDERS["prior"]


def test_ensure_embedded_builds_only_what_is_missing(tmp_path):
    model, data = tmp_path / "model", tmp_path / "data"
    tiny.build_synthetic_concepts(data, n=2)
    (data / "prior" / "000.png").unlink()
    tiny.ensure_embedded(model, [data / "standard", data / "prior"])
    assert (model / "model_index.json").exists()
    assert not (data / "prior" / "000.png").exists()  # the existing folder was not rebuilt
    stamp = (model / "model_index.json").stat().st_mtime_ns
    tiny.ensure_embedded(model, [data / "standard", data / "prior"])
    assert (model / "model_index.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError):
        tiny.ensure_embedded(model, [tmp_path / "elsewhere" / "mine"])
    tiny.ensure_embedded(model, [tmp_path / "new" / "standard", tmp_path / "new" / "prior"])
    assert len(list((tmp_path / "new" / "prior").glob("*.png"))) == 8
