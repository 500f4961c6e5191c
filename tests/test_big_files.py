"""An image file with a valid header and a huge tail is never read whole: the plan hashes it as it streams
and the decoder reads what it needs, so the peak memory of planning and decoding it stays that of a plain
image (before, the whole file was read into memory to hash it: 6.7 GB for a 6 GB tail). A photo over the
pixel limit is decoded at a reduced size, not skipped: a 100 MP JPEG is planned and decoded within a small
fraction of its 300 MB of pixels (before, it was left out)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import images

TAIL = 768 * 2**20  # bytes after the PNG's end; sparse on disk, but a whole read puts them all in memory

PROBE = """
import resource, sys
from pipeline.config import load_config
from pipeline.data.images import prepare_image
from pipeline.data.plan import make_plan

plan = make_plan(load_config(sys.argv[1]))
assert not plan.skipped, plan.skipped
image = next(s for s in plan.samples if s.path.name == sys.argv[2] and s.concept == 0)
pixels, geometry = prepare_image(image.path, image.bucket)
assert pixels.shape[1:] == image.bucket, (pixels.shape, image.bucket)
print(geometry["original_size"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
"""


def _peak(path, name="000.png") -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, str(path), name], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_an_image_with_a_huge_tail_is_not_read_whole(project):
    path, _ = project()
    plain = _peak(path)
    image = project.root / "data" / "standard" / "000.png"
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size + TAIL)  # a valid PNG, then 768 MiB of zeros after its end
    tailed = _peak(path)
    assert tailed - plain < TAIL // 8, (plain, tailed)


BIG_JPEG = """
import sys
from PIL import Image

# 12000 x 8400 (100.8 MP, 302 MB as RGB pixels): a gradient, so the file stays small (libjpeg decodes any
# content into the same buffers)
Image.linear_gradient("L").resize((12000, 8400)).convert("RGB").save(sys.argv[1], quality=90)
"""


@pytest.mark.slow
def test_a_100_megapixel_jpeg_is_decoded_reduced_within_bounded_memory(project):
    path, _ = project()
    plain = _peak(path)
    image = project.root / "data" / "standard" / "000.png"
    image.unlink()
    big = image.with_suffix(".jpg")
    # written in another process, so that neither this one nor the probe ever held its pixels
    done = subprocess.run([sys.executable, "-c", BIG_JPEG, str(big)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = _peak(path, "000.jpg")
    assert peak - plain < 150 * 2**20, (plain, peak)  # a whole decode would add 302 MB at least


def _reduced_and_whole(monkeypatch, path, bucket):
    whole = images.prepare_image(path, bucket)
    monkeypatch.setattr(images, "MAX_PIXELS", 200 * 200)  # the reduced decoding, at a small size
    reduced = images.prepare_image(path, bucket)
    monkeypatch.undo()
    return whole, reduced


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_reduced_decoding_gives_the_image_a_whole_decode_gives(tmp_path, monkeypatch, suffix):
    # a smooth photo-like image with an EXIF quarter turn: the same picture, the same size and crop, and the
    # original size is the image's own, not the reduced decode's
    y, x = np.mgrid[0:700, 0:1000]
    pixels = np.stack([x * 255 // 1000, y * 255 // 700, (x + y) * 255 // 1700], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(pixels).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    (whole, whole_geometry), (reduced, reduced_geometry) = _reduced_and_whole(monkeypatch, path, (96, 64))
    assert reduced.shape == whole.shape == (3, 96, 64)
    assert reduced_geometry == whole_geometry and whole_geometry["original_size"] == (1000, 700)
    assert float((reduced - whole).abs().mean()) < 0.02 and not torch.equal(reduced, whole)
