"""Odd caption files: a NUL byte is skipped by name (HDF5 strings cannot hold one; caching ended in a
traceback naming no file), a UTF-8 byte-order mark is not part of the caption, a caption link that
dangles or loops is named in a warning instead of silently giving the default caption, and images with no
caption file are one warning naming the first few and counting all (or, with data.on_missing_caption =
"fail", a one-line error); the cache summary counts them."""

import os

import pytest

from pipeline.config import ConceptConfig
from pipeline.data.images import BadImage, scan_concept
from pipeline.data.plan import make_plan
from pipeline.errors import UserError

from conftest import configure


def _concept(tmp_path, captions: dict[str, bytes]) -> ConceptConfig:
    for stem, text in captions.items():
        (tmp_path / f"{stem}.png").write_bytes(b"")  # the scan reads names and captions, not pixels
        if text is not None:
            (tmp_path / f"{stem}.txt").write_bytes(text)
    return ConceptConfig(folder=str(tmp_path), default_caption="a teapot")


def test_a_nul_byte_is_a_bad_caption_and_a_bom_is_not_part_of_it(tmp_path):
    found = dict(scan_concept(_concept(tmp_path, {"bom": "\ufeffa red teapot\n".encode(), "nul": b"a tea\x00pot"}), 0))
    assert found[tmp_path / "bom.png"] == "a red teapot"
    bad = found[tmp_path / "nul.png"]
    assert isinstance(bad, BadImage) and "caption file 'nul.txt' holds a NUL byte" in str(bad)


def test_a_caption_link_that_dangles_or_loops_is_named(tmp_path, capsys):
    concept = _concept(tmp_path, {"dangling": None, "looping": None})
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "dangling.txt")
    os.symlink(tmp_path / "looping.txt", tmp_path / "looping.txt")
    found = dict(scan_concept(concept, 0))
    assert found[tmp_path / "dangling.png"] == found[tmp_path / "looping.png"] == "a teapot"
    err = capsys.readouterr().err
    assert f"caption file '{tmp_path / 'dangling.txt'}' is a link to no file (it dangles)" in err
    assert f"caption file '{tmp_path / 'looping.txt'}' is a link to no file (it loops)" in err
    assert err.count("warning: ") == 2


def test_a_nul_caption_leaves_its_image_out_by_name(project):
    path, _ = project()
    (project.root / "data" / "standard" / "000.txt").write_bytes(b"a photo of sks\x00 teapot")
    plan = make_plan(configure(path))
    assert any(s.startswith(f"{project.root / 'data' / 'standard' / '000.png'}: caption file '000.txt' holds a NUL")
               for s in plan.skipped)
    assert all(s.path.name != "000.png" or s.concept != 0 for s in plan.samples)


def _drop_captions(project, names: dict[str, list[str]]) -> list:
    removed = []
    for folder, stems in names.items():
        for stem in stems:
            (project.root / "data" / folder / f"{stem}.txt").unlink()
            removed.append(project.root / "data" / folder / f"{stem}.png")
    return removed


def test_missing_captions_are_one_warning_naming_the_first_and_counting(project, capsys):
    path, _ = project()
    removed = _drop_captions(project, {"standard": ["000", "001", "002", "003"], "prior": ["005"]})
    plan = make_plan(configure(path))
    lines = [x for x in capsys.readouterr().err.splitlines() if "no caption file" in x]
    assert len(lines) == 1, lines  # one warning for all, not a line per image
    assert lines[0].startswith("warning: 5 image(s) have no caption file and train with an empty caption: ")
    assert all(f"'{p}'" in lines[0] for p in removed[:3]) and str(removed[3]) not in lines[0]
    assert "and 2 more" in lines[0]
    assert sorted(plan.missing_captions) == sorted(map(str, removed))
    assert all(s.caption == "" for s in plan.samples if s.path in removed)


def test_missing_captions_fail_in_one_line_naming_the_first(project):

    path, _ = project()
    removed = _drop_captions(project, {"standard": ["000", "001", "002"]})
    with pytest.raises(UserError) as e:
        make_plan(configure(path, data={"on_missing_caption": "fail"}))
    message = str(e.value)
    assert "\n" not in message and f"image '{removed[0]}' has no caption file ('000.txt')" in message
    assert "and 2 more image(s) have none" in message and "default_caption" in message


def test_a_default_caption_fills_in_without_a_warning(project, capsys):
    path, _ = project()
    removed = _drop_captions(project, {"standard": ["000"]})
    plan = make_plan(configure(path, concepts={"default_caption": "a photo of sks teapot"},
                               data={"on_missing_caption": "fail"}))
    assert "no caption file" not in capsys.readouterr().err and plan.missing_captions == []
    assert [s.caption for s in plan.samples if s.path == removed[0]] == ["a photo of sks teapot"]


@pytest.mark.e2e
def test_the_cache_summary_counts_missing_captions(project):
    from pipeline.cache.stage import run_cache

    path, _ = project()
    _drop_captions(project, {"standard": ["000"], "prior": ["001"]})
    assert run_cache(configure(path), progress=False)["missing_captions"] == 2
