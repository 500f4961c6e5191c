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
