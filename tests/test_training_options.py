"""Optimizers, schedules, accumulation, clipping, checkpointing, loss weighting, LoRA options, and the
practice warnings of prior prediction."""

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.cache.stage import run_cache
from pipeline.errors import UserError
from pipeline.train.stage import run_train

from conftest import configure

pytestmark = pytest.mark.e2e


def metrics(cfg):
    return [json.loads(x) for x in open(cfg.train.output_dir + "/metrics.jsonl")]


@pytest.fixture
def cached(project):
    path, cfg = project(max_steps=4, dtype="fp32")
    run_cache(cfg, progress=False)
    return path


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor"])
def test_optimizers_train(cached, name):
    cfg = configure(cached, optimizer={"name": name, "lr": 1.0 if name == "prodigy" else 1e-3})
    assert run_train(cfg, progress=False)["steps"] == 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(cfg))


def test_adamw8bit_without_a_gpu_is_one_line(cached):
    cfg = configure(cached, optimizer={"name": "adamw8bit"})
    with pytest.raises(UserError, match='optimizer.name = "adamw8bit" needs a CUDA GPU'):
        run_train(cfg, progress=False)


def test_warmup_schedule_and_clipping_are_recorded(cached):
    cfg = configure(cached, optimizer={"scheduler": "linear", "warmup_steps": 2, "lr": 1e-3, "max_grad_norm": 0.5})
    run_train(cfg, progress=False)
    lines = metrics(cfg)
    assert [round(r["lr"], 8) for r in lines] == [0.0, 0.0005, 0.001, 0.0005]  # warm-up, then linear decay
    assert all(r["grad_norm"] > 0 for r in lines[1:])


def test_gradient_accumulation_steps_over_several_batches(cached):
    cfg = configure(cached, train={"gradient_accumulation": 2})
    run_train(cfg, progress=False)
    lines = metrics(cfg)
    assert len(lines) == 4 and all(r["n_standard"] + r["n_prior"] == 4 for r in lines)  # 2 batches of 2


def test_gradient_checkpointing_changes_memory_not_results(cached):
    plain = configure(cached)
    run_train(plain, progress=False)
    losses = [r["loss"] for r in metrics(plain)]
    ckpt = configure(cached, train={"gradient_checkpointing": True})
    run_train(ckpt, progress=False)
    assert torch.allclose(torch.tensor([r["loss"] for r in metrics(ckpt)]), torch.tensor(losses), rtol=1e-4)


def test_loss_weighting_changes_the_loss_but_not_the_zero_prior_loss(cached):
    base = configure(cached, train={"batch_size": 4})
    run_train(base, progress=False)
    first = metrics(base)[0]
    weighted = configure(cached, train={"loss_weighting": "sigma_sqrt"})
    run_train(weighted, progress=False)
    first_w = metrics(weighted)[0]
    assert first_w["loss"] != pytest.approx(first["loss"])
    if first_w["loss_prior"] is not None:
        assert first_w["loss_prior"] < 1e-8


def test_lora_options_go_into_the_metadata(cached):
    cfg = configure(cached, lora={"dropout": 0.1, "use_dora": True, "init": "gaussian"})
    lora = run_train(cfg, progress=False)["lora"]
    with safe_open(lora, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_dropout"] == 0.1 and meta["transformer.use_dora"] is True
    assert meta["transformer.init_lora_weights"] == "gaussian"


def test_practice_warnings(project, capsys):
    path, cfg = project(max_steps=1)
    prior_caption = next((project.root / "data" / "prior").glob("*.txt"))
    standard_caption = next((project.root / "data" / "standard").glob("*.txt"))
    prior_caption.write_text(standard_caption.read_text())
    path.write_text(path.read_text().replace('type = "prior"', 'type = "prior"\nrepeats = 3'))
    cfg = configure(path, optimizer={"name": "prodigy", "lr": 1.0})
    run_cache(cfg, progress=False)
    capsys.readouterr()
    summary = run_train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "prior caption(s) repeat standard captions" in err
    assert "adaptive optimizers tend to struggle with prior prediction" in err
    assert "prior:standard samples per epoch are 3.0:1" in err
    assert summary["prior_share"] == 0.75


def test_tensorboard_and_loss_by_timestep_bin(cached):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = configure(cached, train={"tensorboard": True})
    run_train(cfg, progress=False)
    lines = metrics(cfg)
    for r in lines:
        assert r["loss_by_timestep_bin"] and all(k in ("0-250", "250-500", "500-750", "750-1000")
                                                 for k in r["loss_by_timestep_bin"])
    events = EventAccumulator(cfg.train.output_dir + "/tensorboard")
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "loss/standard", "lr"} <= set(tags) and any(t.startswith("loss_by_timestep/") for t in tags)
    assert len(events.Scalars("loss")) == len(lines) == 4


def test_prior_ratio_sets_the_share_of_prior_samples(cached):
    cfg = configure(cached, data={"prior_ratio": 0.2}, train={"max_steps": 0, "epochs": 1})
    summary = run_train(cfg, progress=False)
    lines = metrics(cfg)
    assert sum(r["n_prior"] for r in lines) == 2 and sum(r["n_standard"] for r in lines) == 8  # 8 standard : 2 prior
    assert summary["prior_share"] == 0.2
    with pytest.raises(UserError, match="data.prior_ratio' must be below 1"):
        configure(cached, data={"prior_ratio": 1.0})
