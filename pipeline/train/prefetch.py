"""Reading the next optimizer step's batches while this one computes, so that the step waits on nothing but
compute: one background thread and a queue of depth 1. It reads exactly what train_step would read itself
(train.step.read_batch, with the same seeds), so a run is bitwise the same with it as without. On CUDA the
tensors are pinned, so that their copies to the device are DMA transfers that need not hold up the host.

`take` raises the reader's error in the main thread, at the step that needed that batch, as it was raised
(a damaged cache entry's UserError still prints its one line). The thread stops when the `with` block ends:
at the run's end, on an error and on KeyboardInterrupt. It is a daemon, so no read can hold up the exit."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator

import torch

from pipeline.data.batches import Inputs
from pipeline.data.plan import Plan, Sample
from pipeline.train.epochs import epoch_batches
from pipeline.train.step import Read, read_batch

Group = list[list[tuple[Sample, int]]]  # the batches of one optimizer step (gradient accumulation)

POLL_SECONDS = 0.1  # how often a wait looks whether the other side has stopped
JOIN_SECONDS = 30.0  # a read in progress finishes within this, or the daemon is left to the exit


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
    batch's first sample, which train.step._shared_step runs at weight zero."""
    out, first = [], 0
    for batch in group:
        lo, hi = procs.slice(len(batch))
        out.append((batch[lo:hi] or batch[:1], first + lo))
        first += len(batch)
    return out


def _pinned(read: Read) -> Read:
    pin = lambda v: {k: t.pin_memory() for k, t in v.items()} if isinstance(v, dict) else v.pin_memory()  # noqa: E731
    inputs = Inputs(**{f.name: pin(getattr(read.inputs, f.name)) for f in dataclasses.fields(Inputs)})
    return dataclasses.replace(read, inputs=inputs, target=read.target.pin_memory())


class Prefetcher:
    """Reads each upcoming step's batches (this rank's shares of them) one step ahead, in a background thread.

    with Prefetcher(plan, store, procs, device, upcoming(run, plan, state)) as prefetch:
        optimizer_step(run, plan, store, group, step, reads=prefetch.take(step, group))
    """

    def __init__(self, plan: Plan, store, procs, device: torch.device, steps: Iterable[tuple[int, Group]],
                 prior_mode: str | None = None):
        self.plan, self.store, self.procs = plan, store, procs
        self.mode = prior_mode or plan.cfg.train.prior_mode
        self.pin = device.type == "cuda"
        self._steps = iter(steps)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._room = threading.Semaphore(1)  # one step ahead: the next is read once this one is taken
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="prefetch", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reader and wait for a read in progress (at most JOIN_SECONDS)."""
        self._stop.set()
        try:
            self._queue.get_nowait()  # a reader waiting to put sees the stop sooner
        except queue.Empty:
            pass
        if self._thread.is_alive():
            self._thread.join(JOIN_SECONDS)

    def take(self, step: int, group: Group) -> list[Read]:
        """The batches of optimizer step `step`, read ahead. Raises what the reader raised reading them."""
        while True:
            try:
                got_step, got_group, reads, error = self._queue.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"step {step}: the prefetch reader has stopped (it had no such step)") from None
        self._room.release()
        if error is not None:
            raise error
        if (got_step, got_group) != (step, group):
            raise RuntimeError(f"step {step}: the prefetch reader read step {got_step} (the reader and the "
                               "training loop disagree on the order of the steps)")
        return reads

    def _read(self) -> None:
        try:
            for step, group in self._steps:
                if not self._wait_for_room():
                    return
                reads = [read_batch(self.plan, self.store, items, self.mode, step, first)
                         for items, first in shares(self.procs, group)]
                if self.pin:
                    reads = [_pinned(r) for r in reads]
                self._put((step, group, reads, None))
        except BaseException as e:  # noqa: BLE001 - raised in the main thread by take, as it is
            self._put((None, None, None, e))

    def _wait_for_room(self) -> bool:
        while not self._stop.is_set():
            if self._room.acquire(timeout=POLL_SECONDS):
                return True
        return False

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue
