"""Where a training run's numbers go, behind one small interface: every sink takes each optimizer step's
record and each validation's record. metrics.jsonl and validation.jsonl (one JSON line each), TensorBoard
(train.tensorboard) and the progress bar are the sinks here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from pipeline.errors import UserError


class Sink(Protocol):
    def step(self, record: dict) -> None: ...

    def validation(self, record: dict) -> None: ...

    def close(self) -> None: ...


def _kept_lines(path: Path, resumed_at: int | None) -> list[str]:
    """On resume, the lines of the steps before the checkpoint; the later ones are redone."""
    if resumed_at is None or not path.is_file():
        return []
    return [line for line in path.read_text().splitlines() if json.loads(line)["step"] < resumed_at]


class JsonlSink:
    """metrics.jsonl: one line per optimizer step; validation.jsonl: one line per validation (when the run
    validates at all)."""

    def __init__(self, out_dir: Path, resumed_at: int | None, validates: bool):
        self.metrics_path = out_dir / "metrics.jsonl"
        kept = _kept_lines(self.metrics_path, resumed_at)
        self.metrics = open(self.metrics_path, "w")
        self.metrics.writelines(line + "\n" for line in kept)
        self.validation_path = out_dir / "validation.jsonl" if validates else None
        if self.validation_path is not None:
            kept = _kept_lines(self.validation_path, resumed_at)
            self.validation_path.write_text("".join(line + "\n" for line in kept))

    def step(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()  # a run killed later keeps every finished step's line

    def validation(self, record: dict) -> None:
        with open(self.validation_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.metrics.close()


class TensorBoardSink:
    def __init__(self, out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("train.tensorboard = true needs TensorBoard: pip install 'prior-lora[tensorboard]'") from None
        self.board = SummaryWriter(str(out_dir / "tensorboard"))

    def step(self, record: dict) -> None:
        step = record["step"]
        for key in ("loss", "loss_standard", "loss_prior", "lr", "grad_norm"):
            if record.get(key) is not None:
                self.board.add_scalar(key.replace("loss_", "loss/"), record[key], step)
        for label, value in record["loss_by_timestep_bin"].items():
            self.board.add_scalar(f"loss_by_timestep/{label}", value, step)

    def validation(self, record: dict) -> None:
        step = record["step"]
        for key, tag in (("val_loss", "validation/loss"), ("prior_drift", "validation/prior_drift")):
            if record.get(key) is not None:
                self.board.add_scalar(tag, record[key], step)
        if record.get("samples"):
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(record["samples"]).convert("RGB"))
            self.board.add_image("samples", image, step, dataformats="HWC")

    def close(self) -> None:
        self.board.close()


class ProgressSink:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled)

    def step(self, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")

    def validation(self, record: dict) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


class Sinks:
    """All of a run's sinks as one."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def step(self, record: dict) -> None:
        for s in self.sinks:
            s.step(record)

    def validation(self, record: dict) -> None:
        for s in self.sinks:
            s.validation(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
