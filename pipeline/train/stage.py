"""Stage 2: load only the denoiser, add a LoRA and train on the cache. One denoiser forward per batch:
a prior sample's target is its cached base-model prediction, read from disk, not recomputed.

The loop: setup (train.setup) builds the run, each optimizer step is train.step.optimizer_step on batches
read one step ahead in a background thread (train.prefetch), its record goes to the sinks (train.sinks),
validation runs at chosen steps (train.validation), and a checkpoint of the TrainState is written every
train.checkpoint_every steps and at the last (train.checkpoint). Where the run starts (step 0, a checkpoint
of the run in train.output_dir, or nothing to do) is train.outdir's decision.

Under a launcher (pipeline/processes.py) every rank runs this loop over the same global batches (epoch_batches is a
pure function of seed and epoch) and takes its share of each (train.step); rank 0 alone writes: the LoRA,
checkpoints, metrics (gathered from every rank, so they read as one process's) and sample grids."""

from __future__ import annotations

import errno
import json
import math
import time
from pathlib import Path

import torch

from pipeline.data.kinds import check_complete
from pipeline.store.lock import cache_lock
from pipeline.config import Config, check_output_dir
from pipeline.errors import Interrupted, UserError, option, warn
from pipeline.denoiser.full import EXTRACTED, SINGLE_FILE, save_run_model
from pipeline.denoiser.lora import save_run_lora
from pipeline.memory import say_estimate
from pipeline.data.plan import open_plan
from pipeline.processes import OneProcess, launched_size, start
from pipeline.settings import Settings, resolve
from pipeline.train import checkpoint
from pipeline.train.outdir import final_output, output_lock, starting_point
from pipeline.train.ema import ema_path, save_ema_lora
from pipeline.train.epochs import epoch_batches
from pipeline.train.practice import batch_size_warning, practice_warnings, prior_share
from pipeline.train.prefetch import Prefetcher, upcoming
from pipeline.train.setup import Length, run_length, setup
from pipeline.train.sinks import (JsonlSink, ProgressSink, Sinks, TensorBoardSink, loss_summary, read_records,
                                  summary_window)
from pipeline.train.state import TrainState
from pipeline.train.step import NonFinite, optimizer_step
from pipeline.train.validation import Validator


def run_train(cfg: Config, progress: bool = True, resume: bool = False, restart: bool = False,
              overwrite: bool = False) -> dict:
    """Train a LoRA on the cache and save it. Where it starts is train.outdir's decision: a run of the same
    settings in train.output_dir goes on from its newest checkpoint, another is moved aside; with resume,
    go on from the newest intact checkpoint or refuse; with restart (overwrite: its former name), start
    over, the earlier run moved aside. With validation.compare_without_priors, the comparison run follows
    (train.comparison). Raises UserError when the cache lacks anything needed."""
    model, summary = train_lora(cfg, progress, resume, restart, overwrite)
    if not cfg.validation.compare_without_priors:
        return summary
    if launched_size() > 1:
        warn("validation.compare_without_priors: no comparison run under a launcher (run `train` in one process "
             "to make it)")
        return summary
    from pipeline.train.comparison import compare

    # the comparison run goes on from its own checkpoint where it has one, else it starts (never --resume:
    # the first run may have been interrupted before it began)
    return compare(cfg, model, summary, lambda other: train_lora(other, progress, False, restart or overwrite))


def train_lora(cfg: Config, progress: bool = True, resume: bool = False, restart: bool = False,
               overwrite: bool = False) -> tuple[torch.nn.Module | None, dict]:
    """run_train, returning the trained model too (the tests compare it with the saved LoRA; None when the
    run in train.output_dir was complete already)."""
    restart = restart or overwrite
    if resume and restart:
        raise UserError(f"{option('--resume')} goes on with the run in train.output_dir and {option('--restart')} "
                        "starts over: give one")
    check_output_dir(cfg)
    settings = resolve(cfg, "train")  # every refusal, before any process group, model or cache work
    with start(settings.processes, cfg.train.device) as procs:
        # rank 0 holds the locks for the whole job; a refusal is raised on every rank alike
        with procs.main_holds(lambda: cache_lock(cfg.cache.dir, "read", procs.job())), \
                procs.main_holds(lambda: output_lock(Path(cfg.train.output_dir), procs.job())):
            return _train_lora(settings, progress and procs.is_main, resume, restart, procs)


def _non_finite(e: NonFinite, out_dir: Path) -> str:
    images = ", ".join(f"'{i}'" for i in e.images[:4]) + (f" and {len(e.images) - 4} more" if len(e.images) > 4 else "")
    return (f"training stopped at step {e.step}: the {e.what} is not finite, for the batch of {images}; no LoRA "
            f"was written and no checkpoint after this step, {_last_checkpoint(out_dir)}: lower optimizer.lr, or "
            "check those images")


# What a full disk, a quota, a file size limit, a read-only or forbidden folder or a failing disk give
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _write_failed(e: OSError, out_dir: Path, step: int, what: str) -> Exception:
    """The one-line UserError for a failed write during training (re-raised as it is when it is not one)."""
    if e.errno not in WRITE_ERRORS:
        return e
    where = f"'{e.filename}'" if e.filename else "a file"
    return UserError(f"training stopped after step {step}: could not write {where} ({e.strerror}); {what}, "
                     f"{_last_checkpoint(out_dir)}: free space or fix the folder, then train again")


def _last_checkpoint(out_dir: Path) -> str:
    last = checkpoint.latest(out_dir)
    return (f"the last good checkpoint is '{last}' (training again with the same settings goes on from it)"
            if last is not None else "there is no checkpoint (train.checkpoint_every)")


def _train_lora(settings: Settings, progress: bool, resume: bool, restart: bool,
                procs: OneProcess) -> tuple[torch.nn.Module | None, dict]:
    start_time = time.perf_counter()
    cfg = settings.cfg
    plan, store = open_plan(cfg, settings)
    check_complete(plan, store)
    t = cfg.train
    out_dir = Path(t.output_dir)
    data_fp = plan.data_fp()
    # another config file or data on one machine: the keys that change results, the data and the base model
    procs.refuse_unlike(lambda: {"config": json.loads(cfg.portable_json()), "data": data_fp,
                                 "base_model": plan.denoiser_fp},
                        lambda theirs: checkpoint.changes(theirs, cfg, plan, data_fp), "would train another run")
    length = run_length(plan, store)
    # refusals before the model is loaded; rank 0's view of the output folder decides for every rank
    found, complete = procs.from_main(lambda: starting_point(out_dir, cfg, plan, data_fp, length.total_steps,
                                                             procs.size, resume, restart))
    if complete:
        return None, (_complete(out_dir, cfg, found, length, start_time) if procs.is_main else {})
    device = settings.stage_device(procs)
    # builds no VAE or text encoder, not even on the meta device; under FSDP, one rank's share
    say_estimate(cfg, device, cache=False, shards=procs.shards)
    practice_warnings(plan)
    # the run built in dependency order, a checkpoint's state loaded into it (under FSDP the ranks of a
    # machine take turns, so that it holds one unsharded copy at a time)
    run, state = procs.one_by_one(lambda: setup(plan, store, device, settings.dtype, procs, found, length),
                                  "loading the denoiser")
    batch_size_warning(epoch_batches(plan, run.shapes, 0), t.batch_size)
    state.run_id = procs.broadcast(state.run_id)  # a fresh run's id: rank 0's
    resumed_at = state.step if found is not None else None
    window = summary_window(run.steps_per_epoch)
    jsonl = JsonlSink(out_dir, resumed_at, Validator.enabled(plan)) if procs.is_main else None
    sinks = Sinks([jsonl, ProgressSink(run.total_steps, state.step, progress, window, jsonl.kept)]
                  + ([TensorBoardSink(out_dir)] if t.tensorboard else []) if procs.is_main else [])
    validator = Validator(plan, store, run.denoiser, out_dir, sinks, procs)
    model = run.denoiser.module
    lora_path = final_output(out_dir, cfg)  # the LoRA, or the trained pipeline folder (train.method = "full")
    try:
        # the next step's batches are read while this one computes (stopped on any way out of the loop)
        with Prefetcher(plan, store, procs, run.denoiser.device, upcoming(run, plan, state)) as prefetch:
            _loop(run, plan, store, state, sinks, validator, data_fp, prefetch)
        with procs.whole_lora(model, every=t.method == "full"):  # under FSDP every rank gathers; rank 0 writes
            if procs.is_main and t.method == "full":
                save_run_model(out_dir, model, plan, state.step)
            elif procs.is_main:
                save_run_lora(lora_path, model, plan, state.step)  # first: everything after it is optional
                if run.ema is not None:
                    save_ema_lora(lora_path, run.ema, run.params, model, plan, state.step)
        procs.barrier("the LoRA's save", "the checkpoints, if any, are kept (training again with the same "
                      "settings goes on from the newest)")
    except BaseException as e:
        sinks.close(quiet=True)  # an error is on its way: a failed last metrics write must not replace it
        if isinstance(e, NonFinite):
            raise UserError(_non_finite(e, out_dir)) from None
        if isinstance(e, OSError):
            raise _write_failed(e, out_dir, state.step, "no LoRA was written") from None
        raise
    plot = None
    try:
        try:
            validator.run(state.step)  # the end (skipped when the last step was just validated); every rank
            store.close()
            if not procs.is_main:
                return model, {}
            sinks.close()
            from pipeline.plot import plot_run  # matplotlib only here

            plot = plot_run(out_dir)
        except OSError as e:
            sinks.close(quiet=True)
            if e.errno not in WRITE_ERRORS:
                raise
            warn(f"could not write '{e.filename}' ({e.strerror}) after the LoRA was written to '{lora_path}': the "
                 "end-of-run validation or loss plot is missing (python -m pipeline plot makes the plot)")
    except KeyboardInterrupt:
        raise Interrupted(f"the LoRA was already written to '{lora_path}' (after step {state.step}); only the "
                          "end-of-run validation, the loss plot and the summary are missing (python -m pipeline "
                          f"plot {out_dir} makes the plot)") from None
    return model, {
        "steps": state.step,
        "epochs": math.ceil(state.step / max(run.steps_per_epoch, 1)),
        "resumed_from_step": resumed_at,
        # the whole run's numbers, from metrics.jsonl: after a resume it holds the steps before it too
        **loss_summary(jsonl.read_all(), window),
        "prior_share": prior_share(plan),
        "images_per_bucket": plan.bucket_counts(),
        **validator.last,
        "skipped_images": plan.skipped,
        **({"model": str(lora_path), "model_file": str(out_dir / SINGLE_FILE)} if t.method == "full" else
           {"lora": str(lora_path)}),
        **({"lora_ema": str(ema_path(lora_path))} if run.ema is not None else {}),
        **({"extracted_lora": str(out_dir / EXTRACTED)} if t.method == "full" and t.extract_rank else {}),
        "metrics": str(jsonl.metrics_path),
        "plot": str(plot) if plot else None,
        "seconds": round(time.perf_counter() - start_time, 2),
    }


def _loop(run, plan, store, state: TrainState, sinks: Sinks, validator: Validator, data_fp: str,
          prefetch: Prefetcher) -> None:
    """The optimizer steps from `state` to the run's end, with validation and checkpoints between them;
    `prefetch` has read each step's batches ahead, in this order."""
    cfg, t = plan.cfg, plan.cfg.train
    first_step = state.step
    if state.step == 0:
        validator.run(0)  # the baseline: drift is zero here by construction, the loss is the base model's
    accum = t.gradient_accumulation
    while state.step < run.total_steps:
        batches = epoch_batches(plan, run.shapes, state.epoch)
        for first in range(state.next_batch, len(batches), accum):
            if state.step >= run.total_steps:
                break
            # variant: that of the samples seen once this epoch (see epoch_batches)
            group = batches[first : first + accum]
            record = {"step": state.step, "epoch": state.epoch, "variant": state.epoch % cfg.cache.variants,
                      **optimizer_step(run, plan, store, group, state.step, check=state.step == first_step,
                                       reads=prefetch.take(state.step, group))}
            sinks.step(record)
            state.step, state.next_batch = state.step + 1, first + accum
            if cfg.validation.every and state.step % cfg.validation.every == 0:
                validator.run(state.step)
            # the last step too: a longer run of these settings goes on from the end of this one
            if t.checkpoint_every and (state.step % t.checkpoint_every == 0 or state.step == run.total_steps):
                # under FSDP every rank gathers (a full fine-tuning's weights onto rank 0's CPU); rank 0 writes
                with run.procs.whole_lora(run.denoiser.module, every=cfg.train.method == "full"):
                    optimizer_state = run.optimizer_state()
                    if run.procs.is_main:
                        checkpoint.save(Path(t.output_dir), state, run, plan, data_fp, optimizer_state)
        state.epoch, state.next_batch = state.epoch + 1, 0


def _complete(out_dir: Path, cfg: Config, found: Path, length: Length, start_time: float) -> dict:
    """The summary of a run that was complete already (nothing trained): its numbers, from its files."""
    step = checkpoint.saved_state(found)["step"]
    metrics, plot = out_dir / "metrics.jsonl", out_dir / "loss.png"
    return {
        "steps": step,
        "epochs": math.ceil(step / max(length.steps_per_epoch, 1)),
        "resumed_from_step": None,
        "complete_already": True,
        **loss_summary(read_records(metrics) if metrics.is_file() else [], summary_window(length.steps_per_epoch)),
        **({"model": str(final_output(out_dir, cfg)), "model_file": str(out_dir / SINGLE_FILE)}
           if cfg.train.method == "full" else {"lora": str(out_dir / cfg.train.lora_name)}),
        **({"lora_ema": str(ema_path(out_dir / cfg.train.lora_name))} if cfg.train.ema else {}),
        "metrics": str(metrics),
        "plot": str(plot) if plot.is_file() else None,
        "seconds": round(time.perf_counter() - start_time, 2),
    }
