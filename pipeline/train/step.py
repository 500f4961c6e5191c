"""The training step. `targets` is the one definition of what each sample should predict, which the
step and held-out validation both use; `optimizer_step` is one update from a group of batches (gradient
accumulation), the unit the training loop and `make bench` both run. A step's reading (`read_batch`) is
apart from its compute, so that train.prefetch can read the next step's batches while this one computes."""

from __future__ import annotations

import math
import time
import dataclasses
from dataclasses import dataclass

import torch

from pipeline.data import schema
from pipeline.data.batches import Inputs, load_inputs
from pipeline.denoiser.model import Denoiser, forward
from pipeline.store.keys import derive_seed
from pipeline.store.store import Store
from pipeline.data.draws import fresh_seeds
from pipeline.denoiser.lora import target_key
from pipeline.objective import per_sample_mse
from pipeline.data.plan import Plan, Sample

class NonFinite(Exception):
    """A step whose loss or gradient is not finite: training stops there (train.stage says so in one line)."""

    def __init__(self, step: int, what: str, images: list[str]):
        super().__init__(f"step {step}: {what}")
        self.step, self.what, self.images = step, what, images


TIMESTEP_BINS = 4  # loss by quarter of the 0..1000 timestep range: a cheap view of where the model errs


def targets(plan: Plan, store: Store, denoiser: Denoiser, batch: list[tuple[Sample, int]], inputs: Inputs,
            prior_mode: str, read_ahead: torch.Tensor | None = None) -> torch.Tensor:
    """What the denoiser should predict for each sample (float32, on the CPU): the family's target (flow:
    noise - x0; epsilon; v) for a standard sample, the base model's own prediction for a prior sample.
    That prediction is read from the cache ("cached"), or computed by a second, adapter-disabled forward
    ("online": what every peer does, at a fresh draw each step, kept for comparison and the benchmark). `read_ahead`: what read_targets
    gave for this batch, when it was read ahead."""
    target = read_targets(plan, store, batch, inputs, prior_mode) if read_ahead is None else read_ahead
    is_prior = torch.tensor([s.prior for s, _ in batch])
    if prior_mode == "cached" or not is_prior.any():
        return target
    with torch.no_grad():
        denoiser.module.disable_adapters()
        try:
            target[is_prior] = forward(plan.family, denoiser, inputs.subset(is_prior)).float().cpu()
        finally:
            denoiser.module.enable_adapters()
    return target


def read_targets(plan: Plan, store: Store, batch: list[tuple[Sample, int]], inputs: Inputs,
                 prior_mode: str) -> torch.Tensor:
    """The part of `targets` that reads: the family's target, and with prior_mode "cached" each prior
    sample's cached prediction in its place (an online prior's is computed by `targets`)."""
    target = plan.family.target(inputs.latents, inputs.noise, inputs.timesteps)
    if prior_mode == "cached" and any(s.prior for s, _ in batch):
        is_prior = torch.tensor([s.prior for s, _ in batch])
        cached = [schema.read(plan, store, plan.prior_kind(), plan.prior_key(s, v), s)[0]["prediction"]
                  for s, v in batch if s.prior]
        target[is_prior] = torch.stack(cached).float()
    return target


@dataclass
class Read:
    """One batch as train_step reads it from the cache, for the step, first position and prior mode named."""

    batch: list[tuple[Sample, int]]
    step: int
    first: int
    prior_mode: str
    inputs: Inputs
    target: torch.Tensor  # read_targets'

    def pin_memory(self) -> Read:
        """The same with every tensor in pinned memory (torch's DataLoader calls this: train.prefetch on CUDA)."""
        pin = lambda v: {k: t.pin_memory() for k, t in v.items()} if isinstance(v, dict) else v.pin_memory()  # noqa: E731
        inputs = Inputs(**{f.name: pin(getattr(self.inputs, f.name)) for f in dataclasses.fields(Inputs)})
        return dataclasses.replace(self, inputs=inputs, target=self.target.pin_memory())


def read_batch(plan: Plan, store: Store, batch: list[tuple[Sample, int]], prior_mode: str, step: int = 0,
               first: int = 0) -> Read:
    """The reading half of train_step (same arguments): the inputs and the targets as far as the cache gives
    them. Raises what the store raises (UserError for a damaged entry)."""
    # a cached prior is the base's prediction at its variant's cached draw, so it must use that draw; an
    # online prior computes its target at whatever draw it gets, so it draws afresh like the peers do
    fresh = [None if s.prior and prior_mode == "cached" else fresh_seeds(plan.cfg, step, first + i)
             for i, (s, _) in enumerate(batch)]
    inputs = load_inputs(plan, store, batch, fresh)
    return Read(batch, step, first, prior_mode, inputs, read_targets(plan, store, batch, inputs, prior_mode))


def train_step(plan: Plan, store: Store, run, batch: list[tuple[Sample, int]], prior_mode: str, step: int,
               first: int, read: Read | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of one batch of (sample, variant) items: its per-sample losses (weighted; the backward is
    the caller's) and its timesteps. Standard samples draw fresh noise and timesteps, seeded by (train seed,
    `step`, position in the step's batches: `first` is the batch's first); prior samples use their variant's
    cached draw with prior_mode "cached", and draw afresh too with "online". `run` is what train.setup built: its `trained` model runs the forward. `read`: this batch
    as read_batch read it ahead (train.prefetch); else it is read here."""
    if read is None:
        read = read_batch(plan, store, batch, prior_mode, step, first)
    elif (read.batch, read.step, read.first, read.prior_mode) != (batch, step, first, prior_mode):
        raise RuntimeError(f"step {step}: the batch read ahead is another one (read for step {read.step}, "
                           f"position {read.first}, prior_mode {read.prior_mode}): the reader and the step disagree")
    inputs = read.inputs
    target = targets(plan, store, run.denoiser, batch, inputs, prior_mode, read.target)
    pred = forward(plan.family, run.trained, inputs)
    weights = torch.tensor([s.loss_weight for s, _ in batch]) * plan.family.loss_weights(plan.cfg.train,
                                                                                         inputs.timesteps, inputs.sigmas)
    # non_blocking: from pinned memory (train.prefetch, on CUDA) the copy need not hold up the host
    losses = per_sample_mse(pred, target.to(pred.device, non_blocking=True)) * weights.to(pred.device)
    return losses, inputs.timesteps


def batch_record(timesteps: list[float], losses: list[float], is_prior: list[bool]) -> dict:
    """One batch's losses from its per-sample values (in float32, as computed)."""
    values, prior = torch.tensor(losses, dtype=torch.float32), torch.tensor(is_prior, dtype=torch.bool)
    group = lambda mask: float(values[mask].mean()) if mask.any() else None  # noqa: E731
    return {
        "loss": float(values.mean()),
        "loss_standard": group(~prior),
        "loss_prior": group(prior),
        "n_standard": int((~prior).sum()),
        "n_prior": int(prior.sum()),
        "timestep_mean": float(torch.tensor(timesteps, dtype=torch.float32).mean()),
        "per_sample": list(zip(timesteps, losses)),
        "is_prior": list(is_prior),
    }


def optimizer_step(run, plan: Plan, store: Store, group: list[list[tuple[Sample, int]]], step: int,
                   prior_mode: str | None = None, check: bool = False, reads: list[Read] | None = None) -> dict:
    """Optimizer step number `step` on a group of batches (gradient accumulation): forward and backward for
    each, then clip, step, advance the schedule and clear the gradients. `run` is what train.setup built.
    Under a launcher each rank takes its contiguous share of every batch, and the process setup scales its
    backward so that the ranks' gradients add up to one process's (run.procs); `check`: refuse layers without
    a gradient first (the first step a run takes). `reads`: each batch as this rank's train_step takes it,
    read ahead (train.prefetch); None: read here. Returns the step's record for the metrics (without
    step/epoch), every rank's samples in it, as one process would have it."""
    t0, lr = time.perf_counter(), run.optimizer.param_groups[0]["lr"]
    mode = prior_mode or plan.cfg.train.prior_mode
    procs = run.procs
    # LoRA dropout draws from the global RNG: seeded by (seed, step, rank), so a resumed run draws what an
    # uninterrupted one would without any saved RNG state
    torch.manual_seed(derive_seed("dropout", plan.cfg.train.seed, step, procs.rank))
    fused = plan.cfg.train.fused_backward
    if hasattr(run.optimizer, "step_number"):  # train.full's: its stochastic rounding is seeded by the step
        run.optimizer.step_number = step
    mine, first = [], 0
    for j, batch in enumerate(group):
        lo, hi = procs.slice(len(batch))
        share = batch[lo:hi]
        # a rank whose share is empty runs one sample at weight zero: every rank takes part in each all-reduce
        with procs.no_sync(run.trained.module, last=j == len(group) - 1):
            losses, timesteps = train_step(plan, store, run, share or batch[:1], mode, step, first + lo,
                                           read=reads[j] if reads else None)
            if fused:  # the last backward steps the weights (train.full): a bad loss must stop it first
                if not torch.isfinite(losses).all():
                    raise NonFinite(step, f"loss {float(losses.mean())}", [str(s.path) for s, _ in batch])
                run.optimizer.armed = j == len(group) - 1
            procs.backward_loss(losses, len(batch), len(group), empty=not share).backward()
        losses = losses.detach().cpu()
        mine.append((list(zip(timesteps.float().tolist(), losses.tolist())), [s.prior for s, _ in share])
                    if share else ([], []))
        first += len(batch)
    if fused:
        run.optimizer.armed = False
    if check:
        procs.check_gradients(run.denoiser.module, "train.full_train_modules" if plan.cfg.train.method == "full"
                              else target_key(plan.cfg.lora))
    records = []
    for parts in zip(*procs.gather(mine)):  # per batch: every rank's share, in rank order
        samples = [p for per_sample, _ in parts for p in per_sample]
        prior = [x for _, is_prior in parts for x in is_prior]
        records.append(batch_record([t for t, _ in samples], [v for _, v in samples], prior))
    record = merge(records)
    max_norm = plan.cfg.optimizer.max_grad_norm
    norm = procs.clip_grad_norm(run.params, max_norm) if max_norm > 0 else None
    if not math.isfinite(record["loss"]) or (norm is not None and not math.isfinite(norm)):
        # before the optimizer step: the weights stay those of the last good step
        what = f"loss {record['loss']}" if not math.isfinite(record["loss"]) else f"gradient norm {norm}"
        raise NonFinite(step, what, [str(s.path) for batch in group for s, _ in batch])
    run.optimizer.step()
    if run.ema is not None:  # train.ema: the average follows each update
        run.ema.step(run.params)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**record, "lr": lr, "grad_norm": norm, "seconds": round(time.perf_counter() - t0, 4)}


def timestep_bins(per_sample: list[tuple[float, float]]) -> dict[str, float]:
    bins: dict[str, list[float]] = {}
    width = 1000 // TIMESTEP_BINS
    for t, loss in per_sample:
        low = min(int(t) // width, TIMESTEP_BINS - 1) * width
        bins.setdefault(f"{low}-{low + width}", []).append(loss)
    return {k: sum(v) / len(v) for k, v in sorted(bins.items())}


def merge(records: list[dict]) -> dict:
    """One optimizer step's record from its accumulated batches: sample-weighted means of the losses."""
    out = {"n_standard": sum(r["n_standard"] for r in records), "n_prior": sum(r["n_prior"] for r in records)}
    n = out["n_standard"] + out["n_prior"]
    out["loss"] = sum(r["loss"] * (r["n_standard"] + r["n_prior"]) for r in records) / n
    for key, count in (("loss_standard", "n_standard"), ("loss_prior", "n_prior")):
        out[key] = sum(r[key] * r[count] for r in records if r[key] is not None) / out[count] if out[count] else None
    out["timestep_mean"] = sum(r["timestep_mean"] for r in records) / len(records)
    out["loss_by_timestep_bin"] = timestep_bins([p for r in records for p in r["per_sample"]])
    return out
