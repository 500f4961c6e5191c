"""`make bench`: median seconds per training step on each family's small model (its tiny builder's "bench"
preset, random weights; `--family` picks some) for a batch of standard samples, a batch of prior samples
with cached targets, and the same prior batch with its target computed online (the peers' extra no-grad,
adapter-disabled forward), each as the train loop runs it: its batches read one step ahead
(train.prefetch). Against them: the standard step reading its batch itself, and its bare compute (forward,
backward and optimizer step on a batch held in memory): `ratio_step_to_bare` is what reading still costs a
step (goal: at most 1.02). `checksum_share` is the sha256 check of every entry a prior step reads
(Store.read checks each one) against that step: an upper bound of what the check costs, since the reader
does it beside the step (goal: under 1%).

One table per family; the JSON line holds the first family's numbers at its top level (the keys this tool
printed when it measured one family) and every family's under "families"."""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

CONFIG = """
[model]
path = "model"
max_sequence_length = 64
[data]
resolution = {resolution}
buckets = false  # one shape, so any batch_size images make one batch
[[concepts]]
folder = "data/standard"
[[concepts]]
folder = "data/prior"
type = "prior"
[cache]
dir = "cache"
variants = 4
batch_size = {batch}
[lora]
rank = 16
alpha = 16.0
[train]
dtype = "{dtype}"
batch_size = {batch}
output_dir = "out"
device = "{device}"
"""


CHUNK = 5  # timed steps a mode runs in a row


def _median_step_seconds(modes: dict, steps: int, warmup: int) -> dict[str, float]:
    """Round-robin over the modes, CHUNK steps each in turn, so that any drift in machine load hits all of
    them alike. A mode is `mode(numbers)`: a context (a prefetcher, for the loop's modes) giving the function
    that runs step i of those numbers. Untimed: the first `warmup` steps, and the first step of each later
    chunk (like a run's first step, it waits for its own read)."""
    times: dict[str, list[float]] = {name: [] for name in modes}
    start, done = 0, 0
    while done < steps:
        lead, n = (warmup if start == 0 else 1), min(CHUNK, steps - done)
        numbers = range(start, start + lead + n)
        for name, mode in modes.items():
            with mode(numbers) as run_step:
                for i in numbers:
                    t0 = time.perf_counter()
                    run_step(i)
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    if i >= start + lead:
                        times[name].append(time.perf_counter() - t0)
        start, done = start + lead + n, done + n
    return {name: statistics.median(t) for name, t in times.items()}


def _checksum_seconds(plan, store, items, repeats: int = 50) -> tuple[float, int]:
    """Median seconds Store.read spends hashing one batch's entries (latent, text, noise and prior of each
    item), and their bytes: the hashes alone, over the arrays as they are stored."""
    import hashlib

    from pipeline.store.store import to_numpy

    arrays = []
    for s, v in items:
        for kind, key in (("latent", s.latent_keys[v]), ("text", s.text_keys[v]), ("noise", s.noise_keys[v]),
                          (plan.prior_kind(), plan.prior_key(s, v))):
            arrays += [to_numpy(t)[0] for t in store.read(kind, key)[0].values()]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a in arrays:
            hashlib.sha256(a).hexdigest()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(a.nbytes for a in arrays)


ROWS = [("standard", "standard samples"), ("prior_cached", "prior samples, cached target"),
        ("prior_online", "prior samples, online target (peers)"),
        ("standard_in_step", "standard, read in the step (no prefetch)"),
        ("bare", "standard, bare compute (batch in memory)")]


def bench_families() -> list[str]:
    """The registered families whose tiny builder has a "bench" preset: the default of --family."""
    from pipeline.families import FAMILIES, tiny_module

    return [name for name in FAMILIES if "bench" in tiny_module(name).PRESETS]


def bench_family(name: str, root: Path, steps: int, warmup: int, batch_size: int, resolution: int, dtype: str,
                 dev: torch.device) -> tuple[dict, dict[str, float]]:
    """Build `name`'s bench model and data under `root`, cache them and time the modes: the family's result
    (as the JSON line prints it) and its medians unrounded (as the table prints them)."""
    from pipeline import tiny
    from pipeline.cache.stage import run_cache
    from pipeline.store.store import Store
    from pipeline.config import load_config
    from pipeline.data.plan import make_plan
    from pipeline.families import tiny_module
    from pipeline.processes import OneProcess
    from pipeline.settings import TORCH_DTYPES
    from pipeline.train.prefetch import Prefetcher
    from pipeline.train.setup import setup
    from pipeline.train.step import optimizer_step, read_batch

    tiny_module(name).build(root / "model", preset="bench")
    tiny.build_synthetic_concepts(root / "data", n=max(8, batch_size))
    (root / "bench.toml").write_text(CONFIG.format(resolution=resolution, batch=batch_size, dtype=dtype, device=dev.type))
    cfg = load_config(root / "bench.toml")
    run_cache(cfg, progress=False)
    plan, store = make_plan(cfg), Store(cfg.cache.dir)
    torch.manual_seed(0)
    run, _ = setup(plan, store, dev, TORCH_DTYPES[dtype], OneProcess())  # what the train stage builds
    n_params = sum(p.numel() for p in run.denoiser.module.parameters())
    standard = [s for s in plan.samples if not s.prior][:batch_size]
    prior = [s for s in plan.samples if s.prior][:batch_size]

    def group(samples, i):
        return [[(s, i % cfg.cache.variants) for s in samples]]

    def loop(samples, prior_mode):
        """Steps as the train loop runs them: the next one's batch read while this one computes."""
        @contextlib.contextmanager
        def mode(numbers):
            # one step more than are taken: the last timed step, too, computes while a read runs
            ahead = [(i, group(samples, i)) for i in [*numbers, numbers[-1] + 1]]
            with Prefetcher(plan, store, run.procs, dev, ahead, prior_mode) as prefetch:
                yield lambda i: optimizer_step(run, plan, store, group(samples, i), i, prior_mode,
                                               reads=prefetch.take(i, group(samples, i)))
        return mode

    def in_step(samples, prior_mode):
        """Each step reads its own batch (no prefetch)."""
        return lambda numbers: contextlib.nullcontext(
            lambda i: optimizer_step(run, plan, store, group(samples, i), i, prior_mode))

    held = read_batch(plan, store, group(standard, 0)[0], "cached")  # read once, before any timing

    def bare(numbers):
        """Forward, backward and optimizer step only: step 0's batch, held in memory, every time."""
        return contextlib.nullcontext(lambda i: optimizer_step(run, plan, store, group(standard, 0), 0, "cached",
                                                              reads=[held]))

    try:
        medians = _median_step_seconds(
            {"standard": loop(standard, "cached"), "prior_cached": loop(prior, "cached"),
             "prior_online": loop(prior, "online"), "standard_in_step": in_step(standard, "cached"), "bare": bare},
            steps, warmup,
        )
        check_seconds, check_bytes = _checksum_seconds(plan, store, group(prior, 0)[0])
    finally:
        store.close()
    return {
        "family": name, "device": str(dev), "dtype": dtype, "denoiser_params": n_params, "batch_size": batch_size,
        "resolution": resolution, "steps": steps, "threads": torch.get_num_threads(),
        "median_seconds": {k: round(v, 5) for k, v in medians.items()},
        "ratio_prior_to_standard": round(medians["prior_cached"] / medians["standard"], 3),
        "ratio_online_to_cached": round(medians["prior_online"] / medians["prior_cached"], 3),
        "ratio_step_to_bare": round(medians["standard"] / medians["bare"], 3),
        "checksum_seconds": round(check_seconds, 6), "checksum_bytes": check_bytes,
        "checksum_share": round(check_seconds / medians["prior_cached"], 5),
    }, medians


def print_table(r: dict, medians: dict[str, float]) -> None:
    click.echo(f"\n{r['family']}: seconds per training step (median of {r['steps']}; {r['denoiser_params']:,}-parameter "
               f"denoiser, {r['dtype']}, {r['device']}, batch {r['batch_size']}, {r['resolution']}px)")
    click.echo(f"  {'batch':<42}{'median s/step':>14}")
    for key, label in ROWS:
        click.echo(f"  {label:<42}{medians[key]:>14.4f}")
    click.echo(f"  prior/standard {r['ratio_prior_to_standard']:.3f}   online/cached {r['ratio_online_to_cached']:.3f}"
               f"   step/bare {r['ratio_step_to_bare']:.3f} (goal <= 1.02)")
    click.echo(f"  sha256 check of a prior step's {r['checksum_bytes']:,} bytes read: {r['checksum_seconds'] * 1e3:.3f} ms, "
               f"{100 * r['checksum_share']:.2f}% of its step (goal < 1%)")


@click.command()
@click.option("--family", "families", multiple=True, help="A family to measure (repeat for more). "
              "Default: every registered family whose tiny model has a \"bench\" preset.")
@click.option("--steps", default=20, show_default=True, help="Timed steps per mode.")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps per mode before timing.")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--resolution", default=128, show_default=True, help="Pixels; latents are resolution/8.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None, help="Default: bf16 on CUDA, fp32 on CPU.")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", default=0, help="torch CPU threads (0: on a CPU one core fewer than torch's default, "
              "left to the prefetch worker as a GPU machine leaves it; on CUDA torch's default).")
def main(families, steps, warmup, batch_size, resolution, dtype, device, threads):
    from pipeline.settings import pick_device

    available = bench_families()
    for name in families:
        if name not in available:
            raise click.BadParameter(f"{name!r} is not a family with a tiny \"bench\" model; choose from "
                                     f"{', '.join(available)}", param_hint="'--family'")
    families = list(dict.fromkeys(families)) or available
    dev = pick_device(device)
    if not threads and dev.type == "cpu":
        # the step computes on the CPU here; on a GPU machine it computes on the GPU and the reader has the
        # host's cores. A reader that has to share the step's cores measures the machine, not the overlap.
        threads = max(1, torch.get_num_threads() - 1)
    if threads:
        torch.set_num_threads(threads)
    dtype = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in families:
            results[name], medians = bench_family(name, Path(tmp) / name, steps, warmup, batch_size, resolution,
                                                  dtype, dev)
            print_table(results[name], medians)
    click.echo(json.dumps({**results[families[0]], "families": results}))


if __name__ == "__main__":
    main()
