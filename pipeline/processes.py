"""The process setup a command runs under, chosen once by `start`: one process, data-parallel (DDP through
accelerate) or sharded (FSDP2, pipeline/denoiser/shard.py). The stages call its methods and never ask which one it
is: every method of the one-process setup is today's single-process behaviour (a collective is a no-op).

Under a launcher (`accelerate launch`, `torchrun`) accelerate starts the process group from the launcher's
environment (gloo on CPU, nccl on GPUs); the stages' own collectives run on a separate gloo group with a
long timeout (cache.rank_timeout_minutes in the cache stage), because one rank may compute for hours
before its next barrier and an NCCL watchdog would kill it; a rank that does not arrive is named by gloo's
monitored barrier.

Training places the model before the optimizer is built (`place`), so the optimizer is built once, over
the parameters as they train (shards under FSDP), and a checkpoint's optimizer state is loaded into it
(`load_optimizer_state`): nothing is rebuilt after sharding.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.denoiser import shard
from pipeline.atomic import HOST, pid_alive
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


def launched_sharded() -> bool:
    """An accelerate config whose distributed_type is FSDP (accelerate launch sets this for it)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


class OneProcess:
    """No launcher, or a launcher with one process: no process group, every collective a no-op."""

    rank, size = 0, 1
    places_weights = False  # whether `place` moves the weights itself (then the model is built on the CPU)
    device: torch.device | None = None  # this rank's device under a launcher (None: the config's)

    def __init__(self):
        self.hosts = [HOST]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def renders(self) -> bool:
        """Whether this rank renders the sample grids: rank 0 alone, on the unwrapped model (no collective)."""
        return self.is_main

    @property
    def shards(self) -> int:
        """How many processes the model is sharded across (1: each holds the whole model)."""
        return 1

    def where(self, rank: int) -> str:
        return f"rank {rank} (host {self.hosts[rank]})"

    def job(self) -> str:
        """Who holds a lock, for another job's refusal."""
        return f"pid {os.getpid()} on {socket.gethostname()}"

    # -- collectives ------------------------------------------------------------------------------
    def broadcast(self, value):
        """Rank 0's value on every rank."""
        return value

    def gather(self, value) -> list:
        """Every rank's value, in rank order, on every rank."""
        return [value]

    def barrier(self, what: str, kept: str = "every finished cache segment is kept") -> None:
        """Wait for every rank to finish `what` (past the timeout: a one-line error naming the late ranks)."""

    def from_main(self, fn: Callable[[], Any]):
        """fn() run on rank 0 alone, its result (or its UserError, raised alike) on every rank: one decision,
        one message, whatever each machine's view would have been."""
        return fn()

    def refuse_unlike(self, mine: Callable[[], dict], differ: Callable[[dict], list[str]], what: str) -> None:
        """Refuse, on every rank alike, a job whose processes would do different work: every rank's `mine()`
        (its config, data...) is compared with rank 0's by `differ` (what differs, as "key its -> rank 0's"),
        and the first rank that differs is named with `what` it would do. One process: nothing to compare."""

    @contextlib.contextmanager
    def main_holds(self, make: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
        """Rank 0 enters the context (a lock) for the whole job; a refusal is raised on every rank alike."""
        with contextlib.ExitStack() as stack:
            self.from_main(lambda: stack.enter_context(make()) and None)
            yield

    def one_by_one(self, fn: Callable[[], Any], what: str):
        """fn() on every rank (under FSDP the ranks of a machine take turns)."""
        return fn()

    # -- training ---------------------------------------------------------------------------------
    def slice(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n items (shares differ by at most one; some may be empty)."""
        q, extra = divmod(n, self.size)
        lo = self.rank * q + min(self.rank, extra)
        return lo, lo + q + (self.rank < extra)

    def turns(self, n: int) -> range:
        """This rank's items of n shared round-robin (indices past n-1 mean: run the last again, a forward
        every rank must take part in)."""
        return range(self.rank, n, self.size)

    def place(self, model: torch.nn.Module, blocks: list[torch.nn.Module]) -> torch.nn.Module:
        """The module whose forward trains (DDP's wrapper; the model itself, sharded in place, under FSDP)."""
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict, params: list) -> None:
        """A checkpoint's optimizer state (as one process holds it) into the optimizer over `params`."""
        optimizer.load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state as one process holds it (under FSDP gathered: every rank calls this)."""
        return optimizer.state_dict()

    def backward_loss(self, losses: torch.Tensor, batch_len: int, batches: int, empty: bool) -> torch.Tensor:
        """What the backward of one of a step's `batches` batches runs from, given this rank's per-sample
        losses: one process's gradient of the step is the mean over each batch, averaged over the batches."""
        return losses.mean() * (1 / batches)

    def no_sync(self, module, last: bool):
        """Gradients are all-reduced (reduce-scattered, under FSDP) on the last micro-batch of a step only."""
        return contextlib.nullcontext()

    def check_gradients(self, model: torch.nn.Module, targets_key: str) -> None:
        """Refuse LoRA layers that got no gradient where that would hang (several processes); one process
        trains on without them, as it always did."""

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """Clip the gradients of `params` to `max_norm` in total, every rank's alike; their norm before."""
        return shard.total_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def whole_lora(self, module, every: bool = False):
        """Under FSDP, the LoRA's full tensors on every rank for the duration (a collective), for rank 0 to
        write it (every: all the weights, for rank 0 to write the whole denoiser); otherwise nothing to do."""
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class DataParallel(OneProcess):
    """Several processes, each with the whole model (accelerate's DDP); each takes its share of every batch."""

    def __init__(self, accelerator, group, timeout: datetime.timedelta, timeout_key: str):
        self.accelerator, self.group, self.timeout, self.timeout_key = accelerator, group, timeout, timeout_key
        self.rank, self.size, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.hosts = [HOST]
        self.hosts, self.pids = map(list, zip(*self.gather((HOST, os.getpid()))))

    def job(self) -> str:
        return (f"a job of {self.size} processes on {len(set(self.hosts))} machine(s), rank 0: "
                f"{super().job()}")

    def broadcast(self, value):
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, value) -> list:
        out = [None] * self.size
        torch.distributed.all_gather_object(out, value, group=self.group)
        return out

    def barrier(self, what: str, kept: str = "every finished cache segment is kept") -> None:
        began = time.monotonic()
        try:
            torch.distributed.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as e:
            late = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
            ranks = [int(r) for r in late.group(1).split(",")] if late else []
            # gloo reports a rank whose process ended (its connection closed) as late too, at once: a failure
            # well before the timeout, or a process of this machine that is gone, is a rank that stopped
            gone = [r for r in range(self.size) if self.hosts[r] == HOST and not pid_alive(self.pids[r])]
            if gone or time.monotonic() - began < 0.9 * self.timeout.total_seconds():
                who = ", ".join(self.where(r) for r in (gone or ranks)) or "another rank"
                raise UserError(f"{who} stopped before finishing {what} (it failed or was killed: see its "
                                f"output); {kept}: fix that and run the same command again") from None
            who = ", ".join(self.where(r) for r in ranks) or "another rank"
            minutes = f"{self.timeout.total_seconds() / 60:g} minutes"
            limit = f"{self.timeout_key} = {minutes}" if self.timeout_key else minutes
            raise UserError(f"{who} did not finish {what} within {limit} (stuck, or it died: see its "
                            f"output); {kept}: run the same command again") from None

    def from_main(self, fn: Callable[[], Any]):
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

    def refuse_unlike(self, mine, differ, what):
        every = self.gather(mine())

        def check() -> None:
            for rank, theirs in enumerate(every):
                found = differ(theirs)
                if found:
                    raise UserError(f"{self.where(rank)} {what} than rank 0 ({'; '.join(found)}; its value -> rank "
                                    "0's): give every process the same config file and data")

        self.from_main(check)

    def place(self, model, blocks):
        return self.accelerator.prepare_model(model)

    def prepare_optimizer(self, optimizer):
        return self.accelerator.prepare_optimizer(optimizer)

    def backward_loss(self, losses, batch_len, batches, empty):
        # the sum of this rank's share, scaled so that DDP's mean of the ranks' gradients is one process's
        # gradient of the whole batch; an empty share runs one sample at weight zero (every rank must take
        # part in each all-reduce)
        return losses.sum() * (0.0 if empty else self.size / (batch_len * batches))

    def no_sync(self, module, last):
        return contextlib.nullcontext() if last else self.accelerator.no_sync(module)

    def check_gradients(self, model, targets_key):
        refuse_missing_gradients(model, targets_key, self.gather)

    def clip_grad_norm(self, params, max_norm):
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def close(self) -> None:
        # accelerate owns the default group; ours goes with it
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


class Sharded(DataParallel):
    """Several processes sharing one sharded model (FSDP2, pipeline/denoiser/shard.py): each transformer block one unit."""

    places_weights = True  # each rank loads on the CPU and keeps only its shard

    @property
    def renders(self) -> bool:
        return True  # each forward is a collective: every rank renders, rank 0 saves

    @property
    def shards(self) -> int:
        return self.size

    def __init__(self, *args):
        super().__init__(*args)
        self.mesh = shard.mesh(self.size, self.device)  # a collective: every rank, before any of them shards

    def one_by_one(self, fn, what):
        # the ranks of a machine take turns, so that a machine holds one unsharded copy of the weights at a
        # time (each rank loads on the CPU, then keeps only its shard). A failure on any rank is raised on
        # every rank (as it is where it happened; as a UserError naming that rank elsewhere), so that none
        # waits for a turn that never ends.
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

    def turns(self, n):
        # each forward is a collective, so every rank runs as many: one with a short share repeats a batch
        return range(self.rank, -(-n // self.size) * self.size, self.size)

    def place(self, model, blocks):
        shard.shard(model, blocks, self.mesh)
        return model

    def prepare_optimizer(self, optimizer):
        return optimizer

    def load_optimizer_state(self, optimizer, state, params):
        optimizer.load_state_dict(shard.sharded_optimizer_state(state, params))

    def optimizer_state(self, optimizer):
        return shard.full_optimizer_state(optimizer)

    def no_sync(self, module, last):
        return contextlib.nullcontext() if last else shard.no_gradient_sync(module)

    def clip_grad_norm(self, params, max_norm):
        return shard.total_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))  # sharded gradients as they are

    def whole_lora(self, module, every=False):
        return shard.whole_lora(module, every)


def refuse_missing_gradients(model: torch.nn.Module, targets_key: str, gather=OneProcess().gather) -> None:
    """Refuse, on every rank alike (gather: the ranks' lists), LoRA layers that got no gradient (their forward
    skips them here): with several processes DDP would wait for their gradients forever."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    missing = sorted({n for names in gather(missing) for n in names})
    if missing:
        name = missing[0]
        layer = name.split(".lora_")[0] if ".lora_" in name else name.rsplit(".", 1)[0]  # the layer, not its tensor
        if targets_key == "train.full_train_modules":  # full fine-tuning: the weight itself
            raise UserError(f"config key '{targets_key}': the weight '{name}' gets no gradient (this model's forward "
                            f"does not use it; {len(missing)} such weights), and with several processes DDP would "
                            "wait for it forever: name only the modules that train in train.full_train_modules")
        raise UserError(f"config key '{targets_key}': the LoRA on '{layer}' gets no gradient (this model's forward "
                        f"does not use that layer; {len(missing)} such parameters), and with several processes "
                        "DDP would wait for it forever: leave it out (lora.target_modules or lora.target_regex)")


def refuse_lonely(accelerator) -> None:
    started = launched_size()
    if accelerator.num_processes != started:
        raise UserError(
            f"the launcher started {started} processes (WORLD_SIZE={started}) but each runs alone "
            f"(accelerate sees {accelerator.num_processes}, {accelerator.distributed_type}), so each would do all "
            "the work: on CPU use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`")


@contextlib.contextmanager
def start(kind: str, device_name: str, timeout_minutes: float = 0.0, timeout_key: str = "") -> Iterator[OneProcess]:
    """The processes of this command, for its duration. kind: "one", "ddp" or "fsdp", as settings.resolve
    chose it from the launcher's environment and the config; device_name: the stage's device key's value."""
    if kind == "one":
        yield OneProcess()
        return
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes > 0 else TRAIN_TIMEOUT
    accelerator = Accelerator(
        cpu=device_name == "cpu" or not torch.cuda.is_available(),  # gloo on CPU (accelerate needs cpu=True)
        mixed_precision="no",  # the train dtype is the config's, not the launcher's config's
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    refuse_lonely(accelerator)
    group = torch.distributed.new_group(backend="gloo", timeout=timeout)
    procs = (Sharded if kind == "fsdp" else DataParallel)(accelerator, group, timeout,
                                                            timeout_key if timeout_minutes > 0 else "")
    try:
        yield procs
    finally:
        procs.close()
