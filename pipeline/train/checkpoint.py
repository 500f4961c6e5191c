"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, each checkpoint
a folder written under a temporary name and renamed into place (so a crash never leaves a half one).

A checkpoint holds what a bitwise-identical continuation needs: the LoRA weights (float32, as trained),
the optimizer's state, the schedule's state and the data position (epoch and index of the next batch;
batch order is a pure function of the epoch, and LoRA dropout is seeded per step), the run's config, so
that --resume can refuse a config that would give another run, and the number of processes that trained. Beside that
state, each checkpoint holds the run's LoRA file as the final save writes it (lora.CHECKPOINT_LORA).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.lora import CHECKPOINT_LORA, save_run_lora
from pipeline.cache.store import writer_gone, writer_tag
from pipeline.train.state import TrainState

PREFIX = "step-"


def _split(value, path: str, tensors: dict) -> object:
    """JSON-able structure of `value`, with every tensor moved into `tensors` under a dotted name."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        return {"__dict__": [[_split(k, f"{path}.k{i}", tensors), _split(v, f"{path}.{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"__tuple__" if isinstance(value, tuple) else "__list__":
                [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    return value  # numbers, strings, booleans, None


def _join(value, tensors: dict):
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_join(k, tensors): _join(v, tensors) for k, v in value["__dict__"]}
        if "__tuple__" in value:
            return tuple(_join(v, tensors) for v in value["__tuple__"])
        if "__list__" in value:
            return [_join(v, tensors) for v in value["__list__"]]
    return value


def save(out_dir: Path, state: TrainState, run, plan) -> Path:
    """Write the checkpoint of `state` (run: what train.setup built) atomically; keep only the newest
    train.keep_checkpoints (0: all)."""
    root = Path(out_dir) / "checkpoints"
    remove_leftovers(root)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{PREFIX}{state.step:08d}-{writer_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = run.denoiser.module
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(tmp / "lora.safetensors"))
    save_run_lora(tmp / CHECKPOINT_LORA, model, plan, state.step)
    tensors: dict = {}
    saved = {
        "step": state.step,
        "position": state.position(),
        "optimizer": _split(run.optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _split(run.scheduler.state_dict(), "scheduler", tensors),
        "config": json.loads(plan.cfg.portable_json()),
        "world_size": run.world.size,
    }
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(saved))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    # A run writes its checkpoints in step order, so a later step here is a replaced run's: it goes now that
    # this run has one of its own to resume from (before, --resume could still go on with the old run)
    done = sorted(root.glob(f"{PREFIX}*"))
    later, ours = [p for p in done if p.name > final.name], [p for p in done if p.name <= final.name]
    keep = plan.cfg.train.keep_checkpoints
    for old in later + (ours[:-keep] if keep else []):
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(root: Path) -> None:
    """Delete the temporaries of checkpoint saves whose process is gone (a kill in mid-save): they were
    never renamed into place, so nothing refers to them."""
    for tmp in root.glob(f".tmp-{PREFIX}*") if root.is_dir() else []:
        if writer_gone(tmp.name.rsplit("-", 1)[-1]):
            shutil.rmtree(tmp, ignore_errors=True)


def latest(out_dir: Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def saved_config(path: Path) -> dict | None:
    """The config the checkpoint's run had (None for a checkpoint written before configs were recorded)."""
    return json.loads((path / "state.json").read_text()).get("config")


def restore(path: Path, run) -> TrainState:
    """Load a checkpoint into the freshly built run (model, optimizer, schedule) and the global RNG. The
    train stage has compared the configs first (check_same_run), before it built the run."""
    saved = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    try:
        result = set_peft_model_state_dict(run.denoiser.module, load_file(str(path / "lora.safetensors")))
    except RuntimeError as e:  # a checkpoint from before configs were recorded: peft's size mismatch
        raise UserError(f"checkpoint '{path}' does not fit this LoRA ({str(e).splitlines()[-1].strip()}): "
                        "set lora.* back as it was, or train without --resume to start over") from None
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint '{path}' does not fit this LoRA (e.g. {result.unexpected_keys[0]}): "
                        "set lora.* back as it was, or train without --resume to start over")
    run.optimizer.load_state_dict(_join(saved["optimizer"], tensors))
    run.scheduler.load_state_dict(_join(saved["scheduler"], tensors))
    # a checkpoint from before dropout was seeded per step holds RNG states ("rng"): nothing reads them now
    return TrainState(saved["step"], **saved["position"])


def check_world(path: Path, cfg, size: int) -> str | None:
    """Resuming with another number of processes than the checkpoint's run had: refused (UserError) when the
    result depends on it, else the note that says why it does not."""
    old = json.loads((path / "state.json").read_text()).get("world_size", 1)
    if old == size:
        return None
    were = f"checkpoint '{path}' was written by a run of {old} process(es) and this one has {size}"
    if cfg.lora.dropout > 0:
        raise UserError(f"cannot resume: {were}, and with lora.dropout = {cfg.lora.dropout} each process draws "
                        f"the dropout masks of its share of the batch, so the result depends on it: resume with {old} "
                        "process(es), or train without --resume to start over")
    return (f"train: resuming with {size} process(es) a run of {old}: the same global batches and draws, and "
            "lora.dropout = 0, so only the rounding of the gradients' sums can differ")


# Config keys (dotted, a prefix covers a table) that change what a run computes. Resuming with any of them
# changed would make a run that neither config describes, so it is refused. Left out on purpose: the run's
# length (train.epochs, max_steps: resuming to train longer is allowed), where things go, logging,
# validation, checkpointing, devices and gradient checkpointing (same results, other memory).
RESULT_KEYS = (
    "model.", "concepts", "data.", "lora.", "optimizer.",
    "cache.variants", "cache.seed", "cache.timestep_sampling", "cache.logit_mean", "cache.logit_std", "cache.mode_scale",
    "cache.shift", "cache.dynamic_shift", "cache.noise_offset", "cache.input_perturbation",
    "train.dtype", "train.batch_size", "train.seed", "train.gradient_accumulation", "train.prior_mode",
    "train.loss_weighting", "train.min_snr_gamma",
)


def check_same_run(saved: dict | None, cfg, path: Path) -> None:
    """Refuse, in one line naming every changed key with its old and new value, to resume the checkpoint
    at `path` (whose state.json recorded the config `saved`) with a config that changes its results."""
    if saved is None:  # written before checkpoints recorded their config: nothing to compare
        return

    def flat(value, key=""):
        if isinstance(value, dict):
            return {k: v for name, item in value.items()
                    for k, v in flat(item, f"{key}.{name}" if key else name).items()}
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # [[concepts]]
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{key}[{i}]").items()}
        return {key: value}

    old, new = flat(saved), flat(json.loads(cfg.portable_json()))
    shown = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"  # noqa: E731
    changed = [f"{k} {shown(old, k)} -> {shown(new, k)}" for k in sorted(old.keys() | new.keys())
               if k.startswith(RESULT_KEYS) and old.get(k, ...) != new.get(k, ...)]
    if changed:
        raise UserError(f"cannot resume from '{path}': the config changed since it was written ({'; '.join(changed)}): "
                        "set these back to go on, or train without --resume to start over")
