"""Does an image match its caption? Read from the pixels by a fixed rule, no model: the table colour is
the nearest palette colour to the median of the table rows; the teapot is every pixel above the table
that differs from the wall (estimated per row from the edge columns); its body colour is the nearest
palette colour to its median pixel, and its shape is read from its extent (rows and columns it fills):
tall above HIGH, wide below LOW, round between. The scenes are built so that this rule reads every
rendered image right (tests/test_tinybase.py); on generated images it is the accuracy measure.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.tinybase.scenes import COLOURS, SIZE, TABLE_TOP, Scene, parse

HIGH, LOW = 1.3, 0.7  # height/width of the teapot: round ~0.9, tall ~1.7, wide ~0.45
EDGE = 3  # columns at each side that show the wall (the teapot never reaches them)
WALL_DISTANCE = 60  # a pixel this far (RGB, Euclidean) from its row's wall colour is the teapot's
MIN_PIXELS = 40  # fewer: there is no teapot to read
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)


def _nearest(rgb: np.ndarray) -> str:
    return list(COLOURS)[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def read(image: Image.Image) -> Scene:
    """The body colour, shape and table colour the image shows (body and shape None: no teapot found)."""
    px = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
    table = _nearest(np.median(px[TABLE_TOP + 4 :].reshape(-1, 3), axis=0))
    above = px[: TABLE_TOP - 1]
    wall = np.median(np.concatenate([above[:, :EDGE], above[:, -EDGE:]], axis=1), axis=1, keepdims=True)
    mask = np.sqrt(((above - wall) ** 2).sum(axis=2)) > WALL_DISTANCE
    if mask.sum() < MIN_PIXELS:
        return Scene(None, None, table)
    body = _nearest(np.median(above[mask], axis=0))
    # rows and columns holding at least 2 of its pixels: a stray pixel does not stretch the extent
    height, width = (mask.sum(axis=1) >= 2).sum(), (mask.sum(axis=0) >= 2).sum()
    ratio = height / max(width, 1)
    shape = "tall" if ratio > HIGH else "wide" if ratio < LOW else "round"
    return Scene(body, shape, table)


def matches(image: Image.Image, caption: str) -> bool:
    """Whether the image shows a teapot and every attribute the caption names (body colour, shape, table
    colour) as named. 'sks' names no attribute here: whether a LoRA learned its look is another question."""
    wanted, seen = parse(caption), read(image)
    return seen.body is not None and all(getattr(wanted, a) in (None, getattr(seen, a)) for a in ("body", "shape", "table"))
