"""Training and inputs a user can trust: a non-finite loss stops the run in one line with nothing written
after it; config values that are not finite or overflow, a BOM, `~` and `$VARS`; captions over the limit,
extreme aspect ratios, pickle weights and a damaged fingerprint memo; Ctrl-C after the LoRA is written; a
damaged prior stops training before any step trains on it."""

import json
import re
import shutil
import subprocess
import sys

import h5py
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cache.maintenance import verify
from pipeline.cache.stage import run_cache
from pipeline.store.store import Store
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.data.plan import make_plan
from pipeline.train.stage import run_train

from conftest import configure


@pytest.mark.e2e
def test_a_non_finite_loss_stops_training_at_once(project, monkeypatch):
    path, _ = project(max_steps=6)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    family = type(make_plan(cfg).family)
    real, calls = family.predict, {"n": 0}

    def nan_from_step_3(self, *args, **kwargs):  # one forward per step (cached priors, nothing to validate)
        if args[1].device.type == "meta":  # the memory planner's dry run at the start: not a forward
            return real(self, *args, **kwargs)
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(family, "predict", nan_from_step_3)
    with pytest.raises(UserError) as e:
        run_train(cfg, progress=False)
    message = str(e.value)
    assert "training stopped at step 3: the loss nan is not finite" in message and "\n" not in message
    assert "step-00000002" in message and ".png'" in message  # the last good checkpoint, the batch's images
    out = project.root / "out"
    assert not (out / cfg.train.lora_name).exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.parametrize("line,message", [
    ("lr = nan", "config key 'optimizer.lr' must be a finite number, got nan"),
    ("lr = inf", "config key 'optimizer.lr' must be a finite number, got inf"),
    ("lr = 1e400", "config key 'optimizer.lr' must be a finite number, got inf"),
    ("weight_decay = -inf", "config key 'optimizer.weight_decay' must be a finite number, got -inf"),
])
def test_values_that_are_not_finite_are_one_line(project, line, message):
    path, _ = project()
    good = path.read_text()
    path.write_text(re.sub(r"^lr = .*$", "", good, flags=re.M).replace("[optimizer]\n", f"[optimizer]\n{line}\n"))
    with pytest.raises(UserError, match=message):
        load_config(path)
    path.write_text(good.replace("[train]\n", "[train]\nseed = 9223372036854775808\n"))
    with pytest.raises(UserError, match="config key 'train.seed' is out of range"):
        load_config(path)


def test_bom_home_and_environment_variables_in_paths(project, monkeypatch, tmp_path):
    path, cfg = project()
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # the UTF-8 BOM some Windows editors write
    assert load_config(path).cache.dir == cfg.cache.dir
    monkeypatch.setenv("PRIOR_LORA_TEST_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    text = path.read_text(encoding="utf-8-sig")
    path.write_text(text.replace(f'dir = "{cfg.cache.dir}"', 'dir = "${PRIOR_LORA_TEST_CACHE}/cache"')
                    .replace(f'output_dir = "{cfg.train.output_dir}"', 'output_dir = "~/runs/a"'))
    loaded = load_config(path)
    assert loaded.cache.dir == str(tmp_path / "elsewhere" / "cache")
    assert loaded.train.output_dir == str(tmp_path / "home" / "runs" / "a")
    path.write_text(path.read_text().replace("${PRIOR_LORA_TEST_CACHE}", "$PRIOR_LORA_UNSET_VARIABLE"))
    with pytest.raises(UserError, match=r"config key 'cache.dir': .* uses \$PRIOR_LORA_UNSET_VARIABLE, which is not set"):
        load_config(path)


@pytest.mark.e2e
def test_long_captions_and_extreme_aspect_ratios_are_skipped_by_name(project, capsys):
    _, cfg = project()
    data = project.root / "data" / "standard"
    (data / "000.txt").write_text("s" * 10_400)
    Image.new("RGB", (1, 1_000_000), (128, 128, 128)).save(data / "strip.png")  # 1 x 1,000,000 px
    summary = run_cache(cfg, progress=False)
    skipped = "\n".join(summary["skipped_images"])
    assert "000.png: caption file '000.txt' has 10,400 characters, over the limit of 10,000" in skipped
    assert "strip.png: its aspect ratio (1x1000000) is too extreme for any bucket" in skipped
    assert summary["samples"] == 15 and run_train(cfg, progress=False)["steps"] > 0
    assert "warning: skipping" in capsys.readouterr().err


def test_pickle_weights_are_refused_and_a_damaged_fingerprint_memo_is_rebuilt(project, tiny_assets):
    model = project.root / "model"
    shutil.copytree(tiny_assets / "model", model)
    _, cfg = project(model=model)
    memo = project.root / "cache" / "fingerprints.json"
    memo.parent.mkdir(parents=True)
    for damage in ("{not json", "[1, 2]", '{"x": 5}'):
        memo.write_text(damage)
        assert make_plan(cfg).denoiser_fp == make_plan(cfg).denoiser_fp  # rebuilt, same fingerprints
    assert isinstance(json.loads(memo.read_text()), dict)
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UserError, match=r"model.path: '.*transformer/diffusion_pytorch_model.bin' holds pickle weights"):
        make_plan(cfg)


@pytest.mark.e2e
def test_ctrl_c_after_the_lora_is_written_says_so(project, monkeypatch):
    path, cfg = project(max_steps=1)
    run_cache(cfg, progress=False)
    import pipeline.plot

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.plot, "plot_run", interrupted)
    r = CliRunner().invoke(main, ["train", "--config", str(path), "--quiet"])
    assert r.exit_code == 130
    lora = project.root / "out" / cfg.train.lora_name
    assert lora.is_file()
    assert f"interrupted: the LoRA was already written to '{lora}' (after step 1)" in r.stderr


@pytest.mark.e2e
def test_a_torn_metrics_line_and_leftover_temporaries_do_not_stop_a_resume(project):
    path, _ = project(max_steps=4)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    out = project.root / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no process has now: what a killed save leaves behind
    leftovers = [out / "checkpoints" / f".tmp-step-00000003-{dead.pid}", out / f".{cfg.train.lora_name}.{dead.pid}.tmp"]
    leftovers[0].mkdir()
    leftovers[1].write_bytes(b"half a file")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.3')  # torn by a kill in mid-write
    longer = configure(path, train={"checkpoint_every": 2, "max_steps": 6})
    summary = run_train(longer, progress=False, resume=True)
    assert summary["steps"] == 6 and summary["resumed_from_step"] == 4  # the 4-step run's last checkpoint
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == list(range(6))
    assert not any(p.exists() for p in leftovers)


@pytest.mark.e2e
def test_a_damaged_prior_stops_training_before_it_is_trained_on(project):
    path, cfg = project(dtype="fp32", max_steps=4)
    run_cache(cfg, progress=False)
    store = Store(cfg.cache.dir)
    segment = {store.segment_of("prior/fp32", k) for k in store.keys("prior/fp32")}.pop()
    store.close()
    with h5py.File(segment, "r+") as f:  # finite wrong values written into every prior of that file
        keys = list(f)
        for key in keys:
            f[key]["prediction"][0, 0, 0] += 1.0

    r = CliRunner().invoke(main, ["train", "--config", str(path), "--quiet"])
    assert r.exit_code == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cache entry prior/fp32/") and f"in '{segment}' is damaged" in line
    assert line.split("/")[2].split(" ")[0] in keys and "cache verify --repair" in line
    assert not (project.root / "out" / cfg.train.lora_name).exists()
    assert verify(cfg, repair=True)["repaired"] == len(keys)
    assert CliRunner().invoke(main, ["train", "--config", str(path), "--quiet"]).exit_code == 0
