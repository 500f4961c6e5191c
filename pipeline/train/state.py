"""Where a training run is: the step, the epoch and the next batch in it. A checkpoint stores exactly this
beside the weights and the optimizer; LoRA dropout is seeded by (seed, step, rank) at every step
(train.step.optimizer_step), so no RNG state needs saving for a resumed run to continue bit for bit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    next_batch: int = 0  # index of the next batch in the epoch's order (train.epochs.epoch_batches)

    def position(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch}
