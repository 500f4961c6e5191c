"""Runs as the UI sees them: its jobs (job.py subprocesses, one record each under <projects>/.ui/jobs/)
and, for any config, what its train.output_dir holds. Progress is read from the run's own files
(metrics.jsonl, validation.jsonl, samples/, loss.png) and the output folder's lock, so a run started from
the command line shows as well, and a UI started again finds the runs it left."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image
from safetensors import SafetensorError, safe_open

from pipeline.atomic import pid_alive, replacing
from pipeline.config import Config, changed_keys
from pipeline.errors import UserError
from pipeline.train import checkpoint
from pipeline.train.outdir import LOCK, PREVIOUS
from pipeline.train.sinks import read_records

NOTICE = re.compile(r"(train|cache|warning): (?!\s*\d+%)")  # a notice, not a progress bar's line
CHILDREN: dict[int, subprocess.Popen] = {}  # this UI's own jobs, polled so that none lingers as a zombie


def jobs_dir(projects: Path) -> Path:
    return projects / ".ui" / "jobs"


def start(projects: Path, config: Path) -> str:
    """Start cache then train for the config in a new session (it goes on if the UI stops); its job id."""
    folder = jobs_dir(projects)
    folder.mkdir(parents=True, exist_ok=True)
    job = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{len(list(folder.glob('*.json')))}"
    record = folder / job
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.ui.job", str(config), str(record)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    CHILDREN[proc.pid] = proc
    with replacing(record.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"config": str(config), "pid": proc.pid, "started": time.time()}))
    return job


def _alive(pid: int) -> bool:
    if pid in CHILDREN:
        return CHILDREN[pid].poll() is None
    if not pid_alive(pid):
        return False
    try:  # the pid may be another process's by now
        return b"pipeline.ui.job" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def jobs(projects: Path, config: Path) -> list[dict]:
    """The jobs of one config, newest first: id, running, and (when ended) rc and the CLI's last message."""
    out = []
    for path in sorted(jobs_dir(projects).glob("*.json"), reverse=True):
        if path.name.endswith(".status.json"):
            continue
        record = json.loads(path.read_text())
        if Path(record["config"]) != config:
            continue
        job = path.stem
        status = path.with_name(job + ".status.json")
        record.update(id=job, running=_alive(record["pid"]) and not status.exists())
        if status.exists():
            record.update(json.loads(status.read_text()))
        log = path.with_name(job + ".log")
        record["log"] = _tail(log)
        record["notes"] = _notes(log)
        out.append(record)
    return out


def _tail(log: Path, lines: int = 8) -> str:
    if not log.is_file():
        return ""
    text = log.read_bytes()[-20000:].decode(errors="replace")
    # progress bars rewrite their line with \r: keep each line's last state
    return "\n".join(line.split("\r")[-1] for line in text.split("\n")[-lines:])


def _notes(log: Path) -> str:
    """The stages' one-line notices (where a run starts, warnings), which the tail of the log may have passed."""
    if not log.is_file():
        return ""
    lines = re.split(r"[\r\n]", log.read_text(errors="replace"))
    return "\n".join(line for line in lines if NOTICE.match(line))


def stop(projects: Path, job: str) -> None:
    """SIGINT to the job's process group: the running stage stops as on Ctrl-C, keeping its checkpoints."""
    record = json.loads((jobs_dir(projects) / f"{job}.json").read_text())
    if _alive(record["pid"]):
        os.killpg(record["pid"], signal.SIGINT)


def lock_holder(path: Path) -> str:
    """Who holds an flock on `path` ("" when nobody): the holder writes its pid and command into the file.
    Tested with a shared lock taken and dropped at once, never waited for."""
    try:
        fh = open(path)
    except OSError:
        return ""
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        fcntl.flock(fh, fcntl.LOCK_UN)
    return ""


def _mean(records: list[dict], key: str, window: int = 20):
    values = [r[key] for r in records[-window * 4:] if r.get(key) is not None][-window:]
    return sum(values) / len(values) if values else None


def total_steps(cfg: Config, records: list[dict]) -> int | None:
    """The run's last step: max_steps, else epochs times the steps of a whole epoch (once one is done)."""
    per_epoch = sum(1 for r in records if r.get("epoch") == 0)
    whole = cfg.train.epochs * per_epoch if any(r.get("epoch", 0) > 0 for r in records) else None
    if cfg.train.max_steps:
        return min(cfg.train.max_steps, whole) if whole else cfg.train.max_steps
    return whole


PLANNED: dict[str, int | None] = {}  # run lengths by config (portable_json): a plan is not read on every poll
PLANNING = threading.Lock()


def planned_steps(cfg: Config) -> int | None:
    """The run's last step as the train stage counts it (setup.run_length: train.epochs times the batches of
    an epoch, from the plan and the cached latents' shapes), for a run with no train.max_steps before its first
    epoch is done. Loads no model, but the plan reads every image: once per config. None where it cannot be
    known (the cache incomplete, a folder gone)."""
    from pipeline.data.plan import open_plan
    from pipeline.train.setup import run_length

    key = cfg.portable_json()
    with PLANNING:
        if key not in PLANNED:
            try:
                plan, store = open_plan(cfg)
                try:
                    PLANNED[key] = run_length(plan, store).total_steps
                finally:
                    store.close()  # no segment file held open by the UI (a prune may remove it)
            except (UserError, OSError, KeyError, ValueError):
                PLANNED[key] = None
        return PLANNED[key]


def grid_labels(path: Path) -> list[str]:
    try:
        with Image.open(path) as image:
            return json.loads(image.text.get("prior_lora.labels", "[]"))
    except (OSError, ValueError):
        return []


def progress(cfg: Config) -> dict:
    """What a run in cfg's train.output_dir is doing, from its files alone."""
    out = Path(cfg.train.output_dir)
    records = read_records(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    validations = read_records(out / "validation.jsonl") if (out / "validation.jsonl").is_file() else []
    step = records[-1]["step"] + 1 if records else 0
    training = lock_holder(out / LOCK)
    total = total_steps(cfg, records)
    if total is None and records and training:
        total = planned_steps(cfg)
    seconds = _mean(records, "seconds")
    last_val = next((v for v in reversed(validations) if "val_loss" in v or "prior_drift" in v), {})
    samples = sorted((out / "samples").glob("step-*.png")) if (out / "samples").is_dir() else []
    return {
        "training": training,
        "caching": lock_holder(Path(cfg.cache.dir) / ".lock-write"),
        "step": step, "total": total,
        "eta_seconds": round(seconds * (total - step)) if seconds and total and total > step else None,
        "loss_standard": _mean(records, "loss_standard"), "loss_prior": _mean(records, "loss_prior"),
        "val_loss": last_val.get("val_loss"), "prior_drift": last_val.get("prior_drift"),
        "lora": (out / cfg.train.lora_name).is_file(),
        "plot": (out / "loss.png").is_file(),
        "samples": [{"file": p.relative_to(out).as_posix(), "labels": grid_labels(p)} for p in samples],
    }


def previous_runs(cfg: Config) -> list[dict]:
    """Earlier runs moved to previous/ (see train/outdir.py): their LoRA files and final numbers."""
    root = Path(cfg.train.output_dir) / PREVIOUS
    runs = []
    for folder in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        records = read_records(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
        runs.append({"name": folder.name, "loras": sorted(p.name for p in folder.glob("*.safetensors")),
                     "steps": records[-1]["step"] + 1 if records else 0,
                     "loss_standard": _mean(records, "loss_standard"), "loss_prior": _mean(records, "loss_prior")})
    return runs


NOW = "config"  # the config file as it is now, for comparing with a run before any is recorded
CURRENT = "current"  # the run in train.output_dir itself


def recorded_config(folder: Path, lora_name: str) -> dict | None:
    """The config a run recorded (docs/lora-files.md): its LoRA file's prior_lora.config, else the newest
    checkpoint's state.json; None where neither is there (a run stopped before its first checkpoint)."""
    for lora in [folder / lora_name, *sorted(folder.glob("*.safetensors"))]:
        try:
            with safe_open(str(lora), "numpy") as f:  # the header only: no tensor is read
                config = json.loads((f.metadata() or {}).get("prior_lora.config") or "null")
        except (OSError, SafetensorError, ValueError):
            continue
        if isinstance(config, dict):
            return config
    newest = checkpoint.latest(folder)
    try:
        return checkpoint.saved_state(newest).get("config") if newest else None
    except (OSError, ValueError):
        return None


def run_names(cfg: Config) -> list[str]:
    """What a settings diff can compare: the config file now, the run in output_dir, each run in previous/
    (newest first)."""
    root = Path(cfg.train.output_dir) / PREVIOUS
    earlier = sorted((p.name for p in root.iterdir() if p.is_dir()), reverse=True) if root.is_dir() else []
    return [NOW, CURRENT, *(f"{PREVIOUS}/{name}" for name in earlier)]


def settings_of(cfg: Config, name: str, names: list[str]) -> dict | None:
    if name == NOW:
        return json.loads(cfg.portable_json())
    if name not in names:
        raise UserError(f"no run '{name}' in '{cfg.train.output_dir}' (one of: {', '.join(names)})")
    out = Path(cfg.train.output_dir)
    return recorded_config(out if name == CURRENT else out / name, cfg.train.lora_name)


def settings_diff(cfg: Config, old: str, new: str) -> list[str] | str:
    """The config keys that differ between two runs' recorded configs, as "key old -> new" lines
    (config.changed_keys, as a resume's refusal lists them); a one-line reason where one recorded none."""
    names = run_names(cfg)
    a, b = settings_of(cfg, old, names), settings_of(cfg, new, names)
    missing = [n for n, c in ((old, a), (new, b)) if c is None]
    if missing:
        return f"no config recorded for {' or '.join(missing)} (no LoRA file or checkpoint yet)"
    return changed_keys(a, b, ("",))


def run_file(cfg: Config, relative: str) -> Path | None:
    """A file of the run (a sample grid, the loss plot) by its path inside train.output_dir; None outside it."""
    out = Path(cfg.train.output_dir).resolve()
    path = (out / relative).resolve()
    return path if path.is_relative_to(out) and path.is_file() else None
