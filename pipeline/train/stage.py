"""Stage 2: load only the denoiser, add a LoRA and train on the cache. One denoiser forward per batch:
a prior sample's target is its cached base-model prediction, read from disk, not recomputed.

The loop: setup (train.setup) builds the run, each optimizer step is train.step.optimizer_step, its
record goes to the sinks (train.sinks), validation runs at chosen steps (train.validation), and a
checkpoint of the TrainState is written every train.checkpoint_every steps (train.checkpoint)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from pipeline.cache.kinds import check_complete
from pipeline.cache.lock import cache_lock
from pipeline.config import Config, check_output_dir
from pipeline.errors import Interrupted, UserError, note
from pipeline.lora import save_run_lora
from pipeline.memory import say_estimate
from pipeline.plan import open_plan, pick_device
from pipeline.train import checkpoint
from pipeline.train.epochs import epoch_batches
from pipeline.train.practice import batch_size_warning, practice_warnings, prior_share
from pipeline.train.setup import setup
from pipeline.train.sinks import JsonlSink, ProgressSink, Sinks, TensorBoardSink, loss_summary, summary_window
from pipeline.train.state import TrainState
from pipeline.train.step import NonFinite, optimizer_step
from pipeline.train.validation import Validator


def run_train(cfg: Config, progress: bool = True, resume: bool = False) -> dict:
    """Train a LoRA on the cache and save it; with resume, go on from the newest checkpoint.
    Raises UserError when the cache lacks anything needed."""
    return train_lora(cfg, progress, resume)[1]


def train_lora(cfg: Config, progress: bool = True, resume: bool = False) -> tuple[torch.nn.Module, dict]:
    """run_train, returning the trained model too (the tests compare it with the saved LoRA)."""
    with cache_lock(cfg.cache.dir, "read"):
        return _train_lora(cfg, progress, resume)


def _non_finite(e: NonFinite, out_dir: Path) -> str:
    last = checkpoint.latest(out_dir)
    images = ", ".join(f"'{i}'" for i in e.images[:4]) + (f" and {len(e.images) - 4} more" if len(e.images) > 4 else "")
    saved = (f"the last good checkpoint is '{last}' (--resume goes on from it)" if last is not None
             else "there is no checkpoint (train.checkpoint_every)")
    return (f"training stopped at step {e.step}: the {e.what} is not finite, for the batch of {images}; no LoRA "
            f"was written and no checkpoint after this step, {saved}: lower optimizer.lr, or check those images")


def _train_lora(cfg: Config, progress: bool, resume: bool) -> tuple[torch.nn.Module, dict]:
    start = time.perf_counter()
    check_output_dir(cfg)
    plan, store = open_plan(cfg)
    check_complete(plan, store)
    t = cfg.train
    out_dir = Path(t.output_dir)
    found = _resume_point(cfg, out_dir) if resume else None  # refusals before the model is loaded
    if not resume:
        _say_if_replacing(out_dir, cfg)
    torch.manual_seed(t.seed)
    say_estimate(cfg, cache=False)  # builds no VAE or text encoder, not even on the meta device
    practice_warnings(plan)
    run = setup(plan, store, pick_device(t.device))
    batch_size_warning(epoch_batches(plan, run.shapes, 0), t.batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint.restore(found, run) if found else TrainState()
    resumed_at = state.step if resume else None
    jsonl = JsonlSink(out_dir, resumed_at, Validator.enabled(plan))
    window = summary_window(run.steps_per_epoch)
    sinks = Sinks([jsonl, ProgressSink(run.total_steps, state.step, progress, window, jsonl.kept)]
                  + ([TensorBoardSink(out_dir)] if t.tensorboard else []))
    validator = Validator(plan, store, run.denoiser, out_dir, sinks)
    try:
        if state.step == 0:
            validator.run(0)  # the baseline: drift is zero here by construction, the loss is the base model's
        accum = t.gradient_accumulation
        while state.step < run.total_steps:
            batches = epoch_batches(plan, run.shapes, state.epoch)
            for first in range(state.next_batch, len(batches), accum):
                if state.step >= run.total_steps:
                    break
                # variant: that of the samples seen once this epoch (see epoch_batches)
                record = {"step": state.step, "epoch": state.epoch, "variant": state.epoch % cfg.cache.variants,
                          **optimizer_step(run, plan, store, batches[first : first + accum], state.step)}
                sinks.step(record)
                state.step, state.next_batch = state.step + 1, first + accum
                if cfg.validation.every and state.step % cfg.validation.every == 0:
                    validator.run(state.step)
                if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.step < run.total_steps:
                    checkpoint.save(out_dir, state, run, plan)
            state.epoch, state.next_batch = state.epoch + 1, 0
        validator.run(state.step)  # the end (skipped when the last step was just validated)
    except NonFinite as e:
        raise UserError(_non_finite(e, out_dir)) from None
    finally:
        sinks.close()
    model = run.denoiser.module
    lora_path = out_dir / t.lora_name
    save_run_lora(lora_path, model, plan, state.step)
    store.close()
    try:
        from pipeline.plot import plot_run  # matplotlib only here

        plot = plot_run(out_dir)
    except KeyboardInterrupt:
        raise Interrupted(f"the LoRA was already written to '{lora_path}' (after step {state.step}); only the loss plot "
                          f"and the summary are missing (python -m pipeline plot {out_dir} makes the plot)") from None
    return model, {
        "steps": state.step,
        "epochs": math.ceil(state.step / max(run.steps_per_epoch, 1)),
        "resumed_from_step": resumed_at,
        # the whole run's numbers, from metrics.jsonl: after --resume it holds the steps before it too
        **loss_summary(jsonl.read_all(), window),
        "prior_share": prior_share(plan),
        "images_per_bucket": plan.bucket_counts(),
        **validator.last,
        "skipped_images": plan.skipped,
        "lora": str(lora_path),
        "metrics": str(jsonl.metrics_path),
        "plot": str(plot),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _resume_point(cfg: Config, out_dir: Path) -> Path:
    """The newest checkpoint, if this config continues its run (else a one-line refusal naming the keys)."""
    found = checkpoint.latest(out_dir)
    if found is None:
        raise UserError(f"no checkpoint in '{out_dir / 'checkpoints'}' to resume from: train without --resume")
    checkpoint.check_same_run(checkpoint.saved_config(found), cfg, found)
    return found


def _say_if_replacing(out_dir: Path, cfg: Config) -> None:
    """A run without --resume starts over in output_dir; say so when an earlier run's results are there."""
    t = cfg.train
    if not ((out_dir / t.lora_name).is_file() or (out_dir / "metrics.jsonl").is_file()):
        return
    what = ("its LoRA, metrics.jsonl and validation.jsonl are rewritten, and the sample grids of the steps this "
            "run validates")
    if checkpoint.latest(out_dir) is not None:
        what += ("; its checkpoints go once this run writes its first" if t.checkpoint_every
                 else "; its checkpoints stay (this run writes none)") + ", and --resume would go on from them instead"
    note(f"train: replacing the run in '{out_dir}' ({what})")
