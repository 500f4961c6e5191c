"""Several processes (`accelerate launch`, `torchrun`): the few facts and collectives the stages need, in one
place, so that the stages read the same with one process or many.

With one process (no launcher, or a launcher with one process) nothing here starts a process group and every
collective is a no-op: today's behaviour and speed. Under a launcher, accelerate starts the process group
from the launcher's environment (gloo on CPU, nccl on GPUs); the cache stage's collectives run on a separate
gloo group with a long timeout (cache.rank_timeout_minutes), because one rank may compute for hours before
its next barrier and an NCCL watchdog would kill it; a rank that does not arrive is named by gloo's
monitored barrier.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline import errors, shard
from pipeline.atomic import HOST
from pipeline.errors import UserError

TRAIN_TIMEOUT = datetime.timedelta(minutes=30)  # training's collectives: rank 0 alone may render sample grids meanwhile


def launched_size() -> int:
    """How many processes the launcher says it started (torchrun and accelerate launch set WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank by the launcher's environment (RANK; 0 without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # this rank's device under a launcher (None: the config's)
    accelerator: Any = None
    group: Any = None  # gloo group for the cache stage's barriers
    timeout: datetime.timedelta = TRAIN_TIMEOUT
    timeout_key: str = ""
    hosts: list[str] = field(default_factory=lambda: [HOST])
    fsdp: bool = False  # the denoiser is sharded (pipeline.shard): train.fsdp, or an accelerate config's FSDP
    mesh: Any = None  # under FSDP: the ranks to shard over

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def where(self, rank: int) -> str:
        return f"rank {rank} (host {self.hosts[rank]})"

    # -- collectives (no-ops with one process) -----------------------------------------------------
    def broadcast(self, value):
        """Rank 0's value on every rank."""
        if self.size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's value, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, value, group=self.group)
        return out

    def barrier(self, what: str, kept: str = "every finished cache segment is kept") -> None:
        """Wait for every rank to finish `what`. Past the timeout, a one-line error naming the ranks that did
        not arrive (on rank 0; the others see rank 0 go), saying what is `kept`."""
        if self.size == 1:
            return
        try:
            torch.distributed.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as e:
            late = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
            who = ", ".join(self.where(int(r)) for r in late.group(1).split(",")) if late else "another rank"
            raise UserError(f"{who} did not finish {what} within {self._limit()} (stuck, or it died: see its "
                            f"output); {kept}: run the same command again") from None

    def _limit(self) -> str:
        minutes = self.timeout.total_seconds() / 60
        return f"{self.timeout_key} = {minutes:g} minutes" if self.timeout_key else f"{minutes:g} minutes"

    def from_main(self, fn: Callable[[], Any]):
        """fn() run on rank 0 alone, its result (or its UserError, raised alike) on every rank: one decision,
        one message, whatever each machine's view would have been."""
        if self.size == 1:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise UserError(error)
        return result

    @contextlib.contextmanager
    def main_holds(self, make: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
        """Rank 0 enters the context (a lock) for the whole job; a refusal is raised on every rank alike."""
        with contextlib.ExitStack() as stack:
            self.from_main(lambda: stack.enter_context(make()) and None)
            yield

    # -- training ---------------------------------------------------------------------------------
    def slice(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items (shares differ by at most one; some may be empty)."""
        q, extra = divmod(n, self.size)
        lo = self.rank * q + min(self.rank, extra)
        return lo, lo + q + (self.rank < extra)

    def no_sync(self, module, last: bool):
        """Gradients are all-reduced (reduce-scattered, under FSDP) on the last micro-batch of a step only."""
        if self.size == 1 or last:
            return contextlib.nullcontext()
        if self.fsdp:
            return shard.no_gradient_sync(module)
        return self.accelerator.no_sync(module)

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """Clip the gradients of `params` to `max_norm` in total, every rank's alike; their norm before."""
        if self.size == 1 or self.fsdp:  # torch's takes sharded gradients as they are
            return shard.total_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def whole_lora(self, module):
        """Under FSDP, the LoRA's full tensors on every rank for the duration (a collective: every rank
        enters), for rank 0 to write it; otherwise nothing to do."""
        return shard.whole_lora(module) if self.fsdp else contextlib.nullcontext()

    def one_by_one(self, fn: Callable[[], Any], what: str):
        """fn() on every rank; under FSDP the ranks of a machine take turns, so that a machine holds one
        unsharded copy of the weights at a time (each rank loads on the CPU, then keeps only its shard).
        A failure on any rank is raised on every rank (as it is where it happened; as a UserError naming
        that rank elsewhere), so that none waits for a turn that never ends."""
        if not self.fsdp:
            return fn()
        turn = self.hosts[: self.rank].count(self.hosts[self.rank])
        result, mine = None, None
        for i in range(max(self.hosts.count(h) for h in self.hosts)):
            if i == turn:
                try:
                    result = fn()
                except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised as it is
                    mine = e
            said = None if mine is None else str(mine) if isinstance(mine, UserError) else f"{type(mine).__name__}: {mine}"
            for rank, error in enumerate(self.gather(said)):
                if rank == self.rank and mine is not None:
                    raise mine
                if error is not None:
                    raise UserError(f"{self.where(rank)}, {what}: {error}")
        return result

    def job(self) -> str:
        """Who holds a lock, for another job's refusal."""
        me = f"pid {os.getpid()} on {socket.gethostname()}"
        return me if self.size == 1 else f"a job of {self.size} processes on {len(set(self.hosts))} machine(s), rank 0: {me}"


_world = World()


def world() -> World:
    return _world


def _refuse_lonely(accelerator) -> None:
    started = launched_size()
    if accelerator.num_processes != started:
        raise UserError(
            f"the launcher started {started} processes (WORLD_SIZE={started}) but each runs alone "
            f"(accelerate sees {accelerator.num_processes}, {accelerator.distributed_type}), so each would do all "
            "the work: on CPU use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`")


@contextlib.contextmanager
def session(device_name: str, device_key: str, timeout_minutes: float = 0.0, timeout_key: str = "",
            fsdp: bool | None = None) -> Iterator[World]:
    """The processes of this command, for its duration: one World (rank 0 of 1) without a launcher, else
    accelerate's process group, with every rank's host and (timeout_minutes > 0) a gloo group for barriers.
    fsdp: the training stage's train.fsdp (an accelerate config's FSDP counts as true); None: a stage that
    never shards (the cache stage computes each prior with the whole model)."""
    global _world
    if launched_size() <= 1:
        yield _world
        return
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if re.fullmatch(r"cuda:\d+", device_name):
        raise UserError(f"config key '{device_key}' is {device_name!r}, but {launched_size()} processes each need their own "
                        "GPU: set it to \"auto\" (or \"cuda\") under a launcher")
    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes > 0 else TRAIN_TIMEOUT
    accelerator = Accelerator(
        cpu=device_name == "cpu" or not torch.cuda.is_available(),  # gloo on CPU (accelerate needs cpu=True)
        mixed_precision="no",  # the train dtype is the config's, not the launcher's config's
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    _refuse_lonely(accelerator)
    group = torch.distributed.new_group(backend="gloo", timeout=timeout)
    w = World(accelerator.process_index, accelerator.num_processes, accelerator.device, accelerator, group, timeout,
              timeout_key if timeout_minutes > 0 else "")
    w.hosts = w.gather(HOST)
    w.fsdp = fsdp is not None and (fsdp or str(accelerator.distributed_type).endswith("FSDP"))
    _world = w
    _quiet_others(w)
    try:
        yield w
    finally:
        _world = World()
        errors.silent = False
        # accelerate owns the default group; ours goes with it
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def _quiet_others(w: World) -> None:
    """Notes and warnings once, from rank 0: the other ranks would repeat each line."""
    errors.silent = not w.is_main
