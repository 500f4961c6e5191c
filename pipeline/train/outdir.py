"""A training run's output directory: one training at a time writes it, and a run never mixes with
another's checkpoints there.

- A lock (`.lock`, flock: the kernel drops it when a process dies) held for the whole run refuses a
  second training into the same folder, naming the first.
- A fresh run (no --resume) into a folder whose newest checkpoint was written by a run that differs in
  results (config keys in checkpoint.RESULT_KEYS, the data or the base model) is refused unless told
  --overwrite: otherwise a later --resume there could go on from the other run's step. With
  --overwrite, those checkpoints are removed first. A fresh run with the same settings (`make train`
  again) goes ahead with a notice: its checkpoints replace the earlier ones as it writes them.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.store.lock import take
from pipeline.errors import UserError, note
from pipeline.train import checkpoint


@contextlib.contextmanager
def output_lock(out_dir: Path, job: str = "") -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = take(out_dir / ".lock", True, f"train.output_dir '{out_dir}' is in use by another training", job)
    try:
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fh.close()


def check_fresh_start(out_dir: Path, cfg, plan, data_fp: str, overwrite: bool) -> None:
    """Before a fresh run: refuse (or with overwrite, clear) another run's checkpoints; say what an earlier
    run's files this run replaces."""
    found = checkpoint.latest(out_dir)
    if found is not None:
        try:
            changed = checkpoint.changes(checkpoint.saved_state(found), cfg, plan, data_fp)
        except (OSError, ValueError):
            changed = ["its state.json is unreadable"]
        if changed and not overwrite:
            raise UserError(
                f"train.output_dir '{out_dir}' holds the checkpoints of another run (newest '{found.name}'; "
                f"it differs in {'; '.join(changed)}): train with --overwrite to replace that run, with --resume "
                "and its settings to go on with it, or set train.output_dir to another folder")
        if changed or overwrite:
            for path in checkpoint.all_checkpoints(out_dir):
                shutil.rmtree(path, ignore_errors=True)
            note(f"train: --overwrite: removed the checkpoints of the earlier run in '{out_dir / 'checkpoints'}'")
    _say_if_replacing(out_dir, cfg)


def _say_if_replacing(out_dir: Path, cfg) -> None:
    """A run without --resume starts over in output_dir; say so when an earlier run's results are there."""
    t = cfg.train
    if not ((out_dir / t.lora_name).is_file() or (out_dir / "metrics.jsonl").is_file()):
        return
    what = ("its LoRA, metrics.jsonl and validation.jsonl are rewritten, and the sample grids of the steps this "
            "run validates")
    if checkpoint.latest(out_dir) is not None:  # the same settings: resuming from them gives this very run
        what += ("; its checkpoints go once this run writes its first" if t.checkpoint_every
                 else "; its checkpoints stay (this run writes none)") + ", and --resume would go on from them instead"
    note(f"train: replacing the run in '{out_dir}' ({what})")
