"""Odd caption files: a NUL byte is skipped by name (HDF5 strings cannot hold one; caching ended in a
traceback naming no file), a UTF-8 byte-order mark is not part of the caption, and a caption link that
dangles or loops is named in a warning instead of silently giving the default caption."""

import os

from pipeline.config import ConceptConfig
from pipeline.data.images import BadImage, scan_concept
from pipeline.data.plan import make_plan

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
