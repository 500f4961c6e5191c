"""What planning says about the data once, not once per image: a data set of small images gets one
warning that names the first and counts the rest (100,000 upscaled images printed 100,000 lines)."""

from pipeline.data.plan import make_plan

from conftest import configure


def test_upscaled_images_are_one_warning_with_a_count(project, capsys):
    path, _ = project()
    plan = make_plan(configure(path, data={"resolution": 128}))  # every synthetic image is under 128 px
    lines = [x for x in capsys.readouterr().err.splitlines() if "upscaled" in x]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: '") and "smaller than its 128x128 bucket: upscaled" in lines[0]
    assert f"(and {len(plan.samples) - 1} more image(s) smaller than their bucket)" in lines[0]


def more_priors(project, total: int) -> None:
    """The prior folder grown to `total` images: copies of its 8 with one pixel changed (other content)."""
    from PIL import Image

    folder = project.root / "data" / "prior"
    originals = sorted(folder.glob("*.png"))
    for n in range(len(originals), total):
        with Image.open(originals[n % len(originals)]) as im:
            im = im.convert("RGB")
        im.putpixel((0, 0), (n, 255 - n, n // 2))
        im.save(folder / f"{n:03d}.png")
        (folder / f"{n:03d}.txt").write_text(f"a photo of a teapot, number {n}")


def held_out(plan) -> list:
    return [s for s in plan.samples if s.validation]


def test_auto_hold_out_holds_out_prior_images_by_content_and_says_so(project, capsys):
    import shutil

    path, _ = project()
    more_priors(project, 20)
    plan = make_plan(configure(path))
    out = held_out(plan)
    assert len(out) == 2 and all(s.prior and s.concept == 1 for s in out)  # 5% of 20, at least 2
    assert len([s for s in plan.training if s.prior]) == 18 and plan.held_out == out
    notes = [x for x in capsys.readouterr().err.splitlines() if "auto_hold_out" in x]
    assert notes == [f"data.auto_hold_out: held out 2 of the 20 images of concepts[1] ('{project.root / 'data' / 'prior'}') "
                     "to score prior drift; they are not trained on (data.auto_hold_out = 0 trains on all)"]

    # chosen by content, not by name or listing order: renamed, the same images (and keys) are held out
    folder = project.root / "data" / "prior"
    renamed = folder.parent / "renamed"
    renamed.mkdir()
    for p in sorted(folder.iterdir()):
        shutil.copy(p, renamed / f"z{99 - int(p.stem):03d}{p.suffix}")
    again = make_plan(_with_prior_folder(path, renamed))
    assert sorted(s.content_key for s in held_out(again)) == sorted(s.content_key for s in out)
    assert {s.noise_keys for s in held_out(again)} == {s.noise_keys for s in out}

    # a larger share, and 0 turns it off
    assert len(held_out(make_plan(configure(path, data={"auto_hold_out": 0.25})))) == 5
    assert held_out(make_plan(configure(path, data={"auto_hold_out": 0}))) == []


def _with_prior_folder(path, folder):
    from pipeline.config import load_config

    text = path.read_text().replace(str(path.parent / "data" / "prior"), str(folder))
    path.write_text(text)
    return load_config(path)


def test_auto_hold_out_leaves_small_prior_concepts_and_given_held_out_images_alone(project, capsys):
    path, _ = project()
    assert held_out(make_plan(configure(path))) == []  # 8 prior images: 2 out would leave 6 to train on
    more_priors(project, 11)
    assert held_out(make_plan(configure(path))) == []  # 9 would be left: under 10
    more_priors(project, 12)
    assert len(held_out(make_plan(configure(path)))) == 2
    capsys.readouterr()
    # held-out prior images in the config: nothing is held out of the prior concept
    path.write_text(path.read_text().replace("[cache]", f'[[concepts]]\nfolder = "{project.root}/data/heldout-prior"\n'
                                             'type = "validation"\nprior = true\n\n[cache]', 1))
    plan = make_plan(configure(path))
    assert all(s.concept == 2 for s in held_out(plan)) and len(held_out(plan)) == 2
    assert "auto_hold_out" not in capsys.readouterr().err


def test_a_prior_concept_with_the_subjects_images_and_captions_is_refused(project):
    import shutil

    import pytest

    from pipeline.errors import UserError

    path, _ = project()
    copy = project.root / "data" / "copy"
    shutil.copytree(project.root / "data" / "standard", copy)  # the same bytes and captions, another folder
    with pytest.raises(UserError) as e:
        make_plan(_with_prior_folder(path, copy))
    message = str(e.value)
    assert "\n" not in message and f"concepts[1] (type = \"prior\", folder '{copy}')" in message
    assert f"concepts[0] (folder '{project.root / 'data' / 'standard'}')" in message
    # the same images with the prior's own captions are a choice, not a contradiction: not refused
    for caption in copy.glob("*.txt"):
        caption.write_text("a photo of a teapot")
    make_plan(_with_prior_folder(path, copy))
