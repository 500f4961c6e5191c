"""A training run's output directory: one training at a time writes it, a run never mixes with another's
files there, and nothing an earlier run left is deleted.

- A lock (`.lock`, flock: the kernel drops it when a process dies) held for the whole run refuses a
  second training into the same folder, naming the first.
- Where a run starts (starting_point), without --resume or --restart, is decided by what the folder holds:
  - nothing of a run (holds_a_run): step 0, whatever else the folder holds;
  - a run of the same settings (its newest intact checkpoint has the same result keys, data and base model,
    checkpoint.changes) that stopped before this run's last step, interrupted or shorter: it goes on from
    that checkpoint, so a rerun after Ctrl-C, or with more epochs or steps, continues it;
  - that run complete (its checkpoint at this run's last step, and its LoRA): nothing to do;
  - any other run (other settings, a longer run, no checkpoint to go on from): every file of it is moved
    into previous/<UTC time of its last write>-<its run id>/ and this run starts at step 0.
  --resume goes on from the newest intact checkpoint and refuses other settings; --restart starts at
  step 0, the earlier run moved aside as above. Every case is one line on stderr.
- Moving aside takes every entry of the folder but `previous/` and the lock, whatever wrote it (files
  that later versions save beside the LoRA included): renames within one file system, nothing is copied
  or deleted. A folder that holds the config, the cache, the data or the model is not a run's to move.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.denoiser.full import MODEL_DIR
from pipeline.store.lock import take
from pipeline.errors import UserError, note, option
from pipeline.store.keys import sha256_file
from pipeline.train import checkpoint

PREVIOUS = "previous"  # earlier runs, moved aside
LOCK = ".lock"


@contextlib.contextmanager
def output_lock(out_dir: Path, job: str = "") -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = take(out_dir / LOCK, True, f"train.output_dir '{out_dir}' is in use by another training", job)
    try:
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fh.close()


def run_files(out_dir: Path) -> list[Path]:
    """Every entry of the folder that belongs to the run in it: all but earlier runs and the lock."""
    return sorted(p for p in out_dir.iterdir() if p.name not in (PREVIOUS, LOCK)) if out_dir.is_dir() else []


def final_output(out_dir: Path, cfg) -> Path:
    """What a finished run wrote last of what it must write: the LoRA, or with train.method = "full" the
    trained pipeline folder."""
    return out_dir / (MODEL_DIR if cfg.train.method == "full" else cfg.train.lora_name)


def holds_a_run(out_dir: Path, cfg) -> bool:
    """Whether a training run wrote here: its metrics.jsonl (written from its first step), checkpoints or
    LoRA (or model). A folder with none of them is not moved aside, whatever else it holds."""
    return any(p.exists() for p in (out_dir / "metrics.jsonl", out_dir / "checkpoints", final_output(out_dir, cfg)))


def starting_point(out_dir: Path, cfg, plan, data_fp: str, total_steps: int, world_size: int,
                   resume: bool, restart: bool) -> tuple[Path | None, bool]:
    """Where this run starts (see the module's docstring): the checkpoint it goes on from (None: step 0),
    and whether the run in the folder is complete already (nothing to do)."""
    if resume:
        return _resume_point(out_dir, cfg, plan, data_fp, world_size), False
    if not holds_a_run(out_dir, cfg):
        return None, False
    if restart:
        move_aside(out_dir, cfg, f"starting over ({option('--restart')})")
        return None, False
    try:
        found = checkpoint.resume_point(out_dir)  # a damaged newer one is named in a warning and passed over
    except UserError:  # every checkpoint is damaged (each named)
        found = None
    if found is None:
        move_aside(out_dir, cfg, "it has no intact checkpoint to go on from")
        return None, False
    saved = checkpoint.saved_state(found)
    changed = checkpoint.changes(saved, cfg, plan, data_fp)
    step = saved["step"]
    if changed:
        move_aside(out_dir, cfg, f"it differs in {'; '.join(changed)}")
        return None, False
    if step > total_steps:
        move_aside(out_dir, cfg, f"it went on to step {step}, and this run ends at step {total_steps}")
        return None, False
    restart_hint = f"train with {option('--restart')} to start over (the run is moved to {PREVIOUS}/)"
    if step == total_steps and final_output(out_dir, cfg).exists():
        length = "train.max_steps" if cfg.train.max_steps else "train.epochs"
        note(f"train: the run in '{out_dir}' is complete (step {step} of {total_steps}): nothing to do; raise "
             f"{length} to train on, or {restart_hint}")
        return found, True
    why = checkpoint.check_world(found, cfg, world_size)
    if why:
        note(why)
    note(f"train: going on with the run in '{out_dir}' from its checkpoint at step {step} (of {total_steps}), "
         f"'{found.name}'; {restart_hint}")
    return found, False


def _resume_point(out_dir: Path, cfg, plan, data_fp: str, world_size: int) -> Path:
    """--resume: the newest intact checkpoint, if this config continues its run with this many processes
    (else a one-line refusal naming what changed, or why the number of processes matters)."""
    found = checkpoint.resume_point(out_dir)
    if found is None:
        raise UserError(f"no checkpoint in '{out_dir / 'checkpoints'}' to resume from: train without "
                        f"{option('--resume')}")
    checkpoint.check_same_run(checkpoint.saved_state(found), cfg, plan, data_fp, found)
    why = checkpoint.check_world(found, cfg, world_size)
    if why:
        note(why)
    return found


def move_aside(out_dir: Path, cfg, why: str) -> Path:
    """Move every file of the run in `out_dir` into previous/<UTC time of its last write>-<short run id>/,
    saying so in one line; returns that folder."""
    files = run_files(out_dir)
    _refuse_if_not_a_run(out_dir, cfg)
    name = f"{_last_write(files)}-{_short_id(out_dir, cfg, files)}"
    dest, n = out_dir / PREVIOUS / name, 2
    while dest.exists():  # two runs with the same id and second: keep both
        dest, n = out_dir / PREVIOUS / f"{name}-{n}", n + 1
    try:
        dest.mkdir(parents=True)
        for path in files:
            os.replace(path, dest / path.name)  # a rename in one file system: nothing is copied or lost
    except OSError as e:
        raise UserError(f"could not move the earlier run in train.output_dir '{out_dir}' aside: "
                        f"'{e.filename}': {e.strerror}: fix the folder, or set train.output_dir to another one") from None
    note(f"train: moved the earlier run in '{out_dir}' to '{dest}' ({why})")
    return dest


def _refuse_if_not_a_run(out_dir: Path, cfg) -> None:
    """A folder that holds what the run reads (its config, cache, data or model) is not a run's folder:
    moving "everything in it" would move those too."""
    theirs = [("the config file", cfg.source), ("cache.dir", cfg.cache.dir), ("model.path", cfg.model.path),
              *((f"concepts[{i}].folder", c.folder) for i, c in enumerate(cfg.concepts))]
    here = out_dir.resolve()
    for what, path in theirs:
        if path and Path(path).exists() and Path(path).resolve().is_relative_to(here):
            raise UserError(f"train.output_dir '{out_dir}' holds {what} ('{path}'), so the earlier run's files "
                            "cannot be told from yours: set train.output_dir to a folder of its own")


def _last_write(files: list[Path]) -> str:
    """When the run last wrote a file, in UTC (ISO 8601's basic format: 20250131T142501Z)."""
    newest = 0.0
    for top in files:
        inside = os.walk(top) if top.is_dir() and not top.is_symlink() else []
        for path in [str(top), *(os.path.join(root, n) for root, _, names in inside for n in names)]:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(path).st_mtime)
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(newest))


def _short_id(out_dir: Path, cfg, files: list[Path]) -> str:
    """The run's id as its checkpoints recorded it (first 8 characters); for a run without one, the start
    of the sha256 of its LoRA file, else of its metrics.jsonl, else of its file names: the same run gets
    the same name."""
    for path in reversed(checkpoint.all_checkpoints(out_dir)):
        run_id = checkpoint.run_id(path)
        if run_id:
            return str(run_id)[:8]
    for name in (cfg.train.lora_name, "metrics.jsonl"):
        with contextlib.suppress(OSError):
            return sha256_file(out_dir / name)[:8]
    return hashlib.sha256("\n".join(p.name for p in files).encode()).hexdigest()[:8]
