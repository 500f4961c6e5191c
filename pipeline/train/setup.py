"""Everything a training run builds before its first step, in dependency order: the denoiser, its LoRA,
the optimizer over the LoRA's parameters, and the learning-rate schedule over the run's length."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline import dist, shard
from pipeline.batches import Denoiser
from pipeline.cache.store import Store
from pipeline.errors import warn
from pipeline.lora import add_lora, kohya_weights
from pipeline.plan import TORCH_DTYPES, Plan
from pipeline.swap import load_denoiser, swap_blocks
from pipeline.train.epochs import epoch_batches
from pipeline.train.optim import build_optimizer, build_scheduler


@dataclass
class Run:
    denoiser: Denoiser  # the frozen base with the LoRA, in train mode
    params: list[torch.nn.Parameter]  # what trains (the LoRA's, float32)
    optimizer: torch.optim.Optimizer
    scheduler: object  # the lr schedule (a torch LRScheduler)
    shapes: dict[str, tuple]  # latent key -> shape, read from the cache once per run
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    world: dist.World = field(default_factory=dist.World)  # the processes training together (one: no wrapper)
    trained: Denoiser | None = None  # under a launcher: the model as DDP/FSDP wraps it, for the training forward

    def prepare(self, world: dist.World, plan: Plan) -> None:
        """Under a launcher: hand the model and the optimizer to accelerate's DDP, or under FSDP shard the
        model in place (pipeline.shard) and rebuild the optimizer and schedule over the shards, with the state
        they had (fresh, or a checkpoint's). Under DDP everything but the training forward keeps using the
        unwrapped model: a forward on one rank alone (a sample grid) must not go through a wrapper that
        expects every rank (under FSDP every forward is every rank's). The scheduler stays ours: accelerate's
        would step once per process."""
        self.world = world
        if world.fsdp:
            model, full, schedule = self.denoiser.module, self.optimizer.state_dict(), self.scheduler.state_dict()
            shard.shard(model, swap_blocks(model, plan.family), world.mesh)
            self.params = [p for p in model.parameters() if p.requires_grad]  # now their shards, in the same order
            self.optimizer = build_optimizer(self.params, plan.cfg.optimizer, self.denoiser.device)
            # the schedule first: building one sets each group's lr to its step-0 value, which the optimizer's
            # saved state then replaces with the lr of the step the run is at
            self.scheduler = build_scheduler(self.optimizer, plan.cfg.optimizer, self.total_steps)
            self.optimizer.load_state_dict(shard.sharded_optimizer_state(full, self.params))
            self.scheduler.load_state_dict(schedule)
            self.trained = self.denoiser
        elif world.size > 1:
            model, self.optimizer = world.accelerator.prepare(self.denoiser.module, self.optimizer)
            self.trained = Denoiser(model, self.denoiser.device, self.denoiser.dtype)
            self.params = [p for p in model.parameters() if p.requires_grad]

    def optimizer_state(self) -> dict:
        """The optimizer's state as one process holds it (under FSDP gathered: every rank calls this)."""
        return shard.full_optimizer_state(self.optimizer) if self.world.fsdp else self.optimizer.state_dict()


def prepare_model(model: torch.nn.Module, cfg, family, checks: bool = True) -> list[torch.nn.Parameter]:
    """What training does to the loaded denoiser: add the LoRA (its parameters are returned), check the
    output format, turn on gradient checkpointing. `make bench-memory` measures a step after this too.
    checks: refuse what the LoRA file's format cannot hold, warn about DoRA (the train stage; the cache
    stage saves no LoRA)."""
    params = add_lora(model, cfg.lora, family.target_presets)
    if cfg.train.lora_format == "kohya" and checks:
        kohya_weights(model, family, cfg.lora)  # refuse now, not after training, what kohya's layout cannot hold
    elif cfg.lora.use_dora and checks:
        # ComfyUI has no reader for peft's magnitude vectors (its DoRA normalises the other axis of the weight)
        warn("lora.use_dora = true: the LoRA file loads in diffusers, but ComfyUI would load it without DoRA's "
             "magnitudes, so its images would differ")
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # recompute activations in backward: memory for time
    return params


def build_denoiser(plan: Plan, device: torch.device, checks: bool = True,
                   sharded: bool = False) -> tuple[Denoiser, list]:
    """The denoiser as training holds it: loaded (quantized with model.quantize), the LoRA added with B = 0,
    gradient checkpointing as configured, placed with train.blocks_to_swap blocks swapped, in train mode.
    The cache stage computes priors on this same model, so a prior is the training forward's step-0 output
    whatever the backend's kernels do in each mode. Returns it with the LoRA's parameters.
    sharded: left on the CPU, unswapped, for Run.prepare to shard onto `device` (FSDP)."""
    cfg, t = plan.cfg, plan.cfg.train
    dtype = TORCH_DTYPES[t.dtype]
    found: list[torch.nn.Parameter] = []
    # before the model is placed: the LoRA goes where its block's weights go
    prepare = lambda model: found.extend(prepare_model(model, cfg, plan.family, checks))  # noqa: E731
    model, swap = load_denoiser(plan.family, torch.device("cpu") if sharded else device, dtype,
                                0 if sharded else t.blocks_to_swap, prepare)
    model.train()
    return Denoiser(model, device, dtype, swap), found


def setup(plan: Plan, store: Store, device: torch.device, sharded: bool = False) -> Run:
    cfg, t = plan.cfg, plan.cfg.train
    denoiser, params = build_denoiser(plan, device, sharded=sharded)
    optimizer = build_optimizer(params, cfg.optimizer, device)
    shapes = {s.latent_keys[0]: store.shape("latent", s.latent_keys[0], "latent") for s in plan.samples}
    steps_per_epoch = math.ceil(len(epoch_batches(plan, shapes, 0)) / t.gradient_accumulation)
    total = t.max_steps or t.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.optimizer, total)
    return Run(denoiser, params, optimizer, scheduler, shapes, steps_per_epoch, total)
