"""Sharded training (train.fsdp = true: FSDP2, each transformer block one unit) under
`torchrun --standalone --nproc_per_node 2` on the CPU (gloo): the same LoRA, the same held-out scores and a
zero step-0 prior loss as one unsharded process; checkpoints gather the LoRA and the optimizer's state into
one process's layout, and an interrupted sharded run resumed ends bitwise where an uninterrupted one does."""

import json
from collections import Counter
import shutil
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import configure
from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.families import family_class
from pipeline.settings import refuse_sharding
from test_dist import WORKER, _launch, _run
from test_validation import with_validation

def _run_dir(path) -> Path:
    return Path(load_config(path).train.output_dir)


def _records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines()]


def _train_once(n: int, path, out: Path, *extra) -> Path:
    """Train with n processes (0: plain python); returns where the run's files were moved to."""
    out.mkdir(exist_ok=True)
    done = _run(n, WORKER, path, out, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (out / "output-of-rank-1").exists()  # only rank 0 wrote
    kept = out / "run"
    shutil.move(_run_dir(path), kept)
    return kept


@pytest.fixture(params=["flux"])
def sharded(project, tiny_family_model, request):
    """bf16 (the frozen weights bf16 beside a float32 LoRA, as on a GPU), held-out images, prompts, and
    train.fsdp = true; cached. The tiny Flux unless parametrized with another family."""
    held = project.root / "data" / "heldout-standard"
    for suffix in (".png", ".txt"):  # a third held-out image: with one variant, an odd number of held-out batches
        shutil.copy(held / f"000{suffix}", held / f"002{suffix}")
    path, _ = with_validation(project, dtype="bf16", epochs=1, lr=1e-2, variants=1, model=tiny_family_model(request.param))
    # no_sync on the first batch of each step; checkpoints for the resume below, and gradient checkpointing
    # (each block's forward run again in the backward: gathered again), which change no result
    # a warmup and a cosine schedule: a resumed run must step on at the lr the schedule is at
    cfg = configure(path, train={"fsdp": True, "gradient_accumulation": 2, "checkpoint_every": 2,
                                 "gradient_checkpointing": True},
                    optimizer={"scheduler": "cosine", "warmup_steps": 2})
    run_cache(cfg, progress=False)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("sharded", ["flux", "hidream"], indirect=True)
def test_sharded_training_trains_what_unsharded_training_trains(sharded, tmp_path, request):
    # HiDream's bf16 attention on the CPU rounds a sample alone in its batch (a rank's share of 2) otherwise
    # than beside another (one process): its reference is 2 unsharded ranks (DDP), which split alike
    hidream = "hidream" in request.node.name
    configure(sharded, train={"fsdp": False})
    one = _train_once(2 if hidream else 0, sharded, tmp_path / "one")
    configure(sharded, train={"fsdp": True})
    two = _train_once(2, sharded, tmp_path / "two")
    lora_one, lora_two = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (one, two))
    assert lora_one.keys() == lora_two.keys()
    diff = max(float((lora_one[k] - lora_two[k]).abs().max()) for k in lora_one)
    print(f"{'2 unsharded ranks' if hidream else '1 process'} vs 2 sharded ranks: max |LoRA difference| = "
          f"{diff:.3g} over {len(lora_one)} tensors")
    assert diff <= 1e-6
    assert max(float(v.abs().max()) for k, v in lora_two.items() if "lora_B" in k) > 1e-4  # it trained
    # each rank held its shard of the LoRA, not the whole: the two shards make the whole
    shards = [load_file(str(tmp_path / "two" / f"rank-{r}.safetensors")) for r in (0, 1)]
    whole = {k.split(".", 1)[1]: v for k, v in lora_two.items()}  # the file's keys carry "transformer."
    assert shards[0].keys() == whole.keys()
    assert all(shards[0][k].numel() < v.numel() for k, v in whole.items() if v.shape[0] > 1)
    assert all(torch.equal(torch.cat([shards[0][k], shards[1][k]]), v) for k, v in whole.items())
    steps_one, steps_two = _records(one, "metrics.jsonl"), _records(two, "metrics.jsonl")
    if not hidream:  # the cached prior is the sharded forward's step-0 prediction
        assert steps_two[0]["n_prior"] > 0 and steps_two[0]["loss_prior"] == 0.0
    for a, b in zip(steps_one, steps_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    # held-out scores split across the ranks: 5 images of two sizes in batches of 2 make 3 batches, so one rank
    # runs one twice (every forward is a collective); the grids rendered by every rank, saved by rank 0
    val_one, val_two = _records(one, "validation.jsonl"), _records(two, "validation.jsonl")
    assert [v["step"] for v in val_two] == [v["step"] for v in val_one] and len(val_two) >= 3
    for a, b in zip(val_one, val_two):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["prior_drift"] == pytest.approx(b["prior_drift"], rel=1e-4, abs=1e-9)
        assert Path(b["samples"].replace(str(_run_dir(sharded)), str(two))).is_file()
    assert val_two[0]["prior_drift"] == 0.0 or hidream
    if not hidream:
        _interrupted_and_resumed(sharded, tmp_path, two)


def _interrupted_and_resumed(sharded, tmp_path, whole: Path) -> None:
    """The sharded run `whole` wrote, again, SIGKILLed after its step-2 checkpoint and resumed: bitwise the
    same LoRA with 2 sharded ranks, and within 1e-6 with one process."""
    saved = json.loads((whole / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert saved["world_size"] == 2
    state = load_file(str(whole / "checkpoints" / "step-00000002" / "state.safetensors"))
    lora = load_file(str(whole / "checkpoints" / "step-00000002" / "lora.safetensors"))
    # the optimizer's moments gathered whole: two of each LoRA tensor's shape, as one process holds them
    moments = Counter(tuple(v.shape) for v in state.values() if v.dim() > 0)
    assert moments == Counter({shape: 2 * n for shape, n in Counter(tuple(v.shape) for v in lora.values()).items()})
    run_dir = _run_dir(sharded)
    checkpoints = run_dir / "checkpoints"
    (tmp_path / "cut").mkdir()
    proc = _launch(2, WORKER, sharded, tmp_path / "cut")
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (checkpoints / "step-00000002").is_dir():
        time.sleep(0.005)
    for worker in psutil.Process(proc.pid).children(recursive=True):
        worker.kill()
    proc.communicate(timeout=60)
    assert not (run_dir / "pytorch_lora_weights.safetensors").exists(), "the run ended before it was interrupted"
    shutil.copytree(run_dir, tmp_path / "cut-copy")
    resumed = _train_once(2, sharded, tmp_path / "cut", "--resume")
    a = load_file(str(whole / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the sharded checkpoint is one process's layout: one unsharded process goes on from it (lora.dropout = 0,
    # so the number of processes changes only the rounding of the gradients' sums)
    shutil.copytree(tmp_path / "cut-copy", run_dir)
    alone = load_file(str(_train_once(0, sharded, tmp_path / "alone", "--resume") / "pytorch_lora_weights.safetensors"))
    assert max(float((a[k] - alone[k]).abs().max()) for k in a) <= 1e-6


def test_what_sharding_does_not_take_is_refused_naming_the_key(project):
    _, cfg = project()
    flux, sdxl = family_class("flux"), family_class("sdxl")
    refuse_sharding(cfg, flux)  # the default: nothing to refuse
    with pytest.raises(UserError, match="'train.fsdp' shards transformer families .* sdxl"):
        refuse_sharding(cfg, sdxl)
    for table, key, value, hint in (("model", "quantize", "int8", "model.quantize"),
                                    ("optimizer", "name", "prodigy", "optimizer.name"),
                                    ("train", "prior_mode", "online", "train.prior_mode")):
        other = configure(project()[0], **{table: {key: value}})
        with pytest.raises(UserError, match=f"'train.fsdp' works with {hint}"):
            refuse_sharding(other, flux)
