"""Concept folders -> (image, caption) pairs, and image decoding to the training resolution.

A problem with one file (unreadable, not an image, truncated, caption not UTF-8) raises BadImage naming
the reason; the stages skip such a file with a warning or stop, per data.on_bad_image. An image over
MAX_PIXELS is not refused but decoded at a reduced size (a JPEG by its decoder's DCT scaling, never whole).
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.config import IMAGE_EXTS, ConceptConfig
from pipeline.errors import UserError, warn

# Part of every latent's key: change how images are prepared and every latent is recomputed.
PREPARE = "exif-transpose,16bit-to-8bit,rgb-on-white,resize-to-cover-lanczos,center-crop"
MAX_PIXELS = 80_000_000  # larger images are decoded at a reduced size, not whole (a 100 MP RGB photo is 300 MB)
# PNG, WebP and BMP have no reduced decoding in Pillow: over MAX_PIXELS they are decoded whole, then reduced,
# up to Pillow's own decompression-bomb limit (2 x its 89.5 MP warning); larger ones are refused
MAX_WHOLE_DECODE = 2 * 89_478_485
REDUCIBLE = ("L", "LA", "PA", "RGB", "RGBA", "I", "F", "CMYK", "YCbCr")  # modes Image.reduce takes
MAX_CAPTION = 10_000  # characters; a caption is stored whole beside its embedding, so a runaway file is refused
Image.MAX_IMAGE_PIXELS = None  # we enforce our limits ourselves, from the header, before decoding


class BadImage(Exception):
    """One image (or its caption) cannot be used; the message is the reason."""


def scan_concept(concept: ConceptConfig, index: int,
                 missing: list[Path] | None = None) -> list[tuple[Path, str | BadImage]]:
    """The images of a concept folder (not its subfolders), sorted by name, each with its caption:
    the sidecar file `<stem><caption_ext>` when it exists, else the concept's default caption.
    A caption that cannot be read comes back as a BadImage instead of a string. Images with no caption
    file and no default caption to fall back on are appended to `missing` (the caller says so once)."""
    folder = Path(concept.folder)
    if not folder.is_dir():
        raise UserError(f"concepts[{index}].folder: '{folder}' does not exist")
    items: list[tuple[Path, str | BadImage]] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        caption: str | BadImage = concept.default_caption
        sidecar = path.with_suffix(concept.caption_ext) if concept.caption_ext else None
        if sidecar is not None and sidecar.is_file():
            try:
                # utf-8-sig: a byte-order mark some editors write at the start is not part of the caption
                caption = sidecar.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError:
                caption = BadImage(f"caption file '{sidecar.name}' is not UTF-8 text")
            except OSError as e:
                caption = BadImage(f"caption file '{sidecar.name}' cannot be read ({e.strerror})")
            if isinstance(caption, str) and len(caption) > MAX_CAPTION:
                caption = BadImage(f"caption file '{sidecar.name}' has {len(caption):,} characters, over the limit "
                                   f"of {MAX_CAPTION:,}")
            elif isinstance(caption, str) and "\0" in caption:
                # HDF5 stores the caption beside its embedding as a string, which cannot hold a NUL
                caption = BadImage(f"caption file '{sidecar.name}' holds a NUL byte (not text)")
        elif sidecar is not None and sidecar.is_symlink():  # is_file is false for a link that dangles or loops
            warn(f"caption file '{sidecar}' is a link to no file ({_link_trouble(sidecar)}): "
                 f"'{path.name}' gets {'the default caption' if concept.default_caption else 'an empty caption'}")
        elif sidecar is not None and not concept.default_caption and missing is not None:
            missing.append(path)
        items.append((path, caption))
    if not items:
        raise UserError(f"concepts[{index}].folder: '{folder}' has no images ({', '.join(IMAGE_EXTS)})")
    return items


def _link_trouble(link: Path) -> str:
    try:
        link.resolve(strict=True)
    except RuntimeError:  # Python 3.11's resolve raises this for a loop
        return "it loops"
    except OSError as e:
        return "it loops" if e.errno == errno.ELOOP else "it dangles"
    return "it is not a file"


def check_header(path: Path) -> tuple[int, int]:
    """Cheap checks from the file header alone (no decoding): it is an image, and not too large.
    Returns its (width, height) as shown, i.e. after its EXIF rotation (which the bucket depends on)."""
    try:
        with Image.open(path) as im:
            width, height = _check_size(im)
            return (height, width) if _rotated(im) else (width, height)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
        raise BadImage(f"not a readable image ({type(e).__name__})") from None


def buckets(resolution: int, multiple: int, enabled: bool) -> list[tuple[int, int]]:
    """(height, width) sizes an image may be trained at: about resolution² pixels at common aspect ratios
    (diffusers' generate_aspect_ratio_buckets), or the one square when bucketing is off."""
    if not enabled:
        return [(resolution, resolution)]
    from diffusers.training_utils import generate_aspect_ratio_buckets

    return generate_aspect_ratio_buckets(resolution, divisibility=multiple)


def nearest_bucket(width: int, height: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    from diffusers.training_utils import find_nearest_bucket

    return options[find_nearest_bucket(height, width, options)]


def _check_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size  # from the header: nothing is decoded yet
    if width * height > MAX_PIXELS and im.format == "JPEG":  # decoded at 1/8 scale at most
        if -(-width // 8) * -(-height // 8) > MAX_PIXELS:
            raise BadImage(f"{width}x{height} is over the {MAX_PIXELS // 1_000_000} megapixel limit even at the "
                           "decoder's 1/8 scale")
    elif width * height > MAX_WHOLE_DECODE:
        raise BadImage(f"{width}x{height} is over the {MAX_WHOLE_DECODE // 1_000_000} megapixel limit of a "
                       f"{im.format or 'non-JPEG'} image, which is decoded whole: save it as JPEG (decoded at a "
                       "reduced size) or downscale it")
    return width, height


def _rotated(im: Image.Image) -> bool:
    """Whether the EXIF orientation is a quarter turn (width and height swap when shown)."""
    try:
        return im.getexif().get(0x0112) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: decoding will tell
        return False


def _decode_reduced(im: Image.Image, cover: tuple[int, int], rotated: bool) -> Image.Image:
    """An image over MAX_PIXELS, decoded no larger than needed to cover (width, height) as shown: a JPEG
    decodes at 1/2, 1/4 or 1/8 scale (Image.draft: libjpeg's scaled decoding, the full size never in
    memory), then any format is reduced by a whole factor (box averaging) that keeps it at least `cover`.
    The Lanczos resize that follows goes from this smaller image to exactly the size a full decode would."""
    need = (cover[1], cover[0]) if rotated else cover  # as stored, before the EXIF rotation
    if im.format == "JPEG":
        im.draft(None, need)
    im.load()
    factor = min(im.width // need[0], im.height // need[1])
    if factor < 2:
        return im
    if im.mode not in REDUCIBLE:  # palette, 1-bit, 16-bit greyscale: to 8-bit first
        im = _to_rgb(im)
    return im.reduce(factor)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale, don't clip, to 8 bits
        array = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode != "I" or array.max() > 255 else 255.0
        im = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels become white (a documented choice: most trainers' default)
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_image(path: Path, size: int | tuple[int, int], flip: bool = False) -> torch.Tensor:
    """prepare_image without the geometry: a (3, h, w) float32 tensor in [-1, 1]."""
    return prepare_image(path, size, flip)[0]


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """(width, height) an image is resized to so that it covers its bucket (height, width) before the centre
    crop. BadImage when that would exceed MAX_PIXELS: an extreme aspect ratio (a 1 x 1,000,000 strip) would
    otherwise ask for gigabytes."""
    scale = max(bucket[1] / width, bucket[0] / height)
    size = (max(bucket[1], round(width * scale)), max(bucket[0], round(height * scale)))
    if size[0] * size[1] > MAX_PIXELS:
        raise BadImage(f"its aspect ratio ({width}x{height}) is too extreme for any bucket: covering one would take "
                       f"{size[0] * size[1] / 1e6:,.0f} megapixels")
    return size


def prepare_image(path: Path, size: int | tuple[int, int], flip: bool = False,
                  crop: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """Decode, apply the EXIF rotation, resize to cover `size` = (height, width) (an int: a square) and
    crop to it (centred, or at `crop` = (top, left) in the resized image: data.random_crop's per-variant
    draw, see pipeline/data/variants.py), then mirror if `flip`. Returns the (3, h, w) float32 tensor in
    [-1, 1] and the geometry a UNet family's micro-conditioning needs: original (height, width) and the
    crop's (top, left) in the resized image. An image over MAX_PIXELS is decoded at a reduced size first
    (_decode_reduced); its original size is still its own. Raises BadImage."""
    height, width = (size, size) if isinstance(size, int) else size
    try:
        im = Image.open(path)
    except OSError as e:
        raise BadImage(f"not a readable image ({type(e).__name__})") from None
    try:
        with im:
            stored = _check_size(im)  # before decoding, which is what would take the memory
            rotated = _rotated(im)
            shown = (stored[1], stored[0]) if rotated else stored  # (width, height)
            resized = cover_size(*shown, (height, width))
            if stored[0] * stored[1] > MAX_PIXELS:
                im = _decode_reduced(im, resized, rotated)
            else:
                im.load()  # decode fully here, so a truncated file fails here and not later
            im = _to_rgb(ImageOps.exif_transpose(im))
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"cannot be decoded: {e}") from None
    original = (shown[1], shown[0])
    im = im.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    if crop is not None:  # the plan drew it for this same size (the header's); kept inside it all the same
        top, left = min(max(crop[0], 0), resized[1] - height), min(max(crop[1], 0), resized[0] - width)
    im = im.crop((left, top, left + width, top + height))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = resized[0] - left - width  # where the crop sits in the mirrored image (as diffusers' UNet training scripts)
    array = np.asarray(im, dtype=np.float32)
    pixels = torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0
    return pixels, {"original_size": original, "crop_top_left": (top, left)}
