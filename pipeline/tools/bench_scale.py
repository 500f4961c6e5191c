"""`make bench-scale`: a large cache under a common open-file limit. Builds the tiny Flux model and N small
synthetic images (10,000 by default), caches them, then runs `cache status`, `cache verify` and a training
start (max_steps = 1) as the CLI does, each a fresh process under `ulimit -n` (1024 by default), and
reports per command the seconds, the peak RSS (the process's own, from os.wait4) and the exit code, and
the segment files the cache takes. It exits 1 when a command fails or verify finds any entry damaged."""

from __future__ import annotations

import json
import os
from collections import Counter
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

CONFIG = """
[model]
path = "model"
max_sequence_length = 16
[data]
resolution = {size}
buckets = false
[[concepts]]
folder = "data/standard"
[[concepts]]
folder = "data/prior"
type = "prior"
[cache]
dir = "cache"
variants = {variants}
batch_size = {batch}
segment_mb = {segment_mb}
[train]
dtype = "{dtype}"
batch_size = 4
max_steps = 1
output_dir = "out"
"""


def make_images(data: Path, n: int, n_prior: int, n_captions: int, size: int) -> None:
    """n distinct random-pixel PNGs (their content keys differ), n_prior of them prior images, with
    captions drawn from n_captions distinct ones. Seeded, so every run caches the same data."""
    from pipeline.families.tiny_parts import WORDS

    rng = random.Random(0)
    captions = [" ".join(["a photo of sks"] + rng.sample(WORDS, 4)) for _ in range(n_captions)]
    pixels = np.random.default_rng(0)
    for i in range(n):
        folder = data / ("prior" if i < n_prior else "standard")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(captions[i % n_captions])


def measure(args: list[str], cwd: Path, nofile: int, log: Path) -> dict:
    """Run `python ARGS` under the open-file limit: seconds, peak RSS in MiB, exit code."""

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(rss_kib / 1024, 1), "exit": proc.returncode}


def _last_json(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


@click.command()
@click.option("--images", default=10_000, show_default=True, help="Synthetic images.")
@click.option("--prior-share", default=0.1, show_default=True, help="Share of them that are prior images.")
@click.option("--captions", default=1000, show_default=True, help="Distinct captions.")
@click.option("--variants", default=4, show_default=True, help="cache.variants")
@click.option("--batch-size", default=4, show_default=True, help="cache.batch_size")
@click.option("--segment-mb", default=256.0, show_default=True, help="cache.segment_mb (0: a file per batch).")
@click.option("--size", default=16, show_default=True, help="Image side in pixels (data.resolution).")
@click.option("--nofile", default=1024, show_default=True, help="Open-file limit (ulimit -n) of the commands.")
@click.option("--dir", "keep", default=None, type=click.Path(file_okay=False),
              help="Work in this folder and keep it; a model and images already there are reused "
                   "(default: a temporary folder).")
def main(images, prior_share, captions, variants, batch_size, segment_mb, size, nofile, keep):
    import torch

    from pipeline.families.flux import tiny as flux_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        dtype = "bf16" if torch.cuda.is_available() else "fp32"
        (root / "bench.toml").write_text(CONFIG.format(size=size, variants=variants, batch=batch_size,
                                                       segment_mb=segment_mb, dtype=dtype))
        t0 = time.perf_counter()
        if not (root / "model" / "model_index.json").exists():
            flux_tiny.build(root / "model")
        if not (root / "data").is_dir():
            make_images(root / "data", images, round(images * prior_share), captions, size)
        prepared = round(time.perf_counter() - t0, 2)

        cli, config = ["-m", "pipeline"], ["--config", "bench.toml"]
        steps = {  # the first is what every command pays before it reads the cache
            "imports only": ["-c", "import pipeline.cache.stage, pipeline.train.stage"],
            "cache": [*cli, "cache", *config, "--quiet"],
            "cache status": [*cli, "cache", "status", *config, "--json"],
            "cache verify": [*cli, "cache", "verify", *config],
            "train start (max_steps 1)": [*cli, "train", *config, "--quiet"],
        }
        results, logs = {}, {}
        for i, (name, args) in enumerate(steps.items()):
            logs[name] = root / f"step{i}.log"
            results[name] = measure(args, root, nofile, logs[name])
            click.echo(f"  {name:<28}{results[name]['seconds']:>9.2f} s{results[name]['peak_rss_mib']:>9.1f} MiB"
                       f"   exit {results[name]['exit']}", err=True)

        segments = [p for p in (root / "cache" / "segments").glob("*.h5") if not p.name.startswith(".")]
        status = _last_json(logs["cache status"])
        verify_log = logs["cache verify"].read_text()
        verify_line = next((line for line in verify_log.splitlines() if line.startswith("verify:")), verify_log[-300:])
        summary = {
            "images": images, "prior_images": round(images * prior_share), "captions": captions, "variants": variants,
            "cache_batch_size": batch_size, "segment_mb": segment_mb, "nofile": nofile,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "prepare_seconds": prepared,
            "entries": sum(k["present"] for k in status.get("kinds", {}).values()),
            "segment_files": len(segments),
            "segment_files_by_kind": dict(Counter(p.name.split(".")[0] for p in segments)),
            "cache_bytes": sum(p.stat().st_size for p in segments),
            "verify": verify_line, "commands": results,
        }
    failed = [n for n, r in results.items() if r["exit"] != 0]
    damaged = "damaged:" in verify_log or " 0 damaged" not in verify_line
    click.echo(f"\n{images} images, {summary['entries']} entries in {len(segments)} segment files "
               f"({summary['cache_bytes'] / 2**20:.1f} MiB), ulimit -n {nofile}")
    click.echo(f"  {'command':<28}{'seconds':>9}{'peak RSS MiB':>14}{'exit':>6}")
    for name, r in results.items():
        click.echo(f"  {name:<28}{r['seconds']:>9.2f}{r['peak_rss_mib']:>14.1f}{r['exit']:>6}")
    click.echo(f"  {verify_line}")
    click.echo(json.dumps(summary))
    if failed or damaged:
        click.echo(f"bench-scale: failed: {', '.join(failed) or 'verify found damage'}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
