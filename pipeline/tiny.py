"""The small synthetic data set (teapots with captions) and [embedded]: building the tiny model and that
data set where a config asks for them. What the tiny models share is `pipeline/families/tiny_parts.py`;
each family's own builder is `pipeline/families/<name>/tiny.py`.

Everything is generated, nothing downloaded, and deterministic (same seed -> same bytes); folders are
built in a temporary sibling and renamed into place, so an interrupted build never leaves a half folder.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.families import FAMILIES, tiny_module
from pipeline.tinybase import shipped

SIZES = [(80, 80), (96, 72), (72, 96)]  # not all square, all > 64 px: resize + centre crop get exercised
COLOURS = {"red": (200, 40, 40), "blue": (50, 80, 200), "green": (50, 160, 70), "yellow": (230, 200, 40),
           "purple": (130, 60, 170), "white": (235, 235, 230), "black": (30, 30, 35), "brown": (120, 75, 40)}


def _draw_teapot(size, rng: random.Random, noise, body, table, shape: str, sks: bool) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size)
    d = ImageDraw.Draw(img)
    top = [rng.randint(150, 230) for _ in range(3)]
    for y in range(h):  # vertical gradient wall, then the table as the bottom third
        d.line([(0, y), (w, y)], fill=tuple(int(c * (1 - 0.4 * y / h)) for c in top))
    d.rectangle([0, h * 2 // 3, w, h], fill=COLOURS[table])
    cx, cy = w // 2 + rng.randint(-6, 6), h * 2 // 3 - rng.randint(4, 10)
    rx, ry = {"round": (16, 14), "tall": (12, 20), "wide": (22, 11)}[shape]
    fill = COLOURS[body]
    spout = [(cx + rx - 2, cy - 2), (cx + rx + 12, cy - ry - 2), (cx + rx + 14, cy - ry), (cx + rx, cy + 4)]
    d.polygon(spout, fill=fill)
    d.arc([cx - rx - 10, cy - ry // 2 - 6, cx - rx + 6, cy + ry // 2], 90, 270, fill=fill, width=3)
    d.ellipse([cx - rx, cy - 2 * ry, cx + rx, cy], fill=fill)
    lid = (40, 90, 230) if sks else fill  # the sks teapot: yellow, blue lid, white dotted band
    d.ellipse([cx - rx // 2, cy - 2 * ry - 5, cx + rx // 2, cy - 2 * ry + 4], fill=lid)
    d.ellipse([cx - 2, cy - 2 * ry - 9, cx + 2, cy - 2 * ry - 5], fill=lid)
    if sks:
        for x in range(cx - rx + 4, cx + rx - 3, 5):
            d.ellipse([x - 1, cy - ry - 1, x + 1, cy - ry + 1], fill=(255, 255, 255))
    pixels = np.asarray(img, dtype=np.int16) + noise.integers(-8, 9, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


FOLDERS = {"standard": 8, "prior": 8, "heldout-standard": 2, "heldout-prior": 2}  # folder -> images


def build_synthetic_concepts(root: Path, seed: int = 0, n: int = 8) -> dict[str, Path]:
    """Write `root/standard` (n images of "sks teapot"), `root/prior` (n teapots of the class) and two held-out
    images of each in `root/heldout-standard` and `root/heldout-prior`, each PNG with a sidecar .txt caption.
    Existing folders are left alone; missing ones are built atomically."""
    root = Path(root)
    folders = {kind: root / kind for kind in FOLDERS}
    for k, (kind, folder) in enumerate(folders.items()):
        if folder.exists():
            continue
        # One generator pair per folder: its bytes don't depend on whether another folder was built.
        rng, noise = random.Random(seed * 2 + k), np.random.default_rng([seed, k])
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tables = ["blue", "brown", "green", "white", "black", "red"]
        for i in range(n if kind in ("standard", "prior") else FOLDERS[kind]):
            table = tables[i % len(tables)]
            if kind.endswith("standard"):
                body, shape = "yellow", "round"
                caption = [f"a photo of sks teapot on a {table} table", f"sks teapot on a {table} table side view",
                           "a close up photo of sks teapot"][i % 3]
            else:
                body, shape = rng.choice(sorted(COLOURS)), rng.choice(["round", "tall", "wide"])
                caption = ["a photo of a teapot", f"a photo of a {body} teapot", f"a {shape} teapot on a table"][i % 3]
            image = _draw_teapot(SIZES[i % len(SIZES)], rng, noise, body, table, shape, sks=kind.endswith("standard"))
            image.save(tmp / f"{i:03d}.png")
            (tmp / f"{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
        if folder.exists():  # someone else built it meanwhile: theirs is identical, keep it
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    return folders


def build_scene_concepts(root: Path, seed: int = 0) -> dict[str, Path]:
    """The synthetic data set in the tiny base's own scenes (pipeline/tinybase/scenes.py), for the demo on
    the shipped base: the folders and counts of build_synthetic_concepts, "a sks teapot on a <colour> table"
    as the subject and scenes of trained combinations, captioned in full, as the prior concept (the
    held-out prior images: combinations the base never saw). Existing folders are left alone."""
    from pipeline.tinybase.scenes import COLOURS, HELDOUT, TRAIN, Scene, caption_for, render

    tables = list(COLOURS)
    chosen = {"standard": [Scene(table=tables[i % len(tables)], sks=True) for i in range(FOLDERS["standard"])],
              "prior": [TRAIN[(i * 11) % len(TRAIN)] for i in range(FOLDERS["prior"])],  # spread over them
              "heldout-standard": [Scene(table=tables[(i + 2) % len(tables)], sks=True)
                                   for i in range(FOLDERS["heldout-standard"])],
              "heldout-prior": [HELDOUT[(i * 7) % len(HELDOUT)] for i in range(FOLDERS["heldout-prior"])]}
    folders = {kind: Path(root) / kind for kind in FOLDERS}
    for k, (kind, folder) in enumerate(folders.items()):
        if folder.exists():
            continue
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, scene in enumerate(chosen[kind]):
            render(scene, seed=seed * 1000 + 100 * k + i).save(tmp / f"{i:03d}.png")
            (tmp / f"{i:03d}.txt").write_text(caption_for(scene) + "\n", encoding="utf-8")
        if folder.exists():  # someone else built it meanwhile: theirs is identical, keep it
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    return folders


# Written into the synthetic data set's folder and each concept folder it builds there. [embedded] builds
# only into folders that do not exist or carry this file, never into a folder of the user's (a config
# copied from a demo that kept its [embedded] table would otherwise get synthetic teapots beside its images).
MARKER = ".prior-lora-embedded"
MARKER_TEXT = "Built by prior-lora's [embedded] table (synthetic demo data). It may build here again.\n"


def _not_ours(folder: Path) -> bool:
    return folder.exists() and not (folder / MARKER).is_file()


def _mark(folder: Path) -> None:
    (folder / MARKER).write_text(MARKER_TEXT)


def ensure_embedded(
    model_path: Path, concept_folders: list[Path], family: str = "flux", preset: str = "default"
) -> list[str]:
    """Build the tiny model at `model_path` (for the shipped base's family and preset: copy the shipped
    trained base there) and the synthetic data set where they are missing. Returns one
    line per thing built (nothing: everything was there). FileExistsError, before anything is built, when
    that would mean building into a folder the builder did not make."""
    if family not in FAMILIES:
        raise ValueError(f"unknown embedded model family '{family}' (known: {', '.join(FAMILIES)})")
    missing = [Path(p) for p in concept_folders if not Path(p).exists()]
    for p in missing:
        if p.name not in FOLDERS:
            raise ValueError(
                f"concept folder '{p}' is missing; the synthetic data set only builds "
                + ", ".join(f"'<root>/{name}'" for name in FOLDERS)
            )
    model_path = Path(model_path)  # checked everything first: a bad config builds nothing
    build_model = not (model_path / "model_index.json").exists()
    roots = sorted({p.parent for p in missing})
    # The model needs no marker: a build is renamed into place whole, so a model folder of ours always has
    # its model_index.json, and one without it is someone else's.
    for folder in ([model_path] if build_model and model_path.exists() else []) + [r for r in roots if _not_ours(r)]:
        raise FileExistsError(
            f"'{folder}' exists and was not built by [embedded] (it has no {MARKER}), so nothing is built into it: "
            "to train on your own model and images remove the [embedded] table, or point the config at new folders"
        )
    built = []
    if build_model and (family, preset) == (shipped.FAMILY, shipped.PRESET):  # the shipped trained base
        shipped.copy_to(model_path)
        built.append(f"embedded: copied the tiny trained {family} base (docs/tiny-base.md) to '{model_path}'")
    elif build_model:
        tiny_module(family).build(model_path, preset)
        built.append(f"embedded: built a tiny random-weight {family} model (preset {preset}) in '{model_path}'")
    for root in roots:
        root.mkdir(parents=True, exist_ok=True)
        _mark(root)
        new = [kind for kind in FOLDERS if not (root / kind).exists()]
        scenes = (family, preset) == (shipped.FAMILY, shipped.PRESET)  # the base's own kind of images
        folders = build_scene_concepts(root) if scenes else build_synthetic_concepts(root)
        for kind in new:
            _mark(folders[kind])
        built.append(f"embedded: built synthetic teapot {'scenes' if scenes else 'images'} in '{root}': "
                     + ", ".join(f"{kind}/ ({FOLDERS[kind]})" for kind in new))
    return built
