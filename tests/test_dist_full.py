"""Full fine-tuning (train.method = "full") under `torchrun --nproc_per_node 2` on the CPU (gloo), against
one process with the same global batch: data-parallel (each rank the whole model, gradients all-reduced;
bf16 weights with stochastic rounding, whose random bits every rank draws alike) and sharded (train.fsdp:
the trained weights and their optimizer state FSDP2 shards, the checkpoint and the outputs gathered and
written by rank 0). The fused backward is refused under a launcher in one line."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import configure
from pipeline.cache.stage import run_cache
from pipeline.errors import UserError
from pipeline.settings import resolve
from test_dist import _train

NO_LORA = {"rank": None, "alpha": None}


def _full(project, tiny_family_model, dtype, lr=1e-2, **train):
    path, cfg = project(model=tiny_family_model("flux"), dtype=dtype, batch=4, max_steps=2, lr=lr)
    run_cache(cfg, progress=False)
    return configure(path, lora=NO_LORA, train={"method": "full", "gradient_accumulation": 2, **train}), path


def _outputs(path, out: Path, n: int, resume: bool = False, **train) -> tuple[dict, dict, dict]:
    """The ranks' trained weights as each holds them, rank 0's single file and its step-2 checkpoint."""
    cfg = configure(path, train={"output_dir": str(out / "run"), "checkpoint_every": 2, **train})
    ranks = _train(n, path, out, *(["--resume"] if resume else []))
    run = Path(cfg.train.output_dir)
    return ranks, load_file(str(run / "model.safetensors")), load_file(str(run / "checkpoints" / "step-00000002" /
                                                                             "weights.safetensors"))


def _close(a: dict, b: dict, rtol: float) -> float:
    """The largest difference of a's tensors to b's, relative to b's largest value (each tensor)."""
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12))
                for k in a)
    diff = sum(int((a[k] != b[k]).sum()) for k in a)
    print(f"{diff} of {sum(v.numel() for v in a.values())} values differ, at most {worst:.3g} of the tensor's largest")
    assert worst <= rtol, worst
    return worst


@pytest.mark.slow
def test_two_ranks_train_the_weights_one_trains(project, tiny_family_model, tmp_path):
    # stochastic rounding (no master weights); a small lr: Adam turns the rounding differences of tiny
    # gradients into whole steps of lr
    cfg, path = _full(project, tiny_family_model, "bf16", lr=1e-4)
    one, single_one, ckpt_one = _outputs(path, tmp_path / "one", 0)
    two, single_two, ckpt_two = _outputs(path, tmp_path / "two", 2)
    assert all(torch.equal(two[0][k], two[1][k]) for k in two[0])  # the replicas stay identical
    # the ranks' gradients differ from one process's by float rounding: a weight rounds to another bf16
    # neighbour only where that moved its fp32 value across the rounding threshold (one bf16 step, 2^-8)
    print("1 vs 2 ranks, largest relative difference:", _close(two[0], one[0], 2 ** -7))
    _close(single_two, single_one, 2 ** -7)
    _close(ckpt_two, ckpt_one, 2 ** -7)
    assert not (tmp_path / "two" / "output-of-rank-1").exists()  # only rank 0 wrote
    base = load_file(str(Path(cfg.model.path) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], single_one[k].to(base[k].dtype)) for k in base if k in single_one)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, rtol", [("fp32", 1e-5), ("bf16", 2 ** -7)])  # bf16: fp32 master weights
def test_sharded_full_fine_tuning_trains_what_one_process_trains(project, tiny_family_model, tmp_path, dtype, rtol):
    cfg, path = _full(project, tiny_family_model, dtype, lr=1e-4, master_weights=dtype != "fp32")
    _, single_one, ckpt_one = _outputs(path, tmp_path / "one", 0)
    ranks, single_two, ckpt_two = _outputs(path, tmp_path / "two", 2, fsdp=True)
    assert any(ranks[0][k].shape != ranks[1][k].shape or not torch.equal(ranks[0][k], ranks[1][k])
               for k in ranks[0])  # each rank held its shard
    _close(single_two, single_one, rtol)
    _close(ckpt_two, ckpt_one, rtol)
    # a longer run goes on from each one's last checkpoint: the sharded one loads the gathered optimizer
    # state (AdamW's moments, the master weights) back into its shards
    configure(path, train={"max_steps": 3})
    single_one = _outputs(path, tmp_path / "one", 0, resume=True)[1]
    single_two = _outputs(path, tmp_path / "two", 2, resume=True, fsdp=True)[1]
    print("1 rank vs 2 sharded after a resume:", _close(single_two, single_one, rtol))
    assert (tmp_path / "one" / "resumed_from_step").read_text() == (tmp_path / "two" / "resumed_from_step").read_text() == "2"


def test_the_fused_backward_under_a_launcher_is_one_line(project, monkeypatch):
    path, _ = project()
    cfg = configure(path, lora=NO_LORA, train={"method": "full", "fused_backward": True},
                    optimizer={"max_grad_norm": 0})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="'train.fused_backward' works in one process only"):
        resolve(cfg, "train")
    cfg = configure(path, train={"fused_backward": False, "fsdp": True, "dtype": "bf16"})
    with pytest.raises(UserError, match="'train.fsdp' with train.method = \"full\" .* needs train.master_weights"):
        resolve(cfg, "train")


def test_a_trained_weight_without_a_gradient_is_refused_naming_the_full_key():
    from pipeline.processes import refuse_missing_gradients

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0](torch.ones(1, 2)).sum().backward()  # the second layer takes no part in the forward
    with pytest.raises(UserError, match="'train.full_train_modules': the weight '1.bias' gets no gradient"):
        refuse_missing_gradients(model, "train.full_train_modules")
