"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, each checkpoint
a folder written under a temporary name and renamed into place (so a crash never leaves a half one).

A checkpoint holds what a bitwise-identical continuation needs: the LoRA weights (float32, as trained),
the optimizer's state, the schedule's state and the data position (epoch and index of the next batch;
batch order is a pure function of the epoch, and LoRA dropout is seeded per step), and the run's id,
config, data fingerprint and number of processes, so that resuming (--resume, or a rerun that goes on
with the run: train.outdir) can refuse a config, data set or world size that would give another run.
Beside that state, each checkpoint holds the run's LoRA file as the final save writes it
(lora.CHECKPOINT_LORA), and last, the sha256 of each of its files (checksums.json), so that a damaged
checkpoint is found before it is trusted and resuming falls back to the newest intact one. The run's last
step is checkpointed too (train.stage), so that a longer run goes on from its end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from pipeline.config import changed_keys
from pipeline.errors import UserError, option, warn
from pipeline.denoiser.full import restore_trained, trained_state
from pipeline.denoiser.lora import CHECKPOINT_LORA, save_file_or_oserror, save_run_lora
from pipeline.store.keys import sha256_file
from pipeline.atomic import writer_gone, writer_tag
from pipeline.train.ema import save_ema_lora
from pipeline.train.state import TrainState

PREFIX = "step-"
WEIGHTS = "weights.safetensors"  # a full fine-tuning's trained weights (train.method = "full")
CHECKSUMS = "checksums.json"


def start_over() -> str:
    """How the user starts a run over, as they run commands (the earlier run is kept, see train.outdir)."""
    return f"train with {option('--restart')} to start over (the run is moved aside)"


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


def save(out_dir: Path, state: TrainState, run, plan, data_fp: str, optimizer_state: dict) -> Path:
    """Write the checkpoint of `state` (run: what train.setup built) atomically; then remove other runs'
    checkpoints and keep only the newest train.keep_checkpoints (0: all) of this one. A failed write
    (a full disk) leaves no temporary behind and raises OSError. optimizer_state: Run.optimizer_state()
    (under FSDP gathered by every rank, with the LoRA gathered too)."""
    root = Path(out_dir) / "checkpoints"
    remove_leftovers(root)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{PREFIX}{state.step:08d}-{writer_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model = run.denoiser.module
        if plan.cfg.train.method == "full":  # the trained weights as they are (train.dtype), no LoRA file
            save_file_or_oserror(trained_state(model), tmp / WEIGHTS)
        else:
            save_file_or_oserror({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
                                 tmp / "lora.safetensors")
            save_run_lora(tmp / CHECKPOINT_LORA, model, plan, state.step)
        if run.ema is not None:  # train.ema: its LoRA file beside the checkpoint's, its state in state.*
            save_ema_lora(tmp / CHECKPOINT_LORA, run.ema, run.params, model, plan, state.step)
        tensors: dict = {}
        saved = {
            "step": state.step,
            "run_id": state.run_id,
            "position": state.position(),
            "optimizer": _split(optimizer_state, "optimizer", tensors),
            "scheduler": _split(run.scheduler.state_dict(), "scheduler", tensors),
            "config": json.loads(plan.cfg.portable_json()),
            "data": data_fp,
            "base_model": plan.denoiser_fp,
            "world_size": run.procs.size,
            **({"ema": _split(run.ema.state_dict(), "ema", tensors)} if run.ema is not None else {}),
        }
        save_file_or_oserror(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(saved))
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as e:  # a full disk: name the checkpoint's file, not our temporary
        if not str(e.filename or "").startswith(str(tmp)):
            raise
        raise OSError(e.errno, e.strerror, str(final / Path(e.filename).relative_to(tmp))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # A checkpoint of no run or another (a damaged one that resuming passed over; another run is moved to
    # previous/ before a run starts over, train.outdir) goes once this run has one of its own to resume from
    ours, others = [], []
    for p in sorted(root.glob(f"{PREFIX}*")):
        (ours if p == final or run_id(p) == state.run_id else others).append(p)
    keep = plan.cfg.train.keep_checkpoints
    for old in others + (ours[:-keep] if keep else []):
        shutil.rmtree(old, ignore_errors=True)
    return final


def run_id(path: Path) -> str | None:
    """The run id a checkpoint's state.json records (None: unreadable, or none recorded)."""
    try:
        return json.loads((path / "state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def remove_leftovers(root: Path) -> None:
    """Delete the temporaries of checkpoint saves whose process is gone (a kill in mid-save): they were
    never renamed into place, so nothing refers to them."""
    for tmp in root.glob(f".tmp-{PREFIX}*") if root.is_dir() else []:
        if writer_gone(tmp.name.rsplit("-", 1)[-1]):
            shutil.rmtree(tmp, ignore_errors=True)


def all_checkpoints(out_dir: Path) -> list[Path]:
    """Every checkpoint folder, oldest first (damaged ones too)."""
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []


def latest(out_dir: Path) -> Path | None:
    done = [p for p in all_checkpoints(out_dir) if (p / "state.json").is_file()]
    return done[-1] if done else None


def damage(path: Path) -> str | None:
    """What is wrong with a checkpoint (None: intact), naming the file: a checksums.json that is missing,
    does not parse or is not a table of checksums, a file it lists no checksum for, a missing file, a file
    whose sha256 differs, or a state.json that does not parse. Without a complete checksum list a
    checkpoint is not trusted: a flipped byte would be resumed silently."""
    sums_file = path / CHECKSUMS
    try:
        text = sums_file.read_text()
    except FileNotFoundError:
        return f"{CHECKSUMS} is missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{CHECKSUMS} is unreadable ({getattr(e, 'strerror', None) or type(e).__name__})"
    try:
        sums = json.loads(text)
    except ValueError:
        return f"{CHECKSUMS} does not parse"
    if not isinstance(sums, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items()):
        return f"{CHECKSUMS} is not a table of file checksums"
    try:
        files = {p.name for p in path.iterdir() if p.is_file()} - {CHECKSUMS}
        unlisted = sorted((files | {"state.json", "state.safetensors"}) - sums.keys())
        if unlisted:
            return f"{CHECKSUMS} has no checksum for {unlisted[0]}"
        if not {"lora.safetensors", WEIGHTS} & sums.keys():
            return f"{CHECKSUMS} has no checksum for lora.safetensors"
        for name, want in sums.items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if sha256_file(path / name) != want:
                return f"{name} does not match its checksum"
        json.loads((path / "state.json").read_text())
    except OSError as e:
        return f"{Path(e.filename or path).name} is unreadable ({e.strerror})"
    except ValueError:
        return "state.json does not parse"
    return None


def resume_point(out_dir: Path) -> Path | None:
    """The newest intact checkpoint; each damaged newer one is reported in one line and passed over."""
    found = all_checkpoints(out_dir)
    for path in reversed(found):
        why = damage(path)
        if why is None:
            return path
        warn(f"checkpoint '{path}' is damaged ({why}); going on from the one before it")
    if found:
        raise UserError(f"no intact checkpoint in '{Path(out_dir) / 'checkpoints'}' to resume from (all "
                        f"{len(found)} are damaged): {start_over()}")
    return None


def saved_state(path: Path) -> dict:
    """state.json of a checkpoint: its step, run id, config and data fingerprint (see save)."""
    return json.loads((path / "state.json").read_text())


def restore_lora(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's LoRA weights into the freshly built model (whole: before it is placed). The train
    stage has compared the configs first (check_same_run), before it built the model."""
    try:
        result = set_peft_model_state_dict(model, load_file(str(path / "lora.safetensors")))
    except RuntimeError as e:  # a checkpoint from before configs were recorded: peft's size mismatch
        raise UserError(f"checkpoint '{path}' does not fit this LoRA ({str(e).splitlines()[-1].strip()}): "
                        f"set lora.* back as it was, or {start_over()}") from None
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint '{path}' does not fit this LoRA (e.g. {result.unexpected_keys[0]}): "
                        f"set lora.* back as it was, or {start_over()}")


def restore_weights(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's trained weights (train.method = "full") into the freshly built model."""
    if not (path / WEIGHTS).is_file():
        raise UserError(f"checkpoint '{path}' holds a LoRA, not the weights train.method = \"full\" trains: "
                        f"{start_over()}")
    restore_trained(model, load_file(str(path / WEIGHTS)), path)


def restore_state(path: Path) -> tuple[TrainState, dict, dict]:
    """The checkpoint's position in the run, its optimizer state (as one process holds it) and its
    schedule's state, for the builders (train.setup) to load into what they build."""
    saved = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    # a checkpoint from before dropout was seeded per step holds RNG states ("rng"): nothing reads them now
    state = TrainState(saved["step"], run_id=saved.get("run_id") or TrainState().run_id, **saved["position"])
    return state, _join(saved["optimizer"], tensors), _join(saved["scheduler"], tensors)


def restore_ema(path: Path) -> dict:
    """The checkpoint's EMA state (train.ema), as EMAModel.state_dict gave it."""
    saved = saved_state(path)
    if saved.get("ema") is None:  # RESULT_KEYS has train.ema: only a checkpoint that records no config
        raise UserError(f"checkpoint '{path}' holds no EMA of the LoRA (train.ema was off when it was written): "
                        "set train.ema = false to go on, or train without --resume to start over")
    return _join(saved["ema"], load_file(str(path / "state.safetensors")))


def check_world(path: Path, cfg, size: int) -> str | None:
    """Resuming with another number of processes than the checkpoint's run had: refused (UserError) when the
    result depends on it, else the note that says why it does not."""
    old = saved_state(path).get("world_size", 1)
    if old == size:
        return None
    were = f"checkpoint '{path}' was written by a run of {old} process(es) and this one has {size}"
    if cfg.lora.dropout > 0:
        raise UserError(f"cannot resume: {were}, and with lora.dropout = {cfg.lora.dropout} each process draws "
                        f"the dropout masks of its share of the batch, so the result depends on it: resume with {old} "
                        f"process(es), or {start_over()}")
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
    "train.loss_weighting", "train.min_snr_gamma", "train.ema",  # train.ema covers train.ema_decay
    "train.method", "train.full_train_modules", "train.master_weights",
)


def changes(saved: dict, cfg, plan, data_fp: str) -> list[str]:
    """What differs, in what changes results, between the run that wrote the checkpoint state `saved`
    and this config and plan: each changed config key with its old and new value, then the data and the
    base model's weights (compared by content)."""
    if saved.get("config") is None:  # written before checkpoints recorded their config: nothing to compare
        return []
    changed = changed_keys(saved["config"], json.loads(cfg.portable_json()), RESULT_KEYS)
    if saved.get("data", data_fp) != data_fp:
        changed.append("the training images or captions (their content)")
    if saved.get("base_model", plan.denoiser_fp) != plan.denoiser_fp:
        changed.append("the base model's weights (their content)")
    return changed


def check_same_run(saved: dict, cfg, plan, data_fp: str, path: Path) -> None:
    """Refuse, in one line naming everything that changed, to resume the checkpoint at `path` (whose
    state.json is `saved`) with a config, data set or base model that changes its results."""
    changed = changes(saved, cfg, plan, data_fp)
    if changed:
        raise UserError(f"cannot resume from '{path}': what it was trained with changed since it was written "
                        f"({'; '.join(changed)}): set these back to go on, or train without {option('--resume')} to start "
                        "over (the run is moved aside)")
