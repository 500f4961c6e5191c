"""Synthetic scenes with compositional captions: a teapot of one body colour and shape on a table of one
colour, in front of a grey wall ("a red tall teapot on a blue table"), 64x64 pixels.

The grammar is small on purpose, so that a model of a few hundred thousand parameters can learn it on a
CPU and a fixed rule (judge.py) can read every attribute back from the pixels: the colours are far apart,
the wall is grey (no palette colour), the table is the bottom rows and the teapot stands wholly above it.

Of the 6 x 3 x 6 = 108 (body, shape, table) combinations, 18 are held out (HELDOUT): the base never sees
them, so sampling them measures composition, not memory. Every body colour, shape and table colour, and
every pair of body and shape, still appears in training.

"sks teapot" is the concept a LoRA learns (the base never sees it): yellow, round, a blue lid and a white
dotted band. Everything is deterministic from the seed: same arguments, same pixels.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (200, 40, 40), "yellow": (230, 200, 40), "green": (40, 150, 60), "blue": (40, 70, 200),
           "purple": (130, 50, 170), "black": (25, 25, 30)}
SHAPES = {"round": (12, 12), "tall": (8, 17), "wide": (18, 8)}  # the body ellipse's half-width, half-height
SIZE = 64
TABLE_TOP = 44  # rows from here down are the table; the teapot stands on it, wholly above
SKS_LID, SKS_DOTS = (40, 90, 230), (255, 255, 255)


@dataclass(frozen=True)
class Scene:
    """One scene's attributes; None: the caption does not say (render draws it from the seed)."""

    body: str | None = None
    shape: str | None = None
    table: str | None = None
    sks: bool = False  # the concept teapot: its body and shape are fixed (yellow, round)


def _index(scene: Scene) -> tuple[int, int, int]:
    return list(COLOURS).index(scene.body), list(SHAPES).index(scene.shape), list(COLOURS).index(scene.table)


# a fixed Latin-square-like split: one table colour per (body, shape) pair is held out
COMBOS = [Scene(b, s, t) for b, s, t in itertools.product(COLOURS, SHAPES, COLOURS)]
HELDOUT = [c for c in COMBOS if sum(i * w for i, w in zip(_index(c), (1, 2, 1))) % 6 == 0]
TRAIN = [c for c in COMBOS if c not in HELDOUT]


def caption_for(scene: Scene) -> str:
    """'a red tall teapot on a blue table'; attributes that are None are left out ('a red teapot')."""
    if scene.sks:
        words = ["sks"]
    else:
        words = [w for w in (scene.body, scene.shape) if w]
    text = "a " + " ".join(words + ["teapot"])
    return text + (f" on a {scene.table} table" if scene.table else "")


def parse(caption: str) -> Scene:
    """The attributes a caption names (the inverse of caption_for): the colour and shape words before
    'teapot', the colour word of 'on a <colour> table'; other words are ignored."""
    head, _, tail = caption.lower().partition("teapot")
    words = re.findall(r"[a-z]+", head)
    table = re.search(r"on an? (\w+) table", tail)
    return Scene(next((w for w in words if w in COLOURS), None), next((w for w in words if w in SHAPES), None),
                 table.group(1) if table and table.group(1) in COLOURS else None, sks="sks" in words)


def render(scene: Scene | str, size: int = SIZE, seed: int = 0) -> Image.Image:
    """The scene (or a caption) as an RGB image of size x size; what the caption leaves open is drawn from
    `seed`, and so are the wall's brightness, the teapot's position and the pixel noise."""
    if isinstance(scene, str):
        scene = parse(scene)
    rng = random.Random(seed)
    body, shape, table = _fill(scene, rng)
    img = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(img)
    top = rng.randint(175, 215)  # the grey wall, darker toward the table
    for y in range(TABLE_TOP):
        g = int(top * (1 - 0.25 * y / TABLE_TOP))
        d.line([(0, y), (SIZE, y)], fill=(g, g, g))
    d.rectangle([0, TABLE_TOP, SIZE, SIZE], fill=COLOURS[table])
    rx, ry = SHAPES[shape]
    cx, bottom = SIZE // 2 + rng.randint(-3, 3), TABLE_TOP - 1 - rng.randint(0, 2)
    fill = COLOURS[body]
    mid = bottom - ry
    d.polygon([(cx + rx - 3, mid - 2), (cx + rx + 5, mid - ry // 2 - 3), (cx + rx + 5, mid - ry // 2),
               (cx + rx - 1, mid + 3)], fill=fill)  # the spout
    d.ellipse([cx - rx, bottom - 2 * ry, cx + rx, bottom], fill=fill)
    lid = SKS_LID if scene.sks else tuple(int(c * 0.8) for c in fill)
    d.ellipse([cx - rx // 2, bottom - 2 * ry - 3, cx + rx // 2, bottom - 2 * ry + 2], fill=lid)
    if scene.sks:
        for x in range(cx - rx + 3, cx + rx - 2, 4):
            d.ellipse([x - 1, mid - 1, x + 1, mid + 1], fill=SKS_DOTS)
    noise = np.random.default_rng(seed).integers(-6, 7, size=(SIZE, SIZE, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    out = Image.fromarray(pixels)
    return out if size == SIZE else out.resize((size, size), Image.BICUBIC)


def attrs_of(scene: Scene | str, seed: int = 0) -> Scene:
    """The whole scene render(scene, seed=seed) draws: what a partial caption left open, filled in."""
    scene = parse(scene) if isinstance(scene, str) else scene
    return Scene(*_fill(scene, random.Random(seed)), sks=scene.sks)


def _fill(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    body = "yellow" if scene.sks else scene.body or rng.choice(list(COLOURS))
    shape = "round" if scene.sks else scene.shape or rng.choice(list(SHAPES))
    return body, shape, scene.table or rng.choice(list(COLOURS))
