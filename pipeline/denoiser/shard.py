"""FSDP for big denoisers (train.fsdp = true, under a launcher): the frozen weights sharded across the ranks
with torch's FSDP2 (`fully_shard`, the engine accelerate's FSDP2 config calls too), each transformer block
one unit, so a GPU holds 1/N of the weights plus the block it is running. With train.method = "full" the
trained weights are sharded the same way, and so their gradients, fp32 master copies and AdamW moments
(train/full.py steps each rank's shards); checkpoints and the outputs gather them (`whole_lora(every=True)`).

Why the pipeline calls `fully_shard` itself rather than handing the model to accelerate's FSDP config:
accelerate turns FSDP on for GPUs only (on the CPU it falls back to DDP without a word), so its FSDP could
never be tested here; the stages need to know the layout anyway (a checkpoint gathers the LoRA and the
optimizer state, validation runs its forwards on every rank); and the units are the family's blocks, the
ones block swap and the memory planner use.

Numerics: no mixed-precision policy, so each block computes with exactly the weights (train.dtype) and
LoRA (float32) that one process has, and the priors cached without sharding are the step-0 predictions of
the sharded model too (tests/test_shard.py checks the step-0 prior loss is zero). Everything a checkpoint
holds is gathered into the one-process layout, so a checkpoint does not depend on how it was sharded.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch


def mesh(size: int, device: torch.device):
    """The ranks as one dimension to shard over (a collective: every rank, before any of them shards)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (size,))


def shard(model: torch.nn.Module, blocks: list[torch.nn.Module], on) -> None:
    """FSDP2 in place: each block one unit, freed again after its forward (recomputed in the backward),
    and the root the rest (embedders, final layers). The weights move to the mesh's device, shard by
    shard, so a model loaded on the CPU never has to fit one GPU whole."""
    from torch.distributed.fsdp import fully_shard

    # Flux's blocks return views (torch warns at every rank's first step: an in-place op on one would skip
    # the backward's all-gather). diffusers' forwards use them out of place, and tests/test_shard.py would
    # see a skipped gather: the sharded LoRA is compared with unsharded training's.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)
    for block in blocks:
        fully_shard(block, mesh=on, reshard_after_forward=True)
    fully_shard(model, mesh=on)


def _is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def whole_lora(model: torch.nn.Module, every: bool = False) -> Iterator[None]:
    """The LoRA's full tensors in place of its shards for the duration (every rank enters: each tensor is
    gathered), for what reads the LoRA off the model (its file, a checkpoint); the frozen weights stay
    sharded. No forward may run inside. every (train.method = "full": the outputs are the whole denoiser):
    every sharded parameter, gathered one at a time onto the CPU, where rank 0 keeps it and the others drop
    it at once (an empty stand-in), so that no GPU and only rank 0's memory holds the whole model."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()  # every registered tensor is its shard (the optimizer's), none a stale gathered one
    main = torch.distributed.get_rank() == 0
    swapped = []
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and (p.requires_grad or every) and _is_sharded(p):
                swapped.append((m, name, p))
                whole = p.full_tensor().detach()
                if every:
                    whole = whole.cpu() if main else torch.empty(0, dtype=whole.dtype)
                m._parameters[name] = torch.nn.Parameter(whole, requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def _gathered(state: dict) -> dict:
    for i in sorted(state["state"]):  # the same order on every rank
        state["state"][i] = {k: v.full_tensor().cpu() if _is_sharded(v) else v for k, v in state["state"][i].items()}
    return state


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded tensor gathered (a collective), so a checkpoint holds what
    one process's optimizer would: it resumes with or without sharding, on any number of ranks. Full
    fine-tuning's optimizer (train/full.py): its inner optimizer's state and its fp32 master weights alike."""
    state = optimizer.state_dict()
    if "inner" in state:
        return {"inner": _gathered(state["inner"]),
                "master": [m.full_tensor().cpu() if _is_sharded(m) else m for m in state["master"]]}
    return _gathered(state)


def sharded_optimizer_state(state: dict, params: list[torch.nn.Parameter]) -> dict:
    """The inverse, for the optimizer over the sharded parameters (in the order the full one had them): each
    tensor of its parameter's full shape becomes this rank's shard of it. Every rank holds the full state
    (read from the checkpoint, or fresh), so each cuts its own shard without communication. Full
    fine-tuning's (with "inner" and "master": one master a parameter that is not float32)."""
    from torch.distributed.tensor import distribute_tensor

    def cut(v, p):
        return distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)

    if "inner" in state:
        kept = [p for p in params if p.dtype != torch.float32]
        return {"inner": sharded_optimizer_state(state["inner"], params),
                "master": [cut(m, p) for m, p in zip(state["master"], kept, strict=True)]}
    out = {"param_groups": state["param_groups"], "state": {}}
    for i, entry in state["state"].items():
        p = params[i]
        out["state"][i] = {k: cut(v, p) if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) else v
                           for k, v in entry.items()}
    return out


def total_norm(norm) -> float:
    """clip_grad_norm_'s result as a number: over sharded gradients it is itself sharded (a collective)."""
    return float(norm.full_tensor() if _is_sharded(norm) else norm)


@contextlib.contextmanager
def no_gradient_sync(model) -> Iterator[None]:
    """FSDP2's no_sync: gradients accumulate unreduced until the last micro-batch of a step."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
