"""Stage 1: run the frozen base model once and store latents, text embeddings, noise seeds and
timesteps, and for every prior sample the base model's own prediction, keyed by the train dtype.

Each phase computes only what is missing. Work is done in chunks of fixed composition (all needed
keys sorted, cut every cache.batch_size). Finished chunks are gathered and written together as one
atomic segment once they hold cache.segment_mb MiB, once the first of them is cache.segment_seconds old,
and at the end of the phase (segment_mb = 0: one segment per chunk). A crash loses at most the chunks
not yet written, never part of one, and a rerun recomputes exactly the same chunks with the same batch
composition, so the finished cache equals an uninterrupted run's bit for bit, however it was split
into files. Ctrl-C writes the finished chunks first.

Under a launcher (pipeline/processes.py), one job of several processes: rank 0 takes the lock and indexes the store,
and every rank gets from it the chunks still to do, cut exactly as with one process; rank r computes every
N-th of them and writes its own segments. A barrier ends each phase (the prior phase reads the latents and
texts other ranks wrote), after which every rank re-indexes the store. The chunks, and so the cache, are
those of one process whatever the number of ranks.
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path

from diffusers.training_utils import free_memory
from tqdm import tqdm

from pipeline import tiny
from pipeline.cache import owners
from pipeline.cache.compute import COMPUTE
from pipeline.data.kinds import COMPUTED, Kind, needed_keys
from pipeline.store.keys import digest
from pipeline.store.lock import cache_lock
from pipeline.store.store import Entry, Store, access_error, os_errno
from pipeline.config import Config, changed_keys
from pipeline.errors import UserError, note
from pipeline.memory import say_estimate
from pipeline.data.plan import Plan, open_plan
from pipeline.processes import OneProcess, start
from pipeline.settings import processes_kind, resolve


def ensure_embedded(cfg: Config) -> None:
    """For configs with an [embedded] table: build the tiny model and synthetic data where missing, and say
    (one line each, on stderr) what was built."""
    if cfg.embedded is None:
        return
    if not Path(cfg.model.path).is_absolute():  # load_config resolves every local path: this is a hub id
        raise UserError(f"[embedded]: model.path '{cfg.model.path}' is a hub id, and [embedded] builds a local tiny "
                        "model: remove the [embedded] table to use that model, or set model.path to a new folder")
    try:
        built = tiny.ensure_embedded(Path(cfg.model.path), [Path(c.folder) for c in cfg.concepts],
                                     cfg.embedded.family, cfg.embedded.preset)
    except (ValueError, FileExistsError) as e:
        raise UserError(f"[embedded]: {e}") from None
    for line in built:
        note(line)


def _chunks(keys: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(keys), size):
        yield keys[i : i + size]


class Phase:
    """One kind of entry for one run: which keys are needed, which are missing, and computing the chunks
    that hold missing ones."""

    def __init__(self, kind: Kind, plan: Plan, store: Store, progress: bool, procs: OneProcess):
        self.kind, self.plan, self.store, self.progress = kind, plan, store, progress
        self.name = kind.store_kind(plan)
        self.needed = kind.jobs(plan, False)
        self.order = sorted(self.needed)
        chunks = list(_chunks(self.order, kind.chunk(plan.cfg)))

        def todo() -> tuple[int, list[int]]:  # rank 0's index decides, so that every rank cuts the same work
            missing = sum(not store.has(self.name, k) for k in self.order)
            return missing, [i for i, c in enumerate(chunks) if any(not store.has(self.name, k) for k in c)]

        self.missing, todo_chunks = procs.from_main(todo)
        self.chunks = [chunks[i] for i in todo_chunks[procs.rank :: procs.size]]  # this rank's share
        self.computed = 0

    def run(self, device) -> None:
        if not self.chunks:
            return
        store, name = self.store, self.name
        load, compute = COMPUTE[self.kind.name]
        model = load(self.plan, device)
        chunks = self.chunks
        mine = sum(not store.has(name, k) for c in chunks for k in c)
        self._pending, self._bytes, self._since = {}, 0, 0.0
        with tqdm(total=mine, desc=name, unit=self.kind.unit, disable=not self.progress) as bar:
            try:
                for chunk in chunks:
                    if not self._pending:
                        self._since = time.monotonic()  # the age of the waiting work: what a crash would lose
                    entries = compute(self.plan, store, model, [self.needed[k] for k in chunk])
                    # entries may lack keys whose input turned out unusable (a bad image)
                    fresh = {k: e for k, e in entries.items() if not store.has(name, k)}
                    self._add(fresh)
                    bar.update(len(fresh))
                    if self._due():
                        self._flush()
                self._flush()
            except KeyboardInterrupt:
                self._flush_on_interrupt()
                raise
        del model  # before the next phase loads its model: only one is ever resident
        free_memory()

    def _add(self, fresh: dict[str, Entry]) -> None:
        for key, (tensors, attrs) in fresh.items():
            tensors = {n: t.detach().cpu() for n, t in tensors.items()}  # waiting entries hold no device memory
            self._pending[key] = (tensors, attrs)
            self._bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def _due(self) -> bool:
        c = self.plan.cfg.cache
        return self._bytes >= c.segment_mb * 2**20 or time.monotonic() - self._since >= c.segment_seconds

    def _flush(self) -> None:
        """Write the waiting chunks as one segment."""
        store, name = self.store, self.name
        try:
            store.write(name, self._pending)
        except OSError as e:
            n = os_errno(e)
            if n in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
                raise UserError(
                    f"disk full writing the cache in '{store.root}': every finished segment is kept "
                    f"({self.computed} new {name} entries this run); free space and run the same command again"
                ) from None
            if n:  # a read-only disk, permissions: one line, as for reads
                raise access_error(store.segments, e, "write a segment in") from None
            raise
        self.computed += len(self._pending)
        self._pending, self._bytes = {}, 0

    def _flush_on_interrupt(self) -> None:
        # Ctrl-C: keep the finished chunks (a second Ctrl-C, or a failure, leaves them to the rerun)
        try:
            self._flush()
        except (Exception, KeyboardInterrupt):  # noqa: BLE001 - the interrupt is what gets reported
            pass

    @property
    def reused(self) -> int:
        return len(self.order) - self.missing  # present before this run


def run_cache(cfg: Config, progress: bool = True) -> dict:
    """Compute every missing cache entry the config needs. Returns the summary it prints.
    Refuses (UserError) while another cache run, prune or repair writes the same directory.
    Under a launcher, every rank runs this; each returns the same summary, with every rank's counts."""
    with start(processes_kind(cfg, "cache"), cfg.cache.device, cfg.cache.rank_timeout_minutes,
               "cache.rank_timeout_minutes") as procs:
        with procs.main_holds(lambda: cache_lock(cfg.cache.dir, "write", procs.job())):  # one job, one lock
            return _run_cache(cfg, progress and procs.is_main, procs)


# Config keys (dotted, a prefix covers a table) that change which entries a cache run computes, or how its
# work is cut into chunks: under a launcher, ranks that differ in any of them are refused.
CACHE_KEYS = (
    "model.", "concepts", "data.", "validation.prompts", "train.dtype", "train.prior_mode", "train.device",
    "cache.dir", "cache.variants", "cache.seed", "cache.batch_size", "cache.timestep_sampling", "cache.logit_mean",
    "cache.logit_std", "cache.mode_scale", "cache.shift", "cache.dynamic_shift", "cache.noise_offset",
    "cache.input_perturbation",
)


def _cache_identity(plan: Plan) -> dict:
    return {"config": json.loads(plan.cfg.portable_json()), "entries": _entries_digest(plan)}


def _entries_digest(plan: Plan) -> str:
    """What the plan needs from the cache, by content: every needed key of every kind."""
    return digest(sorted((kind, sorted(keys)) for kind, keys in needed_keys(plan).items()))


def _cache_changes(theirs: dict, plan: Plan) -> list[str]:
    changed = changed_keys(theirs["config"], json.loads(plan.cfg.portable_json()), CACHE_KEYS)
    if theirs["entries"] != _entries_digest(plan) and not changed:
        changed.append("the images, captions or model weights (their content)")
    return changed


def _run_cache(cfg: Config, progress: bool, procs: OneProcess) -> dict:
    start_time = time.perf_counter()
    procs.from_main(lambda: ensure_embedded(cfg))  # one rank builds; the others read what it built
    settings = resolve(cfg, "cache")  # every refusal, before any model loads
    plan, store = open_plan(cfg, settings)
    # every rank cuts the work from rank 0's index, so all of them must need the same entries
    procs.refuse_unlike(lambda: _cache_identity(plan), lambda theirs: _cache_changes(theirs, plan), "would cache another config")
    if procs.is_main:
        owners.record(plan)  # before computing: what a run that is cut short wrote is claimed too
    device = settings.stage_device(procs)
    # the denoiser's outputs are keyed by the device type training runs on, so they are computed there
    # (under a launcher, this rank's own device when it is of that type)
    prior_device = settings.prior_device_of(procs)
    say_estimate(cfg, prior_device)
    counts, mine = {}, {}
    for kind in COMPUTED:  # in order: the prior phase reads the latents, texts and noise computed before it
        phase = Phase(kind, plan, store, progress, procs)
        phase.run(prior_device if kind.per_dtype else device)
        if procs.size > 1:
            procs.barrier(f"the {phase.name} phase")
            store.refresh()  # the other ranks' segments, the bad-image verdicts among them
        plan.drop_bad(store)  # images the latent phase found undecodable are left out of what follows
        counts.update({kind.counts[0]: phase.computed, kind.counts[1]: phase.reused})
        mine[kind.counts[0]] = phase.computed
    per_rank = procs.gather(mine)
    counts.update({k: sum(r[k] for r in per_rank) for k in mine})
    if procs.is_main:
        owners.record(plan)  # again: with the verdicts on undecodable images found on the way
    summary = {
        "samples": len(plan.training),
        "prior_samples": sum(s.prior for s in plan.training),
        "validation_samples": len(plan.held_out),
        "images_per_bucket": plan.bucket_counts(),
        "variants": cfg.cache.variants,
        "dtype": cfg.train.dtype,
        "quantize": cfg.model.quantize,
        **counts,
        "bytes_on_disk": store.bytes_on_disk(),
        # files that could not be read (damaged or foreign); their entries, if needed, were recomputed
        "unreadable_segments": [str(p) for p in store.unreadable],
        "skipped_images": plan.skipped,
        "missing_captions": len(plan.missing_captions),  # images trained with an empty caption (one warning names them)
        "seconds": round(time.perf_counter() - start_time, 2),
    }
    if procs.size > 1:  # what each rank computed (the totals above are their sums)
        summary["ranks"] = [{"rank": r, "host": procs.hosts[r], **c} for r, c in enumerate(per_rank)]
    store.close()
    return summary
