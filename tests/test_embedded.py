"""The [embedded] table builds the demo's tiny model and synthetic images only into folders that do not
exist or that it built itself (tiny.MARKER), never into a user's, and says on stderr what it built."""

import shutil

import pytest
from click.testing import CliRunner

from pipeline import tiny
from pipeline.cache.stage import ensure_embedded
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError

CONFIG = """
[embedded]
family = "flux"

[model]
path = "{model}"
max_sequence_length = 32

[data]
resolution = 64

[[concepts]]
folder = "{data}/standard"

[[concepts]]
folder = "{data}/prior"
type = "prior"

[cache]
dir = "{root}/cache"
"""


def write(root, model, data):
    path = root / "embedded.toml"
    path.write_text(CONFIG.format(model=model, data=data, root=root))
    return path


@pytest.mark.e2e
def test_a_users_concept_folder_is_never_built_into(tiny_assets, tmp_path):
    mine = tmp_path / "data" / "standard"  # the user's images; their prior folder is not there yet
    mine.mkdir(parents=True)
    shutil.copy(next((tiny_assets / "data" / "standard").glob("*.png")), mine / "me.png")
    path = write(tmp_path, tmp_path / "model", tmp_path / "data")
    r = CliRunner().invoke(main, ["cache", "--config", str(path)])
    assert r.exit_code == 2 and r.stderr.strip().count("\n") == 0, r.output
    assert f"[embedded]: '{tmp_path / 'data'}' exists and was not built by [embedded]" in r.stderr
    assert "remove the [embedded] table" in r.stderr
    # refused before anything was built: no teapots beside the user's images, no model
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["standard"]
    assert sorted(p.name for p in mine.iterdir()) == ["me.png"] and not (tmp_path / "model").exists()


def test_an_existing_folder_at_model_path_is_never_built_into(tmp_path):
    (tmp_path / "model").mkdir()  # e.g. where the user means to download a model
    with pytest.raises(FileExistsError, match="was not built by \\[embedded\\]"):
        tiny.ensure_embedded(tmp_path / "model", [tmp_path / "data" / "standard"])
    assert not any((tmp_path / "model").iterdir()) and not (tmp_path / "data").exists()


def test_a_hub_id_with_an_embedded_table_is_refused(tmp_path):
    path = write(tmp_path, "black-forest-labs/FLUX.1-dev", tmp_path / "data")
    with pytest.raises(UserError, match="model.path 'black-forest-labs/FLUX.1-dev' is a hub id"):
        ensure_embedded(load_config(path))
    assert not (tmp_path / "black-forest-labs").exists() and not (tmp_path / "data").exists()


def test_it_says_what_it_built_and_rebuilds_only_in_its_own_folders(tiny_assets, tmp_path, capsys):
    data = tmp_path / "data"
    cfg = load_config(write(tmp_path, tiny_assets / "model", data))  # the model exists: only data is built
    ensure_embedded(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"embedded: built synthetic teapot images in '{data}': standard/ (8), prior/ (8), "
                   "heldout-standard/ (2), heldout-prior/ (2)"]
    assert all((folder / tiny.MARKER).is_file() for folder in [data, *(p for p in data.iterdir() if p.is_dir())])
    assert len(list((data / "prior").glob("*.png"))) == 8  # the marker is no image: nothing else changes

    ensure_embedded(cfg)
    assert capsys.readouterr().err == ""  # everything there: nothing built, nothing said
    shutil.rmtree(data / "prior")
    ensure_embedded(cfg)  # a folder of its own data set is rebuilt
    assert capsys.readouterr().err.strip() == f"embedded: built synthetic teapot images in '{data}': prior/ (8)"


def test_it_says_when_it_builds_the_model(tmp_path):
    built = tiny.ensure_embedded(tmp_path / "model", [])
    assert built == [f"embedded: built a tiny random-weight flux model (preset default) in '{tmp_path / 'model'}'"]
    assert tiny.ensure_embedded(tmp_path / "model", []) == []
