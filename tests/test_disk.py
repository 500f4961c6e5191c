"""A full disk and a read-only cache (issue 13, item 5). The kernel refuses the writes: a file size limit
(RLIMIT_FSIZE, EFBIG) set just around one save in this process, a real full filesystem (a small tmpfs)
and a real read-only mount (both in a mount namespace of a subprocess). Each failed write is one line, no
traceback, no temporary left, and the trained weights are not lost: the LoRA is written before anything
optional, and a failure before it names the last good checkpoint."""

import contextlib
import errno
import resource
import shlex
import signal
import subprocess
import sys

import pytest

from pipeline.store import lock
from pipeline.store.lock import cache_lock
from pipeline.cache.stage import run_cache
from pipeline.errors import UserError
from pipeline.train import checkpoint
from pipeline.train import stage as train_stage
from pipeline.train.stage import run_train

from conftest import configure


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes of a file fail with EFBIG (not a signal) while the block runs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def limited(monkeypatch, owner, name, when=lambda *a, **k: True):
    """Make owner.name run under a 1 KB file size limit (on the calls `when` picks)."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if not when(*args, **kwargs):
            return real(*args, **kwargs)
        with file_size_limit(1024):
            return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def temporaries(root):
    return [p for p in root.rglob(".*") if p.name != ".lock"]


@pytest.mark.e2e
def test_a_failed_checkpoint_write_stops_in_one_line_and_resume_goes_on(project, monkeypatch, capsys):
    path, _ = project(max_steps=6)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    limited(monkeypatch, checkpoint, "save", when=lambda out, state, *a: state.step == 4)
    with pytest.raises(UserError) as e:
        run_train(cfg, progress=False)
    out = project.root / "out"
    message = str(e.value)
    assert "\n" not in message and "training stopped after step 4: could not write '" in message
    assert str(out / "checkpoints" / "step-00000004" / "lora.safetensors") in message
    assert "(File too large)" in message and "no LoRA was written" in message
    assert f"the last good checkpoint is '{out / 'checkpoints' / 'step-00000002'}'" in message
    assert temporaries(out) == [] and not (out / cfg.train.lora_name).exists()
    monkeypatch.undo()
    assert run_train(cfg, progress=False, resume=True)["resumed_from_step"] == 2


@pytest.mark.e2e
def test_a_failed_lora_write_names_the_last_checkpoint(project, monkeypatch, capsys):
    path, _ = project(max_steps=3)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    limited(monkeypatch, train_stage, "save_run_lora")
    with pytest.raises(UserError) as e:
        run_train(cfg, progress=False)
    out = project.root / "out"
    assert f"could not write '{out / cfg.train.lora_name}' (File too large)" in str(e.value)
    # the last step is checkpointed before the LoRA is written: nothing to train again
    assert "step-00000003" in str(e.value) and temporaries(out) == []
    monkeypatch.undo()
    assert run_train(cfg, progress=False)["resumed_from_step"] == 3 and (out / cfg.train.lora_name).is_file()


@pytest.mark.e2e
def test_a_failed_plot_write_keeps_the_lora_and_warns(project, monkeypatch, capsys):
    path, cfg = project(max_steps=2)
    run_cache(cfg, progress=False)
    import pipeline.plot

    limited(monkeypatch, pipeline.plot, "plot_run")
    summary = run_train(cfg, progress=False)
    out = project.root / "out"
    err = capsys.readouterr().err
    assert summary["plot"] is None and (out / cfg.train.lora_name).is_file()
    assert "warning: could not write '" in err and "after the LoRA was written" in err and "Traceback" not in err
    assert temporaries(out) == [] and not (out / "loss.png").exists()


def test_a_read_lock_needs_no_write_access(tmp_path, monkeypatch):
    def unwritable(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(lock, "_create", unwritable)
    with cache_lock(tmp_path, "read"):  # no lock file there, and none can be made: reads unlocked
        pass
    (tmp_path / ".lock-read").write_text("")
    (tmp_path / ".lock-write").write_text("")
    with cache_lock(tmp_path, "read"):  # existing lock files are opened read-only
        pass
    with pytest.raises(UserError, match="cannot write '.*' \\(Read-only file system\\)"):
        with cache_lock(tmp_path / "other", "write"):
            pass


def in_mount_namespace(script: str) -> subprocess.CompletedProcess:
    """Run a shell script as root of a new user and mount namespace (mounts vanish with it)."""
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600)


def _namespaces_or_skip():
    try:
        ok = in_mount_namespace("mount -t tmpfs tmpfs /mnt").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("this machine allows no user mount namespaces (unshare --user --mount)")


@pytest.mark.slow
def test_a_full_disk_through_the_cli_is_one_line(project):
    _namespaces_or_skip()
    path, _ = project(max_steps=4)
    cfg = configure(path, train={"checkpoint_every": 2})
    run_cache(cfg, progress=False)
    out = project.root / "out"
    out.mkdir()
    train = shlex.join([sys.executable, "-m", "pipeline", "train", "--config", str(path), "--quiet"])
    # 48 KiB: metrics and the lock fit, a checkpoint (two LoRA files and the optimizer's state) does not
    r = in_mount_namespace(f"mount -t tmpfs -o size=48k tmpfs {out} && {train}; echo rc=$?; ls -A {out} {out}/checkpoints")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert "rc=2" in r.stdout and len(errors) == 1, (r.stdout, r.stderr)
    err = errors[0]
    assert err.startswith("error: training stopped after step 2: could not write"), err
    assert "(No space left on device)" in err and "there is no checkpoint" in err and "Traceback" not in r.stderr
    listing = r.stdout.split()
    assert not [name for name in listing if name.startswith(".") and name not in (".lock",)], r.stdout


@pytest.mark.slow
def test_a_read_only_cache_can_be_trained_from_and_verified(project):
    _namespaces_or_skip()
    path, cfg = project(max_steps=2)
    run_cache(cfg, progress=False)
    cache = project.root / "cache"
    before = sorted(p.name for p in cache.iterdir())
    py = shlex.join([sys.executable, "-m", "pipeline"])
    script = (f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} && "
              f"{py} train --config {path} --quiet && {py} cache verify --config {path} && "
              f"{py} cache status --config {path}; echo rc=$?; {py} cache verify --repair --config {path}")
    r = in_mount_namespace(script)
    assert "rc=0" in r.stdout and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert "verify: " in r.stdout and "0 damaged" in r.stdout
    assert (project.root / "out" / cfg.train.lora_name).is_file()
    assert "error: cannot write '" in r.stderr and "(Read-only file system)" in r.stderr  # --repair must write
    assert sorted(p.name for p in cache.iterdir()) == before  # no lock file was made there
