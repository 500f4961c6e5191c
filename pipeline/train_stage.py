"""Stage 2: load only the denoiser, add a LoRA and train on the cache. One denoiser forward per batch:
a prior sample's target is its cached base-model prediction, read from disk, not recomputed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import checkpoint
from pipeline.batches import load_inputs
from pipeline.config import Config, check_paths
from pipeline.errors import UserError
from pipeline.keys import derive_seed
from pipeline.lock import cache_lock
from pipeline.lora import add_lora, kohya_weights, save_lora
from pipeline.objective import per_sample_mse
from pipeline.optim import build_optimizer, build_scheduler
from pipeline.practice import epoch_counts, practice_warnings, prior_share
from pipeline.plan import TORCH_DTYPES, Plan, Sample, make_plan, pick_device
from pipeline.store import Store
from pipeline.validation import held_out_scores, render_prompts, save_grid


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-flux.toml"  # the Makefile's default


def fix_command(cfg: Config, dtype: str | None = None) -> str:
    """The commands that cache what this config lacks: make's, and the plain CLI's."""
    source = Path(cfg.source)
    shown = source.relative_to(Path.cwd()) if source.is_relative_to(Path.cwd()) else source
    make = "make cache" + ("" if source == DEFAULT_CONFIG else f" CONFIG={shown}") + (f" DTYPE={dtype}" if dtype else "")
    cli = f"python -m pipeline cache --config {shown}" + (f" --dtype {dtype}" if dtype else "")
    return f"{make} (or: {cli})"


def check_cache(plan: Plan, store: Store) -> None:
    """Refuse, with the command that fixes it, unless every entry this run reads is present."""
    cfg, variants = plan.cfg, range(plan.cfg.cache.variants)
    missing = {
        "latents": sum(not store.has("latent", k) for k in plan.latent_jobs()),
        "text embeddings": sum(not store.has("text", k) for k in plan.text_jobs()),
        "noise seeds and timesteps": sum(not store.has("noise", s.noise_keys[v]) for s in plan.samples for v in variants),
    }
    parts = [f"{name} ({n} missing)" for name, n in missing.items() if n]
    if parts and store.unreadable:
        raise UserError(
            f"cache file '{store.unreadable[0]}' cannot be read ({len(store.unreadable)} such files; damaged or not "
            f"ours) and the cache lacks {', '.join(parts)}: delete the file(s), then run {fix_command(cfg)}"
        )
    if parts:
        raise UserError(f"the cache lacks {', '.join(parts)} for this config: run {fix_command(cfg)}")
    if cfg.train.prior_mode == "online":
        return  # the prior targets are computed during training
    kind = plan.prior_kind()
    need = [plan.prior_key(s, v) for s in plan.samples if s.prior for v in variants]
    absent = sum(not store.has(kind, k) for k in need)
    if absent:
        raise UserError(
            f"priors for {plan.dtype} are not cached ({absent} of {len(need)} missing for this model and data): "
            f"run {fix_command(cfg, plan.dtype)}"
        )


def epoch_batches(plan: Plan, shapes: dict[str, tuple], epoch: int) -> list[list[Sample]]:
    """Samples (with repeats) shuffled by a seed of (train seed, epoch), batched within one latent shape
    (`shapes`: latent key -> shape, read from the cache once per run)."""
    items = [s for s in plan.training for _ in range(s.repeats)]
    g = torch.Generator().manual_seed(derive_seed("order", plan.cfg.train.seed, epoch))
    _, n_prior = epoch_counts(plan)
    priors = [s for s in items if s.prior]
    if priors and n_prior != len(priors):  # data.prior_ratio: cycle through the prior samples, shuffled
        order = torch.randperm(len(priors), generator=g).tolist()
        items = [s for s in items if not s.prior] + [priors[order[i % len(priors)]] for i in range(n_prior)]
    items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    by_shape: dict[tuple, list[Sample]] = {}
    for s in items:
        by_shape.setdefault(shapes[s.latent_keys[0]], []).append(s)  # every variant has the same shape
    bs = plan.cfg.train.batch_size
    batches = [group[i : i + bs] for group in by_shape.values() for i in range(0, len(group), bs)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def train_step(plan, store, model, batch, variant, prior_mode="cached", loss_scale=1.0) -> dict:
    """Forward and backward for one batch (the optimizer steps elsewhere); returns per-group losses."""
    family, cfg = plan.family, plan.cfg
    latents, noise, noisy, timesteps, text, sigmas = load_inputs(plan, store, [(s, variant) for s in batch])
    is_prior = torch.tensor([s.prior for s in batch])
    target = family.target(latents, noise, timesteps)
    if is_prior.any():
        if prior_mode == "cached":
            cached = [store.read(plan.prior_kind(), plan.prior_key(s, variant))[0]["prediction"] for s in batch if s.prior]
            target[is_prior] = torch.stack(cached).float()
        else:  # what every peer does: a second, adapter-disabled forward (kept for the benchmark)
            with torch.no_grad():
                model.disable_adapters()
                sub = {k: v[is_prior] for k, v in text.items()}
                target[is_prior] = family.predict(model, noisy[is_prior], timesteps[is_prior], sub).float().cpu()
                model.enable_adapters()
    pred = family.predict(model, noisy, timesteps, text)
    weights = torch.tensor([s.loss_weight for s in batch]) * family.loss_weights(cfg.train, timesteps, sigmas)
    losses = per_sample_mse(pred, target.to(pred.device)) * weights.to(pred.device)
    loss = losses.mean()
    (loss * loss_scale).backward()
    losses = losses.detach().cpu()
    group = lambda mask: float(losses[mask].mean()) if mask.any() else None  # noqa: E731
    return {
        "loss": float(loss.detach()),
        "loss_standard": group(~is_prior),
        "loss_prior": group(is_prior),
        "n_standard": int((~is_prior).sum()),
        "n_prior": int(is_prior.sum()),
        "timestep_mean": float(timesteps.float().mean()),
        "per_sample": list(zip(timesteps.float().tolist(), losses.tolist())),
    }


TIMESTEP_BINS = 4  # loss by quarter of the 0..1000 timestep range: a cheap view of where the model errs


def timestep_bins(per_sample: list[tuple[float, float]]) -> dict[str, float]:
    bins: dict[str, list[float]] = {}
    width = 1000 // TIMESTEP_BINS
    for t, loss in per_sample:
        low = min(int(t) // width, TIMESTEP_BINS - 1) * width
        bins.setdefault(f"{low}-{low + width}", []).append(loss)
    return {k: sum(v) / len(v) for k, v in sorted(bins.items())}


def optimizer_step(params, optimizer, scheduler, max_grad_norm: float) -> float | None:
    """Clip, step, advance the schedule, clear gradients. Returns the gradient norm before clipping."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) if max_grad_norm > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


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


def open_tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard = true needs TensorBoard: pip install 'prior-lora[tensorboard]'") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


def log_scalars(board, record: dict) -> None:
    step = record["step"]
    for key in ("loss", "loss_standard", "loss_prior", "lr", "grad_norm"):
        if record.get(key) is not None:
            board.add_scalar(key.replace("loss_", "loss/"), record[key], step)
    for label, value in record["loss_by_timestep_bin"].items():
        board.add_scalar(f"loss_by_timestep/{label}", value, step)


class Validator:
    """Held-out scores and sample grids at chosen steps, into validation.jsonl (and TensorBoard)."""

    def __init__(self, plan: Plan, store: Store, model, device, out_dir: Path, board, resumed_at: int | None):
        self.plan, self.store, self.model, self.device, self.board = plan, store, model, device, board
        self.enabled = bool(plan.held_out or plan.cfg.validation.prompts)
        self.path = out_dir / "validation.jsonl"
        self.samples_dir = out_dir / "samples"
        self.done: set[int] = set()
        self.last: dict = {}
        if self.enabled:
            kept = []
            if resumed_at is not None and self.path.is_file():  # as metrics.jsonl: later lines are redone
                kept = [x for x in self.path.read_text().splitlines() if json.loads(x)["step"] < resumed_at]
            self.path.write_text("".join(line + "\n" for line in kept))

    def run(self, step: int) -> None:
        if not self.enabled or step in self.done:
            return
        self.done.add(step)
        cfg = self.plan.cfg
        record = {"step": step, **held_out_scores(self.plan, self.store, self.model, cfg.train.prior_mode)}
        images = render_prompts(self.plan, self.store, self.model, self.device)
        if images:
            record["samples"] = str(save_grid(images, self.samples_dir / f"step-{step:06d}.png"))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.last = {k: record[k] for k in ("val_loss", "prior_drift", "samples") if k in record}
        if self.board is not None:
            for key, tag in (("val_loss", "validation/loss"), ("prior_drift", "validation/prior_drift")):
                if record.get(key) is not None:
                    self.board.add_scalar(tag, record[key], step)
            if images:
                import numpy as np
                from PIL import Image

                self.board.add_image("samples", np.asarray(Image.open(record["samples"]).convert("RGB")), step,
                                     dataformats="HWC")


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r[key] is not None]
    return round(sum(values) / len(values), 6) if values else None


def run_train(cfg: Config, progress: bool = True, resume: bool = False) -> dict:
    """Train a LoRA on the cache and save it; with resume, go on from the newest checkpoint.
    Raises UserError when the cache lacks anything needed."""
    return train_lora(cfg, progress, resume)[1]


def train_lora(cfg: Config, progress: bool = True, resume: bool = False) -> tuple[torch.nn.Module, dict]:
    """run_train, returning the trained model too (the tests compare it with the saved LoRA)."""
    with cache_lock(cfg.cache.dir, "read"):
        return _train_lora(cfg, progress, resume)


def _train_lora(cfg: Config, progress: bool, resume: bool) -> tuple[torch.nn.Module, dict]:
    start = time.perf_counter()
    check_paths(cfg)
    plan = make_plan(cfg)
    store = Store(cfg.cache.dir)
    plan.drop_bad(store)
    check_cache(plan, store)
    t = cfg.train
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    practice_warnings(plan)
    model = plan.family.load_denoiser(device, TORCH_DTYPES[t.dtype])
    params = add_lora(model, cfg.lora, plan.family.target_presets)
    if t.lora_format == "kohya":
        kohya_weights(model, plan.family, cfg.lora)  # refuse now, not after training, what kohya's layout cannot hold
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # recompute activations in backward: memory for time
    model.train()
    o, accum = cfg.optimizer, t.gradient_accumulation
    optimizer = build_optimizer(params, o, device)
    shapes = {s.latent_keys[0]: store.shape("latent", s.latent_keys[0], "latent") for s in plan.samples}
    steps_per_epoch = math.ceil(len(epoch_batches(plan, shapes, 0)) / accum)  # optimizer steps
    total = t.max_steps or t.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, o, total)
    out_dir = Path(t.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    step, epoch, next_batch, last, epoch_records, kept = 0, 0, 0, {}, [], []
    if resume:
        found = checkpoint.latest(out_dir)
        if found is None:
            raise UserError(f"no checkpoint in '{out_dir / 'checkpoints'}' to resume from: train without --resume")
        step, position = checkpoint.restore(found, model, optimizer, scheduler)
        epoch, next_batch = position["epoch"], position["next_batch"]
        if metrics_path.is_file():  # the lines of the steps before the checkpoint; later ones are redone
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] < step]
    board = open_tensorboard(out_dir) if t.tensorboard else None
    validator = Validator(plan, store, model, device, out_dir, board, resumed_at=step if resume else None)
    if step == 0:
        validator.run(0)  # the baseline: drift is zero here by construction, the loss is the base model's
    with open(metrics_path, "w") as metrics, tqdm(total=total, initial=step, desc="train", unit="step",
                                                   disable=not progress) as bar:
        metrics.writelines(line + "\n" for line in kept)
        while step < total:
            variant = epoch % cfg.cache.variants
            epoch_records = []
            batches = epoch_batches(plan, shapes, epoch)
            for first in range(next_batch, len(batches), accum):
                if step >= total:
                    break
                t0, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
                group = batches[first : first + accum]
                last = merge([train_step(plan, store, model, b, variant, t.prior_mode, 1 / len(group)) for b in group])
                grad_norm = optimizer_step(params, optimizer, scheduler, o.max_grad_norm)
                record = {"step": step, "epoch": epoch, "variant": variant, **last, "lr": lr, "grad_norm": grad_norm,
                          "seconds": round(time.perf_counter() - t0, 4)}
                epoch_records.append(record)
                metrics.write(json.dumps(record) + "\n")
                if board is not None:
                    log_scalars(board, record)
                metrics.flush()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                if cfg.validation.every and step % cfg.validation.every == 0:
                    validator.run(step)
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < total:
                    checkpoint.save(out_dir, step, model, optimizer, scheduler,
                                    {"epoch": epoch, "next_batch": first + accum}, t.keep_checkpoints)
            epoch, next_batch = epoch + 1, 0

    validator.run(step)  # the end (skipped when the last step was just validated)
    if board is not None:
        board.close()
    lora_path = out_dir / t.lora_name
    save_lora(
        lora_path, model, plan.family,
        {"prior_lora.config": cfg.portable_json(), "prior_lora.base_model": plan.denoiser_fp,
         "prior_lora.family": plan.family.name, "prior_lora.steps": str(step)},
        cfg.lora, t.lora_format,
    )
    store.close()
    from pipeline.plot import plot_run  # matplotlib only here

    plot = plot_run(out_dir)
    return model, {
        "steps": step,
        "epochs": math.ceil(step / max(steps_per_epoch, 1)),
        "final_loss": last.get("loss"),
        "last_epoch_loss_standard": _mean(epoch_records, "loss_standard"),
        "last_epoch_loss_prior": _mean(epoch_records, "loss_prior"),
        "prior_share": prior_share(plan),
        "images_per_bucket": plan.bucket_counts(),
        **validator.last,
        "skipped_images": plan.skipped,
        "lora": str(lora_path),
        "metrics": str(metrics_path),
        "plot": str(plot),
        "seconds": round(time.perf_counter() - start, 2),
    }
