"""Open files and the environment: a cache of more segment files than `ulimit -n` allows verifies and
trains, and an error the OS reports (too many open files, permission denied, an I/O error) is one line
naming the file, is never called damage, and makes verify --repair and prune delete nothing."""

import errno
import os
import resource
import subprocess
import sys

import h5py
import pytest
from click.testing import CliRunner

from pipeline.cache.stage import run_cache
from pipeline.cli import main

LIMIT = 64  # open files; torch, the model and the interpreter take about half of them


def _low_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def _segments(cache_dir):
    return {p.name: p.stat().st_mtime_ns for p in (cache_dir / "segments").glob("*.h5")}


@pytest.mark.slow
def test_verify_and_training_under_a_low_open_file_limit(project):
    # a segment per batch: 16 latent + 10 text + 1 noise + 64 prior files, more than the limit
    path, cfg = project(cache_batch=1, variants=8, segment_mb=0, max_steps=1)
    run_cache(cfg, progress=False)
    assert len(_segments(project.root / "cache")) > LIMIT

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", *args, "--config", str(path)],
                              capture_output=True, text=True, preexec_fn=_low_limit)

    r = run("cache", "verify")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 damaged, 0 unreadable segment files, 0 not cached" in r.stdout and "damaged:" not in r.stdout
    r = run("train", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"steps": 1' in r.stdout


def _refuse(monkeypatch, code, when):
    """h5py.File raises OSError(code) on every open ("index") or on each file's second open ("read": the
    index was built, the entries cannot be read)."""
    real, seen = h5py.File, set()

    def File(name, mode="r", *a, **k):
        if mode == "r" and (when == "index" or name in seen):
            raise OSError(code, os.strerror(code))
        seen.add(name)
        return real(name, mode, *a, **k)

    monkeypatch.setattr(h5py, "File", File)


@pytest.mark.e2e
@pytest.mark.parametrize("command,code,when", [
    (("cache", "verify", "--repair"), errno.EMFILE, "index"),
    (("cache", "verify", "--repair"), errno.EACCES, "read"),
    (("cache", "verify", "--repair"), errno.EIO, "read"),
    (("cache", "prune"), errno.EMFILE, "index"),
    (("cache", "status"), errno.EROFS, "index"),
])
def test_an_environmental_error_is_one_line_and_removes_nothing(project, monkeypatch, command, code, when):
    path, cfg = project()
    run_cache(cfg, progress=False)
    before = _segments(project.root / "cache")
    _refuse(monkeypatch, code, when)
    r = CliRunner().invoke(main, [*command, "--config", str(path)])
    monkeypatch.undo()
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: cannot read cache file '{project.root / 'cache' / 'segments'}/")
    assert f"({errno.errorcode[code]})" in r.stderr and "not damage" in r.stderr
    assert "damaged" not in r.stdout and "unreadable segment file:" not in r.stdout
    assert _segments(project.root / "cache") == before  # nothing removed, nothing rewritten
    r = CliRunner().invoke(main, ["cache", "verify", "--config", str(path)])
    assert r.exit_code == 0 and "0 damaged, 0 unreadable segment files, 0 not cached" in r.stdout


@pytest.mark.e2e
def test_training_reports_an_environmental_error_in_one_line(project, monkeypatch):
    from pipeline.errors import UserError
    from pipeline.train.stage import run_train

    _, cfg = project(max_steps=1)
    run_cache(cfg, progress=False)
    _refuse(monkeypatch, errno.EMFILE, "read")
    with pytest.raises(UserError, match=r"cannot read cache file '.*': Too many open files \(EMFILE\); raise the "
                                        r"open-file limit \(ulimit -n\)"):
        run_train(cfg, progress=False)
