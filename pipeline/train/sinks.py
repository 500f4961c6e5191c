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


def summary_window(steps_per_epoch: int) -> int:
    """How many recent steps the progress bar and final_loss average: an epoch's worth (every sample seen
    once), at most 100, so that neither swings with one batch's mix of standard and prior samples."""
    return max(1, min(steps_per_epoch, 100))


def recent_mean(records: list[dict], key: str, window: int) -> float | None:
    """The mean of `key` over those of the last `window` records (steps) that have it (None: none has)."""
    values = [r[key] for r in records[-window:] if r.get(key) is not None]
    return round(sum(values) / len(values), 6) if values else None


def loss_summary(records: list[dict], window: int) -> dict:
    """The summary's losses for a whole run (records: every line of metrics.jsonl): final_loss is the standard
    loss over the last `window` steps and final_loss_prior the prior loss beside it; the last epoch's means."""
    last_epoch = [r for r in records if r["epoch"] == records[-1]["epoch"]] if records else []
    return {
        "final_loss": recent_mean(records, "loss_standard", window),
        "final_loss_prior": recent_mean(records, "loss_prior", window),
        "last_epoch_loss_standard": recent_mean(last_epoch, "loss_standard", len(last_epoch)),
        "last_epoch_loss_prior": recent_mean(last_epoch, "loss_prior", len(last_epoch)),
    }


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of a JSON-lines file. A line that does not parse is what a kill in mid-write leaves:
    it is dropped (its step is redone), not an error."""
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
    return out


def read_records(path: Path) -> list[dict]:
    """Every record of a JSON-lines file (metrics.jsonl: every step of the run, those before a resume too)."""
    return [record for _, record in _records(path)]


def _kept_lines(path: Path, resumed_at: int | None) -> list[str]:
    """On resume, the lines of the steps before the checkpoint; the later ones are redone."""
    if resumed_at is None or not path.is_file():
        return []
    return [line for line, record in _records(path) if record["step"] < resumed_at]


class JsonlSink:
    """metrics.jsonl: one line per optimizer step; validation.jsonl: one line per validation (when the run
    validates at all)."""

    def __init__(self, out_dir: Path, resumed_at: int | None, validates: bool):
        self.metrics_path = out_dir / "metrics.jsonl"
        kept = _kept_lines(self.metrics_path, resumed_at)
        self.kept = [json.loads(line) for line in kept]  # the steps before a resume's checkpoint
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

    def read_all(self) -> list[dict]:
        """Every step's record of the run, the ones before a resume included."""
        return read_records(self.metrics_path)


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
    """The bar shows the standard loss and the prior loss beside it, each over the last `window` steps (the
    summary's final_loss at the end), not the last batch's loss: that one swings with how many prior samples,
    whose loss starts near zero, the batch happened to hold."""

    def __init__(self, total: int, initial: int, enabled: bool, window: int, history: list[dict] = ()):
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled)
        self.window = window
        self.records = list(history)[-window:]  # after a resume, the steps before it count too

    def step(self, record: dict) -> None:
        self.records = [*self.records, record][-self.window:]
        self.bar.update(1)
        self.bar.set_postfix(self.postfix())

    def postfix(self) -> dict[str, str]:
        means = {name: recent_mean(self.records, key, self.window)
                 for name, key in (("standard", "loss_standard"), ("prior", "loss_prior"))}
        return {name: f"{m:.4f}" for name, m in means.items() if m is not None}

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

    def close(self, quiet: bool = False) -> None:
        """Close every sink (again is harmless); quiet: when another error is on its way, a failed last
        write (a full disk) does not replace it."""
        for s in self.sinks:
            try:
                s.close()
            except OSError:
                if not quiet:
                    raise
