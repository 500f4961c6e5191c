"""Bad images and captions: each gives a correct result, or a skip with a warning naming the file and
the reason (data.on_bad_image = "skip"), never a crash; "fail" stops with a one-line error instead."""

import io
import builtins
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import images as data
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.data.images import load_image
from pipeline.errors import UserError
from pipeline.train.stage import run_train


def _png(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _jpeg(im, **kw):
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def make_bad_set(folder: Path, prior_folder: Path) -> dict[str, str | None]:
    """Writes the cases; returns file name -> expected skip reason (None: a correct result)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    cases = {
        "zero.png": (b"", "not a readable image"),
        "truncated.jpg": (_jpeg(photo)[: len(_jpeg(photo)) * 6 // 10], "cannot be decoded"),
        "truncated.png": (_png(photo)[: len(_png(photo)) * 6 // 10], "cannot be decoded"),
        "text.png": (b"this is a caption, not an image\n" * 20, "not a readable image"),
        "cmyk.jpg": (_jpeg(photo.convert("CMYK")), None),
        "sixteen-bit.png": (_png(Image.fromarray((np.linspace(0, 65535, 80 * 80).reshape(80, 80)).astype(np.uint16))), None),
        "grey.png": (_png(photo.convert("L")), None),
        "palette.png": (_png(photo.convert("P")), None),
        "rgba.png": (_png(Image.new("RGBA", (80, 80), (255, 0, 0, 0))), None),
        "exif-rotated.jpg": (_jpeg(photo, exif=exif), None),
        "small.png": (_png(photo.resize((20, 24))), None),
        "huge.png": (_png(Image.new("RGB", (130, 130), (1, 2, 3))), None),  # over MAX_PIXELS: decoded, then reduced
        "huge.jpg": (_jpeg(Image.new("RGB", (170, 170), (1, 2, 3))), None),  # over MAX_PIXELS: decoded at a reduced size
        "too-huge.png": (_png(Image.new("RGB", (170, 170), (1, 2, 3))), "megapixel limit of a PNG image"),
        "unreadable.png": (_png(photo), "cannot be read"),
        "bad-caption.png": (_png(photo.rotate(90)), "is not UTF-8"),
        "empty-caption.png": (_png(photo.rotate(180)), None),
        "my photo é.png": (_png(photo.rotate(270)), None),
    }
    for name, (content, _) in cases.items():
        (folder / name).write_bytes(content)
        (folder / name).with_suffix(".txt").write_text(f"a photo of sks teapot {name}")
    (folder / "bad-caption.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))
    (folder / "empty-caption.txt").write_text("")
    (folder / "unreadable.png").chmod(0)
    (folder / "subfolder").mkdir()
    (folder / "subfolder" / "ignored.png").write_bytes(_png(photo))
    shutil.copy(next(prior_folder.glob("*.png")), folder / "same-as-a-prior.png")  # same bytes in two concepts
    return {name: reason for name, (_, reason) in cases.items()}


@pytest.fixture
def bad_project(project, monkeypatch):
    standard, prior = project.root / "data" / "standard", project.root / "data" / "prior"
    expected = make_bad_set(standard, prior)
    monkeypatch.setattr(data, "MAX_PIXELS", 128 * 128)  # so "huge.png" need not be 80 megapixels
    monkeypatch.setattr(data, "MAX_WHOLE_DECODE", 160 * 160)  # nor "too-huge.png" 179
    if os.geteuid() == 0:  # root reads mode-000 files: make the permission error happen as for a user
        real = Path.read_bytes

        def read_bytes(self):
            if self.name == "unreadable.png":
                raise PermissionError(13, "Permission denied")
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        real_open = builtins.open

        def open_(file, *args, **kwargs):  # what hashes an image as it streams, and the decoder
            if isinstance(file, (str, Path)) and Path(file).name == "unreadable.png":
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
    return project, expected


@pytest.mark.e2e
def test_bad_inputs_are_skipped_with_reasons_and_the_rest_trains(bad_project, capsys):
    project, expected = bad_project
    _, cfg = project(max_steps=2)
    summary = run_cache(cfg, progress=False)
    skipped = {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in summary["skipped_images"]}
    assert set(skipped) == {name for name, reason in expected.items() if reason}
    for name, reason in expected.items():
        if reason:
            assert reason in skipped[name], (name, skipped[name])
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "truncated.png" in err
    assert "subfolders of" in err and "small.png' is 20x24, smaller than its" in err

    # a rerun decodes nothing again (the verdicts are cached by content) and still lists the skips
    again = run_cache(cfg, progress=False)
    assert again["latents_encoded"] == 0 and sorted(again["skipped_images"]) == sorted(summary["skipped_images"])
    trained = run_train(cfg, progress=False)
    assert trained["steps"] == 2 and sorted(trained["skipped_images"]) == sorted(summary["skipped_images"])
    # 16 synthetic images + the good new ones; the copy of a prior image (same bytes in two concepts)
    # shares that image's latent
    assert len(Store(cfg.cache.dir).keys("latent")) == 16 + sum(1 for r in expected.values() if r is None)


@pytest.mark.e2e
def test_fail_policy_stops_with_one_line_naming_the_file(bad_project):
    project, _ = bad_project
    path, cfg = project()
    path.write_text(path.read_text().replace("resolution = 64", 'resolution = 64\non_bad_image = "fail"'))
    from pipeline.config import load_config

    with pytest.raises(UserError) as e:
        run_cache(load_config(path), progress=False)
    assert "\n" not in str(e.value) and "image '" in str(e.value) and 'on_bad_image = "skip"' in str(e.value)


def test_decoding_results(tmp_path):
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    # EXIF rotation is applied: same pixels as the image rotated by hand
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rot.png").write_bytes(_png(photo))
    photo.save(tmp_path / "exif.png", exif=exif)
    photo.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "by-hand.png")
    assert torch.equal(load_image(tmp_path / "exif.png", 32), load_image(tmp_path / "by-hand.png", 32))
    # transparent pixels are composited onto white
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert torch.equal(load_image(tmp_path / "clear.png", 32), torch.ones(3, 32, 32))
    # 16-bit greyscale is scaled to 8 bits, not clipped to white
    Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert abs(float(load_image(tmp_path / "grey16.png", 32).mean())) < 0.02
