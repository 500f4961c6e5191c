"""Concept folders -> (image, caption) pairs, and image decoding to the training resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.config import IMAGE_EXTS, ConceptConfig
from pipeline.errors import UserError

# Part of every latent's key: change how images are prepared and every latent is recomputed.
PREPARE = "exif-transpose,rgb-on-white,resize-shorter-side-lanczos,center-crop"


def scan_concept(concept: ConceptConfig, index: int) -> list[tuple[Path, str]]:
    """The images of a concept folder (not its subfolders), sorted by name, each with its caption:
    the sidecar file `<stem><caption_ext>` when it exists, else the concept's default caption."""
    folder = Path(concept.folder)
    if not folder.is_dir():
        raise UserError(f"concepts[{index}].folder: '{folder}' does not exist")
    items = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS):
        caption = concept.default_caption
        sidecar = path.with_suffix(concept.caption_ext) if concept.caption_ext else None
        if sidecar is not None and sidecar.is_file():
            try:
                caption = sidecar.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                raise UserError(f"caption file '{sidecar}' is not UTF-8 text") from None
        items.append((path, caption))
    if not items:
        raise UserError(f"concepts[{index}].folder: '{folder}' has no images ({', '.join(IMAGE_EXTS)})")
    return items


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Decode, apply the EXIF rotation, resize the shorter side to `resolution` and centre-crop:
    a (3, resolution, resolution) float32 tensor in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            im = im.convert("RGB")
            scale = resolution / min(im.size)
            size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.LANCZOS)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(im, dtype=np.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"image '{path}' cannot be read: {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0
