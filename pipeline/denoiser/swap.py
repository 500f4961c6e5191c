"""Block swap (train.blocks_to_swap = N): N of the denoiser's transformer blocks keep their frozen weights
in CPU memory and are copied to the GPU just before they run, in the forward and again in the backward,
on a side CUDA stream that overlaps the copy of the next block with the compute of this one.

Why not diffusers' group offloading (`enable_group_offload`, block_level, use_stream): it serves
inference only. It onloads in a forward pre-hook and offloads in the post-hook, so autograd's saved
weights (a frozen Linear keeps its weight to compute the gradient of its input) are on the CPU when the
backward needs them; and with a stream it restores each parameter from a pinned copy taken once, which
would throw away every optimizer update of a LoRA inside the block.

Here, per swapped block:
- forward pre-hook: make it resident (waiting for its prefetch), start copying the next swapped block;
- forward post-hook: park its weights on the CPU again, and when the output takes part in a backward,
  hook its gradient: that fires as the backward reaches the block, which makes it resident again and
  prefetches the swapped block before it. autograd runs ready nodes latest-created first, so once the
  backward reaches a block, the blocks after it are done: they are parked then, and whatever is still
  resident at the end of the backward is parked by a callback queued on the engine (as FSDP does).
- gradient checkpointing reruns a block's forward inside the backward: the hooks see that (`in_backward`)
  and leave its placement to the backward's hooks.

Weights are moved by assigning `tensor.data`, so every Parameter stays the object that autograd saved
and the optimizer holds. Trainable parameters (the LoRA) are not swapped: they, their gradients and the
optimizer's state stay on the GPU (about 1% of the frozen weights at rank 16), which keeps every
optimizer working as it does without swap (bitsandbytes' 8-bit AdamW needs CUDA tensors, Prodigy sums
over all parameters on one device). On a CPU the copies are no-ops, but every hook runs, which is how
the tests check the schedule (`onloads`, `offloads`, `prefetches` count it)."""

from __future__ import annotations

import torch
from torch.autograd.graph import register_multi_grad_hook

from pipeline.errors import UserError


def load_denoiser(family, device: torch.device, dtype: torch.dtype, blocks_to_swap: int, prepare=None):
    """The denoiser as both stages use it: loaded, `prepare(model)` applied (the train stage adds its LoRA
    there), then placed on `device`, with `blocks_to_swap` blocks swapped. With swap it loads on the CPU
    first, so the whole model never has to fit on the GPU. Returns (model, BlockSwap or None)."""
    model = family.load_denoiser(torch.device("cpu") if blocks_to_swap else device, dtype)
    if prepare is not None:
        prepare(model)
    return model, apply_block_swap(model, family, blocks_to_swap, device)


def swapped_indices(total: int, n: int) -> list[int]:
    """Which of `total` blocks (in forward order) are swapped: `n` spread evenly, the last one included, so
    that each copy overlaps with the compute of the resident blocks before it. The planner uses this too."""
    return sorted({round((k + 1) * total / n) - 1 for k in range(n)}) if n else []


def swap_blocks(model: torch.nn.Module, family) -> list[torch.nn.Module]:
    """The denoiser's blocks in forward order, from the family's `swap_blocks` (names of ModuleLists)."""
    return [block for name in family.swap_blocks for block in getattr(model, name)]


def apply_block_swap(model: torch.nn.Module, family, n: int, device: torch.device) -> BlockSwap | None:
    """Move the model to `device` except the frozen weights of `n` swapped blocks. UserError naming
    train.blocks_to_swap for more blocks than the model has (settings.resolve refuses a family without a
    list of blocks before anything loads)."""
    if not n:
        return None
    blocks = swap_blocks(model, family)
    if n > len(blocks):
        raise UserError(f"config key 'train.blocks_to_swap' is {n}, but this {family.name} denoiser has "
                        f"{len(blocks)} blocks: use at most {len(blocks)}")
    chosen = [blocks[i] for i in swapped_indices(len(blocks), n)]
    parked = {id(t) for b in chosen for t in _frozen(b)}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in parked:
            t.data = t.data.to(device)
    return BlockSwap(model, chosen, device)


def _frozen(block: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())


class BlockSwap:
    def __init__(self, model: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device):
        self.device, self.blocks = device, blocks
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.tensors = [_frozen(b) for b in blocks]
        # the CPU copy of each swapped tensor, pinned so that copies to the GPU can run asynchronously
        self.host = {id(t): (t.data.pin_memory() if self.stream else t.data.to("cpu")) for ts in self.tensors
                     for t in ts}
        self.resident: set[int] = set()
        self.pending: dict[int, tuple] = {}  # block index -> (CUDA event or None, device copies)
        self.in_backward = False
        self.onloads = self.offloads = self.prefetches = 0
        for i in range(len(blocks)):
            self.offload(i)
        self.offloads = 0
        model.register_forward_pre_hook(self._model_start)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, args, i=i: self._before_forward(i))
            block.register_forward_hook(lambda m, args, out, i=i: self._after_forward(i, out))

    # -- moves ------------------------------------------------------------------------------------
    def _parked(self, t: torch.Tensor) -> torch.Tensor:
        """What a parked tensor holds: its CPU copy (the tests substitute NaN, to prove that no computation
        ever reads a parked weight)."""
        return self.host[id(t)]

    def offload(self, i: int) -> None:
        # the frozen weights are unchanged on the GPU, so nothing is copied back: the CPU copy is current
        for t in self.tensors[i]:
            t.data = self._parked(t)
        self.resident.discard(i)
        self.offloads += 1

    def prefetch(self, i: int) -> None:
        """Start copying block i to the device (on the side stream) unless it is there or on its way."""
        if i in self.resident or i in self.pending:
            return
        if self.stream is None:
            copies, event = [self.host[id(t)].to(self.device) for t in self.tensors[i]], None
        else:
            with torch.cuda.stream(self.stream):
                copies = [self.host[id(t)].to(self.device, non_blocking=True) for t in self.tensors[i]]
                event = self.stream.record_event()
        self.pending[i] = (event, copies)
        self.prefetches += 1

    def onload(self, i: int) -> None:
        if i in self.resident:
            return
        self.prefetch(i)
        event, copies = self.pending.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for c in copies:
                c.record_stream(current)  # allocated on the side stream, used on this one
        for t, c in zip(self.tensors[i], copies):
            t.data = c
        self.resident.add(i)
        self.onloads += 1

    # -- hooks ------------------------------------------------------------------------------------
    def _model_start(self, module, args) -> None:
        # the model's own forward never runs inside a backward (checkpointing reruns blocks only), so a
        # backward that raised half-way cannot leave the flag set
        self.in_backward = False
        self.prefetch(0)

    def _before_forward(self, i: int) -> None:
        self.onload(i)
        if not self.in_backward and i + 1 < len(self.blocks):
            self.prefetch(i + 1)

    def _after_forward(self, i: int, out) -> None:
        if self.in_backward:  # checkpointing's recomputation: the backward hooks place the block
            return
        self.offload(i)
        if torch.is_grad_enabled():
            outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                    if isinstance(t, torch.Tensor) and t.requires_grad]
            if outs:
                register_multi_grad_hook(outs, lambda grad, i=i: self._before_backward(i), mode="any")

    def _before_backward(self, i: int) -> None:
        if not self.in_backward:
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        for later in [j for j in self.resident if j > i]:  # their backward is done (see the module docstring)
            self.offload(later)
        self.onload(i)
        if i > 0:
            self.prefetch(i - 1)

    def _after_backward(self) -> None:
        for j in sorted(self.resident):
            self.offload(j)
        for j in list(self.pending):  # a prefetch nobody waited for: drop it once its copy is done
            event, _ = self.pending.pop(j)
            if event is not None:
                event.synchronize()
        self.in_backward = False
