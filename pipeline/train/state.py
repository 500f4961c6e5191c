"""Where a training run is: the step, the epoch and the next batch in it, and the RNG state that LoRA
dropout draws from. A checkpoint stores exactly this, so a resumed run continues bit for bit."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    next_batch: int = 0  # index of the next batch in the epoch's order (train.epochs.epoch_batches)
    # a fresh run's own; a resumed run keeps the one of the checkpoint it goes on from
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    def position(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch}

    @staticmethod
    def rng() -> dict:
        """The global RNG states (LoRA dropout draws from them)."""
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    @staticmethod
    def restore_rng(rng: dict) -> None:
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
