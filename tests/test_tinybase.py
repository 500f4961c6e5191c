"""The tiny base's scenes and judge (pipeline/tinybase): the split, captions, determinism, and the judge
reading every rendered ground truth right."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipeline.tinybase import judge, scenes
from pipeline.tinybase.scenes import COLOURS, SHAPES, Scene


def test_split_holds_out_combinations_whose_parts_are_all_trained():
    assert len(scenes.COMBOS) == 108 and len(scenes.HELDOUT) == 18 and len(scenes.TRAIN) == 90
    assert not set(scenes.HELDOUT) & set(scenes.TRAIN)
    for a, b in [("body", "shape"), ("body", "table"), ("shape", "table")]:
        pairs = {(getattr(c, a), getattr(c, b)) for c in scenes.TRAIN}
        assert len(pairs) == len({(getattr(c, a), getattr(c, b)) for c in scenes.COMBOS}), (a, b)


def test_captions_round_trip_also_partial_and_sks():
    for c in scenes.COMBOS:
        assert scenes.parse(scenes.caption_for(c)) == c
    assert scenes.caption_for(Scene("red", "tall", "blue")) == "a red tall teapot on a blue table"
    assert scenes.caption_for(Scene(body="red")) == "a red teapot"
    assert scenes.parse("a photo of a teapot") == Scene()
    assert scenes.parse("a tall teapot on a green table") == Scene(None, "tall", "green")
    assert scenes.parse(scenes.caption_for(Scene(table="black", sks=True))) == Scene(table="black", sks=True)


def test_render_is_deterministic_and_draws_what_a_caption_leaves_open():
    a, b = scenes.render("a red teapot", seed=3), scenes.render("a red teapot", seed=3)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()
    assert scenes.render("a red teapot", seed=4).tobytes() != a.tobytes()
    filled = scenes.attrs_of("a red teapot", seed=3)
    assert filled.body == "red" and filled.shape in SHAPES and filled.table in COLOURS
    assert judge.read(a) == filled


def test_judge_reads_every_rendered_combination():
    wrong = [(c, seed, judge.read(scenes.render(c, seed=seed)))
             for c in scenes.COMBOS for seed in range(3)]
    wrong = [w for w in wrong if w[0] != w[2]]
    assert wrong == []
    for table in COLOURS:  # the concept teapot reads as what it is made of: yellow and round
        assert judge.read(scenes.render(Scene(table=table, sks=True), seed=1)) == Scene("yellow", "round", table)


def test_judge_survives_blur_and_judges_only_what_the_caption_names():
    c = Scene("purple", "wide", "yellow")
    image = scenes.render(c, seed=5).filter(ImageFilter.GaussianBlur(1.5))  # as a decoder's output is soft
    assert judge.read(image) == c
    assert judge.matches(image, "a purple wide teapot on a yellow table")
    assert judge.matches(image, "a photo of a teapot") and judge.matches(image, "a wide teapot")
    for wrong in ["a red teapot", "a tall teapot", "a purple wide teapot on a blue table"]:
        assert not judge.matches(image, wrong), wrong


@pytest.mark.parametrize("table", ["red", "black"])
def test_judge_finds_no_teapot_on_a_bare_wall(table):
    px = np.asarray(scenes.render(Scene("blue", "round", table), seed=0)).copy()
    px[: scenes.TABLE_TOP] = 180
    seen = judge.read(Image.fromarray(px))
    assert seen == Scene(None, None, table)
    assert not judge.matches(Image.fromarray(px), "a teapot") and not judge.matches(Image.fromarray(px), "a blue teapot")
