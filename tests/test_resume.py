"""Checkpoints and resume: a run interrupted at step k and run again (no flag: it goes on from its newest
checkpoint) ends with a LoRA (and its EMA, train.ema) bitwise equal to an uninterrupted run's (CPU, same
config), with LoRA dropout on, so the RNG state is part of the test, and with online priors, which draw
afresh every step; a finished run made longer goes on
from its last step, which is checkpointed, to the LoRA of an uninterrupted longer run; run again as it
is, it has nothing to do."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.train import step as train_step_module
from pipeline.train.stage import run_train

from conftest import configure

pytestmark = pytest.mark.e2e


def _config(project, name, out, kind="lora"):
    # "lora-online": train.prior_mode = "online", whose prior samples draw afresh every step
    kind, _, mode = kind.partition("-")
    path, _ = project(name=name, out=out, epochs=3, dtype="fp32", prior_mode=mode or "cached")
    text = path.read_text()
    text = text.replace("[train]\n", "[train]\ncheckpoint_every = 5\nkeep_checkpoints = 2\nema = true\nema_decay = 0.9\n")
    # validation in between steps must not change the run: held-out images and a prompt, every 4 steps
    held_out = f'[[concepts]]\nfolder = "{project.root}/data/heldout-prior"\ntype = "validation"\nprior = true\n\n'
    text = text.replace("[cache]\n", held_out + "[cache]\n")
    text += '\n[validation]\nprompts = ["a photo of sks teapot"]\nevery = 4\nsteps = 1\n'

    # a LoRA with dropout; a LoKr (which has none) draws from the RNG too: its module dropout's coin
    lora = "dropout = 0.1" if kind == "lora" else f'type = "{kind}"'
    text = text.replace("[lora]\n", f"[lora]\n{lora}\n").replace("[optimizer]\n", '[optimizer]\nscheduler = "cosine"\nwarmup_steps = 3\n')
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("kind", ["lora", "lokr", "lora-online"])
def test_interrupted_and_run_again_equals_uninterrupted(project, monkeypatch, capsys, kind):
    full = _config(project, "full.toml", project.root / "full", kind)
    run_cache(full, progress=False)
    summary = run_train(full, progress=False)
    expected, expected_ema = load_file(summary["lora"]), load_file(summary["lora_ema"])
    expected_metrics = [json.loads(x) for x in open(project.root / "full" / "metrics.jsonl")]
    assert len(expected_metrics) == 24

    cut = _config(project, "cut.toml", project.root / "cut", kind)
    with pytest.raises(UserError, match="no checkpoint in"):
        run_train(cut, progress=False, resume=True)
    real, calls = train_step_module.train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 18:  # Ctrl-C during step 17: checkpoints at 5, 10 and 15, keep the newest two
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(cut, progress=False)
    monkeypatch.undo()
    checkpoints = sorted(p.name for p in (project.root / "cut" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000010", "step-00000015"]
    assert not (project.root / "cut" / "pytorch_lora_weights.safetensors").exists()

    capsys.readouterr()
    resumed = run_train(cut, progress=False)  # the same command again: no flag to know
    assert resumed["steps"] == 24 and resumed["resumed_from_step"] == 15
    err = capsys.readouterr().err
    assert (f"train: going on with the run in '{project.root / 'cut'}' from its checkpoint at step 15 (of 24), "
            "'step-00000015'; train with --restart to start over (the run is moved to previous/)") in err
    assert not (project.root / "cut" / "previous").exists()
    got = load_file(resumed["lora"])
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    got_ema = load_file(resumed["lora_ema"])  # the average's state came back from the checkpoint
    assert got_ema.keys() == expected_ema.keys() and any(not torch.equal(got_ema[k], got[k]) for k in got)
    for k in expected_ema:
        assert torch.equal(got_ema[k], expected_ema[k]), k
    lines = [json.loads(x) for x in open(project.root / "cut" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(24))
    assert [x["loss"] for x in lines] == [x["loss"] for x in expected_metrics]
    scores = lambda run: [(x["step"], x["prior_drift"]) for x in map(json.loads, open(project.root / run / "validation.jsonl"))]  # noqa: E731
    assert scores("cut") == scores("full") and [s for s, _ in scores("full")] == [0, 4, 8, 12, 16, 20, 24]


@pytest.mark.e2e
@pytest.mark.parametrize("sums, why", [
    (None, "checksums.json is missing"), ("", "checksums.json does not parse"), ("null", "is not a table of file checksums"),
    ("[1, 2]", "is not a table of file checksums"), ("{}", "checksums.json has no checksum for"),
    ('{"state.json": "00"}', "checksums.json has no checksum for"),
])
def test_a_checkpoint_without_a_sound_checksum_list_is_not_trusted(project, capsys, sums, why):
    path, _ = project(dtype="fp32", max_steps=4)
    cfg = configure(path, train={"checkpoint_every": 2, "keep_checkpoints": 1})
    run_cache(cfg, progress=False)
    run_train(cfg, progress=False)
    newest = project.root / "out" / "checkpoints" / "step-00000004"  # the last step's, the only one kept
    capsys.readouterr()
    if sums is None:
        (newest / "checksums.json").unlink()
    else:
        (newest / "checksums.json").write_text(sums)
    with pytest.raises(UserError, match="no intact checkpoint"):  # the only one is not trusted
        run_train(cfg, progress=False, resume=True)
    err = capsys.readouterr().err
    assert f"checkpoint '{newest}' is damaged (" in err and why in err and "state.json does not parse" not in err


def _length(project, name, max_steps):
    path, _ = project(name=f"{name}.toml", out=project.root / name, max_steps=max_steps, dtype="fp32")
    return configure(path, lora={"dropout": 0.1}, optimizer={"scheduler": "constant_with_warmup", "warmup_steps": 3},
                     train={"checkpoint_every": 3, "keep_checkpoints": 1})


def test_a_finished_run_made_longer_goes_on_from_its_last_step(project, capsys):
    longer = _length(project, "whole", 7)
    run_cache(longer, progress=False)
    expected = load_file(run_train(longer, progress=False)["lora"])
    expected_losses = [json.loads(x)["loss"] for x in open(project.root / "whole" / "metrics.jsonl")]

    short = _length(project, "run", 4)  # 4 is no multiple of checkpoint_every: the last step is checkpointed alone
    run_train(short, progress=False)
    out = project.root / "run"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000004"]

    capsys.readouterr()
    summary = run_train(_length(project, "run", 7), progress=False)  # more steps, no flag
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 7
    assert "from its checkpoint at step 4 (of 7)" in capsys.readouterr().err
    got = load_file(summary["lora"])
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert [json.loads(x)["loss"] for x in open(out / "metrics.jsonl")] == expected_losses
    assert not (out / "previous").exists()

    # the same again: complete, nothing to do, nothing written
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run_train(_length(project, "run", 7), progress=False)
    err = capsys.readouterr().err
    assert again["complete_already"] and again["steps"] == 7 and again["final_loss"] == summary["final_loss"]
    assert (f"train: the run in '{out}' is complete (step 7 of 7): nothing to do; raise train.max_steps to train on, "
            "or train with --restart to start over (the run is moved to previous/)") in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before

    # --resume still goes on from the newest checkpoint (here the last step's: nothing left to train)
    assert run_train(_length(project, "run", 7), progress=False, resume=True)["resumed_from_step"] == 7


@pytest.mark.parametrize("master", [False, True])
def test_full_fine_tuning_interrupted_and_run_again_equals_uninterrupted(project, monkeypatch, master):
    """train.method = "full" in bf16: with stochastic rounding (seeded per step and weight) or fp32 master
    weights (in the checkpoint beside the optimizer's state), a resumed run ends bitwise where an
    uninterrupted one does."""
    def config(name):
        path, _ = project(name=f"{name}.toml", out=project.root / name, max_steps=8, dtype="bf16")
        return configure(path, lora={"rank": None, "alpha": None},
                         optimizer={"scheduler": "cosine", "warmup_steps": 2},
                         train={"method": "full", "master_weights": master, "checkpoint_every": 3,
                                "full_train_modules": ["transformer_blocks.*"]})

    whole = config("whole")
    run_cache(whole, progress=False)
    expected = load_file(run_train(whole, progress=False)["model_file"])
    cut = config("cut")
    real, calls = train_step_module.train_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # during step 7: checkpoints at 3 and 6
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_step_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(cut, progress=False)
    monkeypatch.undo()
    saved = project.root / "cut" / "checkpoints" / "step-00000006"
    assert (saved / "weights.safetensors").is_file() and not (saved / "lora.safetensors").exists()
    resumed = run_train(cut, progress=False)
    assert resumed["resumed_from_step"] == 6
    got = load_file(resumed["model_file"])
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
