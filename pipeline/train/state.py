"""Where a training run is: the step, the epoch and the next batch in it. A checkpoint stores exactly this
beside the weights and the optimizer; LoRA dropout is seeded by (seed, step, rank) at every step
(train.step.optimizer_step), so no RNG state needs saving for a resumed run to continue bit for bit."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    next_batch: int = 0  # index of the next batch in the epoch's order (train.epochs.epoch_batches)
    # a fresh run's own; a resumed run keeps the one of the checkpoint it goes on from
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def position(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch}
