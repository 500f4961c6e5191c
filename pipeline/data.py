"""Concept folders -> (image, caption) pairs, and image decoding to the training resolution.

A problem with one file (unreadable, not an image, truncated, too large, caption not UTF-8) raises
BadImage naming the reason; the stages skip such a file with a warning or stop, per data.on_bad_image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.config import IMAGE_EXTS, ConceptConfig
from pipeline.errors import UserError

# Part of every latent's key: change how images are prepared and every latent is recomputed.
PREPARE = "exif-transpose,16bit-to-8bit,rgb-on-white,resize-shorter-side-lanczos,center-crop"
MAX_PIXELS = 80_000_000  # larger images are refused: decoding one would take gigabytes of memory
Image.MAX_IMAGE_PIXELS = None  # we enforce MAX_PIXELS ourselves, from the header, before decoding


class BadImage(Exception):
    """One image (or its caption) cannot be used; the message is the reason."""


def scan_concept(concept: ConceptConfig, index: int) -> list[tuple[Path, str | BadImage]]:
    """The images of a concept folder (not its subfolders), sorted by name, each with its caption:
    the sidecar file `<stem><caption_ext>` when it exists, else the concept's default caption.
    A caption that cannot be read comes back as a BadImage instead of a string."""
    folder = Path(concept.folder)
    if not folder.is_dir():
        raise UserError(f"concepts[{index}].folder: '{folder}' does not exist")
    items: list[tuple[Path, str | BadImage]] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        caption: str | BadImage = concept.default_caption
        sidecar = path.with_suffix(concept.caption_ext) if concept.caption_ext else None
        if sidecar is not None and sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                caption = BadImage(f"caption file '{sidecar.name}' is not UTF-8 text")
            except OSError as e:
                caption = BadImage(f"caption file '{sidecar.name}' cannot be read ({e.strerror})")
        items.append((path, caption))
    if not items:
        raise UserError(f"concepts[{index}].folder: '{folder}' has no images ({', '.join(IMAGE_EXTS)})")
    return items


def check_header(path: Path) -> tuple[int, int]:
    """Cheap checks from the file header alone (no decoding): it is an image, and not too large.
    Returns its (width, height) as stored (before any EXIF rotation)."""
    try:
        with Image.open(path) as im:
            return _check_size(im)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
        raise BadImage(f"not a readable image ({type(e).__name__})") from None


def _check_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size  # from the header: nothing is decoded yet
    if width * height > MAX_PIXELS:
        raise BadImage(f"{width}x{height} is over the {MAX_PIXELS // 1_000_000} megapixel limit")
    return width, height


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale, don't clip, to 8 bits
        array = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode != "I" or array.max() > 255 else 255.0
        im = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels become white (a documented choice: most trainers' default)
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Decode, apply the EXIF rotation, resize the shorter side to `resolution` and centre-crop:
    a (3, resolution, resolution) float32 tensor in [-1, 1]. Raises BadImage."""
    try:
        im = Image.open(path)
    except OSError as e:
        raise BadImage(f"not a readable image ({type(e).__name__})") from None
    try:
        with im:
            _check_size(im)  # before decoding, which is what would take the memory
            im.load()  # decode fully here, so a truncated file fails here and not later
            im = _to_rgb(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"cannot be decoded: {e}") from None
    scale = resolution / min(im.size)
    size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0
