"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, each checkpoint
a folder written under a temporary name and renamed into place (so a crash never leaves a half one).

A checkpoint holds what a bitwise-identical continuation needs: the LoRA weights (float32, as trained),
the optimizer's state, the schedule's state, the global RNG states (LoRA dropout draws from them) and
the data position (epoch and index of the next batch; batch order is a pure function of the epoch).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

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


def save(out_dir: Path, state: TrainState, run, keep: int) -> Path:
    """Write the checkpoint of `state` (run: what train.setup built) atomically; keep only the newest
    `keep` (0: all)."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f".tmp-{PREFIX}{state.step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = run.denoiser.module
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(tmp / "lora.safetensors"))
    tensors: dict = {}
    saved = {
        "step": state.step,
        "position": state.position(),
        "optimizer": _split(run.optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _split(run.scheduler.state_dict(), "scheduler", tensors),
        "rng": _split(state.rng(), "rng", tensors),
    }
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(saved))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep:
        for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def restore(path: Path, run) -> TrainState:
    """Load a checkpoint into the freshly built run (model, optimizer, schedule) and the global RNG."""
    tensors = load_file(str(path / "state.safetensors"))
    saved = json.loads((path / "state.json").read_text())
    result = set_peft_model_state_dict(run.denoiser.module, load_file(str(path / "lora.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"checkpoint {path} does not fit this LoRA: {result.unexpected_keys[:3]}")
    run.optimizer.load_state_dict(_join(saved["optimizer"], tensors))
    run.scheduler.load_state_dict(_join(saved["scheduler"], tensors))
    TrainState.restore_rng(_join(saved["rng"], tensors))
    return TrainState(saved["step"], **saved["position"])
