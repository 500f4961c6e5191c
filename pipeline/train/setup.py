"""Everything a training run builds before its first step, in dependency order (torchtune's): the denoiser
with its LoRA (a checkpoint's LoRA loaded into it, whole), placed by the process setup (DDP's wrapper, or
FSDP's shards), then the optimizer over the parameters as they train, the learning-rate schedule over the
run's length, and a checkpoint's optimizer and schedule state loaded into those. Nothing is rebuilt after
placement."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.denoiser.model import Denoiser
from pipeline.store.store import Store
from pipeline.denoiser.build import build_denoiser
from pipeline.data.plan import Plan
from pipeline.processes import OneProcess
from pipeline.denoiser.swap import swap_blocks
from pipeline.train import checkpoint, ema
from pipeline.train.epochs import epoch_batches
from pipeline.train.full import FullOptimizer
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.state import TrainState


@dataclass
class Run:
    denoiser: Denoiser  # the frozen base with the LoRA, in train mode: what saves, validates and renders
    # the same model as its training forward runs it: under DDP through its wrapper, which every rank must
    # enter together (a forward on one rank alone, a sample grid, uses `denoiser`); else `denoiser` itself
    trained: Denoiser
    params: list[torch.nn.Parameter]  # what trains (the LoRA's, float32; under FSDP their shards; or the weights)
    optimizer: torch.optim.Optimizer  # or train.full's FullOptimizer (train.method = "full")
    scheduler: object  # the lr schedule (a torch LRScheduler; ours, not accelerate's, which would step per process)
    shapes: dict[str, tuple]  # latent key -> shape, read from the cache once per run
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    procs: OneProcess  # the processes training together
    ema: object | None = None  # train.ema: diffusers' EMAModel over `params` (train.ema)

    def optimizer_state(self) -> dict:
        """The optimizer's state as one process holds it (under FSDP gathered: every rank calls this)."""
        return self.procs.optimizer_state(self.optimizer)


@dataclass(frozen=True)
class Length:
    shapes: dict[str, tuple]  # latent key -> shape, read from the cache once per run
    steps_per_epoch: int  # optimizer steps
    total_steps: int


def run_length(plan: Plan, store: Store) -> Length:
    """How many optimizer steps the run has (read before any model loads: the output folder's decision
    whether a run there is complete needs it)."""
    t = plan.cfg.train
    shapes = {s.latent_keys[0]: store.shape("latent", s.latent_keys[0], "latent") for s in plan.samples}
    steps_per_epoch = math.ceil(len(epoch_batches(plan, shapes, 0)) / t.gradient_accumulation)
    return Length(shapes, steps_per_epoch, t.max_steps or t.epochs * steps_per_epoch)


def setup(plan: Plan, store: Store, device: torch.device, dtype: torch.dtype, procs: OneProcess,
          resume_from: Path | None = None, length: Length | None = None) -> tuple[Run, TrainState]:
    """The run, and where it starts: a fresh TrainState, or with `resume_from` the checkpoint's, its LoRA,
    optimizer and schedule state loaded into what is built here. `length`: run_length's, when the caller
    has read it already."""
    cfg = plan.cfg
    torch.manual_seed(cfg.train.seed)  # the LoRA's initial weights: the same on every rank
    denoiser, _ = build_denoiser(cfg, plan.family, device, dtype, place=not procs.places_weights)
    state, optimizer_state, schedule_state = TrainState(), None, None
    full = cfg.train.method == "full"
    if resume_from is not None:  # into the whole model, before it is placed
        (checkpoint.restore_weights if full else checkpoint.restore_lora)(resume_from, denoiser.module)
        state, optimizer_state, schedule_state = checkpoint.restore_state(resume_from)
    model = procs.place(denoiser.module, swap_blocks(denoiser.module, plan.family))
    trained = denoiser if model is denoiser.module else Denoiser(model, device, denoiser.dtype)
    params = [p for p in model.parameters() if p.requires_grad]  # as they train: under FSDP their shards
    if full:  # the weights in train.dtype, updated in fp32 (train.full)
        t = cfg.train
        optimizer = FullOptimizer(params, lambda groups: build_optimizer(groups, cfg.optimizer), t.master_weights,
                                  t.seed, t.fused_backward)
    else:
        optimizer = procs.prepare_optimizer(build_optimizer(params, cfg.optimizer))
    length = length or run_length(plan, store)
    # the schedule before the saved state: building one sets each group's lr to its step-0 value, which the
    # optimizer's saved state then replaces with the lr of the step the run is at
    scheduler = build_scheduler(getattr(optimizer, "inner", optimizer), cfg.optimizer, length.total_steps)
    if resume_from is not None:
        procs.load_optimizer_state(optimizer, optimizer_state, params)
        scheduler.load_state_dict(schedule_state)
    average = ema.build(params, cfg.train.ema_decay) if cfg.train.ema else None
    if average is not None and resume_from is not None:
        ema.load(average, checkpoint.restore_ema(resume_from), device)
    return Run(denoiser, trained, params, optimizer, scheduler, length.shapes, length.steps_per_epoch,
               length.total_steps, procs, average), state
