"""Reading the next optimizer step's batches while this one computes, so that the step waits on nothing but
compute: torch's DataLoader with one worker process reads each upcoming step's batches ahead. It reads
exactly what train_step would read itself (train.step.read_batch, with the same seeds), so a run is
bitwise the same with it as without. On CUDA the DataLoader pins the tensors, so that their copies to the
device are DMA transfers that need not hold up the host.

Why a process and not a thread: the step's own Python (autograd, module calls) needs the GIL between its
kernels, and a reading thread holding it between its HDF5 reads and tensor ops made the step slower than
reading in the step (tiny Flux on a CPU: a reader looping beside a 0.20 s step made it 0.39 s). The worker
is forked, so it starts in milliseconds with the plan in its memory, and opens its own cache files.

The worker sends each step's reads, or the error reading them raised; `take` raises that error in the main
process at the step that needed the batch, as it was raised (a damaged cache entry's UserError still
prints its one line). The worker stops when the `with` block ends: at the run's end, on an error and on
KeyboardInterrupt, and it exits by itself if the main process dies."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.plan import Plan, Sample
from pipeline.train.epochs import epoch_batches
from pipeline.train.step import Read, read_batch

Group = list[list[tuple[Sample, int]]]  # the batches of one optimizer step (gradient accumulation)
AHEAD = 2  # steps read ahead (the DataLoader's prefetch_factor): one being computed leaves one waiting


def upcoming(run, plan: Plan, state) -> Iterator[tuple[int, Group]]:
    """(step, group) of each optimizer step from `state` to the run's end, in the order train.stage._loop
    takes them (`take` refuses any other)."""
    step, epoch, next_batch, accum = state.step, state.epoch, state.next_batch, plan.cfg.train.gradient_accumulation

    def steps() -> Iterator[tuple[int, Group]]:
        nonlocal step, epoch, next_batch
        while step < run.total_steps:
            batches = epoch_batches(plan, run.shapes, epoch)
            for first in range(next_batch, len(batches), accum):
                if step >= run.total_steps:
                    return
                yield step, batches[first : first + accum]
                step += 1
            epoch, next_batch = epoch + 1, 0

    return steps()  # the state's values are taken now, not when the reader first asks


def shares(procs, group: Group) -> list[tuple[list[tuple[Sample, int]], int]]:
    """(items, position of the first in the group) of each batch as this rank's train_step takes it: its
    contiguous share (procs.slice; the whole batch with one process), or where that share is empty the
    batch's first sample, which train.step.optimizer_step runs at weight zero."""
    out, first = [], 0
    for batch in group:
        lo, hi = procs.slice(len(batch))
        out.append((batch[lo:hi] or batch[:1], first + lo))
        first += len(batch)
    return out


@dataclasses.dataclass
class _Step:
    """One step's reads as the worker sends them, or the error reading them raised."""

    step: int
    group: Group
    reads: list[Read] | None
    error: Exception | None = None

    def pin_memory(self) -> _Step:  # the DataLoader's pinning (on CUDA) reaches the tensors through this
        return dataclasses.replace(self, reads=[r.pin_memory() for r in self.reads]) if self.reads else self


def _as_sent(item: _Step) -> _Step:
    return item  # the DataLoader's default would turn every tuple into a list


class _StepReads(IterableDataset):
    """In the worker: each upcoming step's reads, in order; after an error, nothing."""

    def __init__(self, plan: Plan, store, procs, steps: Iterable[tuple[int, Group]], mode: str):
        self.plan, self.store, self.procs, self.steps, self.mode = plan, store, procs, steps, mode

    def __iter__(self) -> Iterator[_Step]:
        self.store.forget_handles()  # the parent's open files are its own: this process opens its own
        for step, group in self.steps:
            try:
                reads = [read_batch(self.plan, self.store, items, self.mode, step, first)
                         for items, first in shares(self.procs, group)]
            except Exception as e:  # noqa: BLE001 - raised in the main process by take, as it is
                yield _Step(step, group, None, e)
                return
            yield _Step(step, group, reads)


class Prefetcher:
    """Reads each upcoming step's batches (this rank's shares of them) ahead, in a worker process.

    with Prefetcher(plan, store, procs, device, upcoming(run, plan, state)) as prefetch:
        optimizer_step(run, plan, store, group, step, reads=prefetch.take(step, group))
    """

    def __init__(self, plan: Plan, store, procs, device: torch.device, steps: Iterable[tuple[int, Group]],
                 prior_mode: str | None = None):
        mode = prior_mode or plan.cfg.train.prior_mode
        # batch_size=None: each item is one step's reads as the worker made them; fork: see the module's docstring
        self._loader = DataLoader(_StepReads(plan, store, procs, steps, mode), batch_size=None, collate_fn=_as_sent,
                                  num_workers=1, prefetch_factor=AHEAD, pin_memory=device.type == "cuda",
                                  multiprocessing_context="fork")
        self._items: Iterator | None = None

    def __enter__(self) -> Prefetcher:
        self._items = iter(self._loader)  # the worker starts here
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker (at once: what it read ahead is dropped)."""
        items, self._items = self._items, None
        if items is not None:
            items._shutdown_workers()

    def take(self, step: int, group: Group) -> list[Read]:
        """The batches of optimizer step `step`, read ahead. Raises what the worker raised reading them."""
        got = next(self._items, None)
        if got is None:
            raise RuntimeError(f"step {step}: the prefetch reader has stopped (it had no such step)")
        if got.error is not None:
            raise got.error
        if (got.step, got.group) != (step, group):
            raise RuntimeError(f"step {step}: the prefetch reader read step {got.step} (the reader and the "
                               "training loop disagree on the order of the steps)")
        return got.reads
