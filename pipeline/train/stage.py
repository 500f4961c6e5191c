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
from pipeline.cache.store import Store
from pipeline.config import Config, check_paths
from pipeline.errors import UserError
from pipeline.lora import save_lora
from pipeline.plan import make_plan, pick_device
from pipeline.train import checkpoint
from pipeline.train.epochs import epoch_batches
from pipeline.train.practice import practice_warnings, prior_share
from pipeline.train.setup import setup
from pipeline.train.sinks import JsonlSink, ProgressSink, Sinks, TensorBoardSink
from pipeline.train.state import TrainState
from pipeline.train.step import optimizer_step
from pipeline.train.validation import Validator


def run_train(cfg: Config, progress: bool = True, resume: bool = False) -> dict:
    """Train a LoRA on the cache and save it; with resume, go on from the newest checkpoint.
    Raises UserError when the cache lacks anything needed."""
    return train_lora(cfg, progress, resume)[1]


def train_lora(cfg: Config, progress: bool = True, resume: bool = False) -> tuple[torch.nn.Module, dict]:
    """run_train, returning the trained model too (the tests compare it with the saved LoRA)."""
    with cache_lock(cfg.cache.dir, "read"):
        return _train_lora(cfg, progress, resume)


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r[key] is not None]
    return round(sum(values) / len(values), 6) if values else None


def _train_lora(cfg: Config, progress: bool, resume: bool) -> tuple[torch.nn.Module, dict]:
    start = time.perf_counter()
    check_paths(cfg)
    plan = make_plan(cfg)
    store = Store(cfg.cache.dir)
    plan.drop_bad(store)
    check_complete(plan, store)
    t = cfg.train
    torch.manual_seed(t.seed)
    practice_warnings(plan)
    run = setup(plan, store, pick_device(t.device))
    out_dir = Path(t.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = TrainState()
    if resume:
        found = checkpoint.latest(out_dir)
        if found is None:
            raise UserError(f"no checkpoint in '{out_dir / 'checkpoints'}' to resume from: train without --resume")
        state = checkpoint.restore(found, run)
    resumed_at = state.step if resume else None
    jsonl = JsonlSink(out_dir, resumed_at, Validator.enabled(plan))
    sinks = Sinks([jsonl, ProgressSink(run.total_steps, state.step, progress)]
                  + ([TensorBoardSink(out_dir)] if t.tensorboard else []))
    validator = Validator(plan, store, run.denoiser, out_dir, sinks)
    last, epoch_records = {}, []
    try:
        if state.step == 0:
            validator.run(0)  # the baseline: drift is zero here by construction, the loss is the base model's
        accum = t.gradient_accumulation
        while state.step < run.total_steps:
            epoch_records = []
            batches = epoch_batches(plan, run.shapes, state.epoch)
            for first in range(state.next_batch, len(batches), accum):
                if state.step >= run.total_steps:
                    break
                last = optimizer_step(run, plan, store, batches[first : first + accum], state.step)
                # variant: that of the samples seen once this epoch (see epoch_batches)
                record = {"step": state.step, "epoch": state.epoch, "variant": state.epoch % cfg.cache.variants, **last}
                epoch_records.append(record)
                sinks.step(record)
                state.step, state.next_batch = state.step + 1, first + accum
                if cfg.validation.every and state.step % cfg.validation.every == 0:
                    validator.run(state.step)
                if t.checkpoint_every and state.step % t.checkpoint_every == 0 and state.step < run.total_steps:
                    checkpoint.save(out_dir, state, run, t.keep_checkpoints)
            state.epoch, state.next_batch = state.epoch + 1, 0
        validator.run(state.step)  # the end (skipped when the last step was just validated)
    finally:
        sinks.close()
    model = run.denoiser.module
    lora_path = out_dir / t.lora_name
    save_lora(
        lora_path, model, plan.family,
        {"prior_lora.config": cfg.portable_json(), "prior_lora.base_model": plan.denoiser_fp,
         "prior_lora.family": plan.family.name, "prior_lora.steps": str(state.step)},
        cfg.lora, t.lora_format,
    )
    store.close()
    from pipeline.plot import plot_run  # matplotlib only here

    plot = plot_run(out_dir)
    return model, {
        "steps": state.step,
        "epochs": math.ceil(state.step / max(run.steps_per_epoch, 1)),
        "final_loss": last.get("loss"),
        "last_epoch_loss_standard": _mean(epoch_records, "loss_standard"),
        "last_epoch_loss_prior": _mean(epoch_records, "loss_prior"),
        "prior_share": prior_share(plan),
        "images_per_bucket": plan.bucket_counts(),
        **validator.last,
        "skipped_images": plan.skipped,
        "lora": str(lora_path),
        "metrics": str(jsonl.metrics_path),
        "plot": str(plot),
        "seconds": round(time.perf_counter() - start, 2),
    }
