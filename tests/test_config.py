"""Bad configs: each gives a one-line error naming the key or path, and exit code 2 from the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import changed_keys, check_paths, load_config
from pipeline.errors import UserError

GOOD = """
[model]
path = "model"
[[concepts]]
folder = "a"
[[concepts]]
folder = "b"
type = "prior"
"""


@pytest.fixture
def project(tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    return tmp_path


def _write(root: Path, text: str) -> Path:
    path = root / "c.toml"
    path.write_text(text)
    return path


def test_resolutions_replace_resolution_which_reads_as_the_largest(project):
    cfg = load_config(_write(project, GOOD + "\n[data]\nresolutions = [768, 1024, 512]\n"))
    assert cfg.data.resolutions == [768, 1024, 512] and cfg.data.resolution == 1024


def test_good_config_resolves_paths_against_its_folder(project):
    cfg = load_config(_write(project, GOOD))
    assert cfg.model.path == str(project / "model")
    assert cfg.concepts[1].folder == str(project / "b") and cfg.concepts[1].type == "prior"
    assert cfg.train.dtype == "bf16"
    assert load_config(_write(project, GOOD), dtype="fp32").train.dtype == "fp32"
    check_paths(cfg)


CASES = [
    (GOOD + "\n[train]\nlearning_rate = 1e-4\n", "unknown config key 'train.learning_rate'"),
    (GOOD + "\n[trian]\ndtype = 'bf16'\n", "unknown config key 'trian'"),
    (GOOD + "\n[train]\nbatch_size = 'two'\n", "config key 'train.batch_size' must be int"),
    (GOOD + "\n[train]\ndtype = 'fp8'\n", "config key 'train.dtype' must be one of bf16, fp16, fp32"),
    (GOOD + "\n[lora]\nrank = 0\n", "config key 'lora.rank' must be > 0"),
    (GOOD + "\n[cache]\nsegment_mb = -1\n", "config key 'cache.segment_mb' must be >= 0"),
    (GOOD + "\n[cache]\nsegment_seconds = 0\n", "config key 'cache.segment_seconds' must be > 0"),
    (GOOD + "\n[lora]\ntargets = 'mlp'\n", "config key 'lora.targets' must be one of attention, attention_mlp, all_linear"),
    (GOOD + "\n[lora]\ntarget_regex = 'to_(q'\n", "config key 'lora.target_regex' is not a valid regular expression"),
    (GOOD + "\n[train]\nlora_format = 'comfy'\n", "config key 'train.lora_format' must be one of diffusers, kohya"),
    (GOOD.replace('type = "prior"', 'type = "regularization"'), "config key 'concepts[1].type' must be one of"),
    (GOOD + "\n[data]\non_missing_caption = 'skip'\n", "config key 'data.on_missing_caption' must be one of warn, fail"),
    (GOOD + "\n[data]\nauto_hold_out = 1.0\n", "config key 'data.auto_hold_out' must be a share from 0"),
    (GOOD + "\n[data]\nauto_hold_out = -0.1\n", "config key 'data.auto_hold_out' must be a share"),
    ("[[concepts]]\nfolder = 'a'\n", "missing config key 'model'"),
    ("[model\npath=1", "not valid TOML"),
    (GOOD + "\n[data]\nresolution = 512\nresolutions = [512, 768]\n",
     "config keys 'data.resolution' and 'data.resolutions' exclude each other"),
    (GOOD + "\n[data]\nresolutions = [512, 0]\n", "config key 'data.resolutions[1]' must be > 0"),
    (GOOD + "\n[data]\nresolutions = [512, 512]\n", "config key 'data.resolutions' lists a resolution twice"),
    (GOOD + "\n[data]\nkeep_tokens = -1\n", "config key 'data.keep_tokens' must be >= 0"),
    (GOOD + "\n[train]\nema_decay = 1.0\n", "config key 'train.ema_decay' must be at least 0 and below 1"),
]


@pytest.mark.parametrize("text,message", CASES)
def test_bad_values(project, text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_config(_write(project, text))
    assert "\n" not in str(e.value) and "c.toml" in str(e.value)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.replace('folder = "a"', 'folder = "nope"'), "concepts[0].folder: '{root}/nope' does not exist"),
        (lambda t: t.replace('folder = "a"', 'folder = "empty"'), "concepts[0].folder: '{root}/empty' has no images"),
        (lambda t: t.replace('path = "model"', 'path = "no/such/dir/model"'), "model.path: '{root}/no/such/dir/model' does not exist"),
    ],
)
def test_bad_paths(project, edit, message):
    cfg = load_config(_write(project, edit(GOOD)))
    with pytest.raises(UserError) as e:
        check_paths(cfg)
    assert message.format(root=project) in str(e.value)


@pytest.mark.slow
def test_cli_exit_code_2_and_one_line(project):
    path = _write(project, GOOD + "\n[train]\nlearning_rate = 1e-4\n")
    for stage in ("cache", "train"):
        r = subprocess.run([sys.executable, "-m", "pipeline", stage, "--config", str(path)], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and "train.learning_rate" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", str(project / "missing.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing.toml' does not exist" in r.stderr


@pytest.mark.slow
def test_help_documents_every_option():
    for stage in ("cache", "train"):
        r = subprocess.run([sys.executable, "-m", "pipeline", stage, "--help"], capture_output=True, text=True)
        assert r.returncode == 0
        for opt in ("--config", "--dtype", "--quiet"):
            assert opt in r.stdout


def test_devices_and_embedded_settings_are_checked(project):
    with pytest.raises(UserError, match="config key 'train.device' must be auto, cpu, mps, cuda or cuda:N"):
        load_config(_write(project, GOOD + "\n[train]\ndevice = 'gpu'\n"))
    with pytest.raises(UserError, match="config key 'embedded.family' must be one of flux"):
        load_config(_write(project, GOOD + "\n[embedded]\nfamily = 'sd15'\n"))


def test_portable_config_has_no_absolute_paths(project):
    cfg = load_config(_write(project, GOOD))
    text = cfg.portable_json()
    assert str(project) not in text and '"folder": "a"' in text


def test_a_hub_id_without_network_says_to_download_it(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from pipeline.families.load import resolve_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine with no network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # and nothing downloaded
    with pytest.raises(UserError) as e:
        resolve_model("black-forest-labs/FLUX.1-dev")
    message = str(e.value)
    assert "\n" not in message and "model.path" in message
    assert "hf download black-forest-labs/FLUX.1-dev --local-dir DIR" in message and 'model.path = "DIR"' in message


def test_a_key_added_since_a_checkpoint_was_written_is_compared_as_its_default():
    # a checkpoint written before train.ema existed trained as ema = false: resuming it with the default goes on
    assert changed_keys({"train": {"lr": 1}}, {"train": {"lr": 1, "ema": False}}, ("train.",)) == []
    assert changed_keys({"train": {}}, {"train": {"ema": True}}, ("train.",)) == ["train.ema false -> true"]
    assert changed_keys({"concepts": [{"folder": "a"}]}, {"concepts": [{"folder": "a", "repeats": 1}]}, ("concepts",)) == []
    assert changed_keys({}, {"model": {"path": "m"}}, ("model.",)) == ['model.path (absent) -> "m"']  # no default
