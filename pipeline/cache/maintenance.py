"""Cache upkeep for one config: what it uses and what else is stored (`status`), whether what it uses is
intact (`verify`, optionally recomputing what is not), and removing what it does not use (`prune`).

"Uses" always means the keys `make_plan` gives for this config, the same keys the cache and train stages
compute, so these commands cannot disagree with them. In a cache dir shared by several configs, prune
refuses to remove entries another config uses (cache/owners.py records who uses what) unless told
`all_configs`; a dry run lists them per config.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.kinds import COMPUTED, KINDS, computed, fix_command, needed_keys, numerics_words, why_priors_missing
from pipeline.store.lock import cache_lock
from pipeline.cache.owners import other_configs
from pipeline.cache.stage import ensure_embedded, run_cache
from pipeline.store.store import Store
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.data import schema
from pipeline.data.plan import Plan, model_fingerprints, open_plan


def _open(cfg: Config) -> tuple[Plan, Store]:

    ensure_embedded(cfg)
    return open_plan(cfg)


def status(cfg: Config) -> dict:
    plan, store = _open(cfg)
    needed = needed_keys(plan)
    segs = store.segments_by_kind()
    first = [k.store_kind(plan) for k in COMPUTED if not k.per_dtype]  # then the rest, sorted
    always = {k.store_kind(plan) for k in COMPUTED}
    theirs: dict[str, set[str]] = {}  # kind -> keys other configs recorded using (cache/owners.py)
    for used in other_configs(plan).values():
        for kind, keys in used.items():
            theirs.setdefault(kind, set()).update(keys)
    kinds = {}
    for kind in (*first, *sorted((set(segs) | store.kinds() | set(needed)) - set(first))):
        have, need = store.keys(kind), needed.get(kind, set())
        if kind not in always and not (have or need):
            continue  # a verdicts row only when some image was found undecodable
        others = (have - need) & theirs.get(kind, set())
        kinds[kind] = {
            "needed": len(need), "present": len(need & have), "missing": len(need - have),
            "other_configs": len(others), "stale": len(have - need - others),
            "bytes": sum(_size(p) for p in segs.get(kind, [])),
        }
    prior = kinds.get(plan.prior_kind(), {})
    lacking = None  # the priors this config lacks, why, and the fix, in words
    if prior.get("missing"):
        why = why_priors_missing(plan, store)
        lacking = (f"{prior['missing']} of {prior['needed']} priors for {numerics_words(plan.dtype, plan.quantize)} "
                   f"are missing{'; ' + why if why else ''}: run {fix_command(cfg, plan.dtype)}")
    result = {
        "cache_dir": str(store.root), "dtype": plan.dtype, "quantize": plan.quantize, "kinds": kinds,
        "dtypes_with_priors": sorted(k.removeprefix("prior/") for k in store.kinds() if k.startswith("prior/")),
        "priors_missing": lacking,
        "unreadable_segments": [str(p) for p in store.unreadable],
        "total_bytes": store.bytes_on_disk(),
    }
    store.close()
    return result


def rehash(cfg: Config) -> dict:
    """Hash the model's files again from their contents, not trusting the fingerprint memo, whose stamp (size,
    mtime, inode) misses weights rewritten in place with all three unchanged. Returns which components'
    fingerprints changed: entries keyed by the old ones are then no longer this config's (missing for it)."""
    from pipeline.settings import resolve
    from pipeline.store.keys import Fingerprints

    ensure_embedded(cfg)
    family = resolve(cfg).family
    mine = [family.root.resolve()] + [p.resolve() for p in (family.denoiser_file, family.training_adapter) if p]
    with cache_lock(cfg.cache.dir, "read"):
        fps = Fingerprints(Path(cfg.cache.dir) / "fingerprints.json")
        before = model_fingerprints(fps, family)  # as the memo has them
        dropped = [k for k in fps.memo if any(Path(k) == m or Path(k).is_relative_to(m) for m in mine)]
        for k in dropped:
            del fps.memo[k]
        after = model_fingerprints(fps, family)  # from the files' contents
        fps.save()
    return {"files_rehashed": len(dropped), "changed": [n for n in before if before[n] != after[n]]}


def verify(cfg: Config, repair: bool = False) -> dict:
    """Re-hash every stored entry this config uses. With repair: drop the damaged ones (and unreadable
    segment files) and recompute them with the cache stage, which computes exactly what is missing.
    A file the OS refuses (AccessError: open-file limit, permissions, I/O error) stops it before any
    removal: that is the environment's fault, not the file's."""
    with cache_lock(cfg.cache.dir, "delete" if repair else "read"):
        result = _verify(cfg, repair)
    if result.pop("needs_recompute"):

        s = run_cache(cfg, progress=False)
        result["repaired"] = computed(s)
        again = Store(cfg.cache.dir)
        still = [d for d in result["damaged"] if again.check(d["kind"], d["key"])]
        again.close()
        if still:  # e.g. a failing disk: the fresh copy did not read back either
            raise UserError(f"{len(still)} repaired cache entries read back damaged again (first in {still[0]['segment']})")
    return result


def _verify(cfg: Config, repair: bool) -> dict:
    plan, store = _open(cfg)
    needed = needed_keys(plan)
    present = [(str(store.segment_of(kind, key)), kind, key) for kind, keys in needed.items() for key in keys
               if store.has(kind, key)]
    missing, checked, damaged = sum(map(len, needed.values())) - len(present), len(present), []
    # segment by segment, each closed when done: one file open at a time, however many there are, and
    # HDF5 holds the metadata of one file's entries, not of every file's
    present.sort()
    owner = _samples_by_key(plan)
    texts: list[tuple[str, str, schema.Layout]] = []  # judged together once all are read
    for i, (segment, kind, key) in enumerate(present):
        why = store.check(kind, key)
        if not why:  # intact: but is it this config's? (a foreign entry under the right key)
            layout = store.layout(kind, key)
            want = schema.expected(plan, kind, owner.get((kind, key)))
            if want is None:
                texts.append((segment, key, layout))
            elif bad := schema.mismatch(want, layout):
                why = f"not this config's: {bad}"
        if why:
            damaged.append({"kind": kind, "key": key, "segment": segment, "reason": why})
        if i + 1 == len(present) or present[i + 1][0] != segment:
            store.release(Path(segment))
    reference = schema.text_reference(plan, [x for _, _, x in texts])
    for segment, key, layout in texts:
        if bad := schema.text_mismatch(plan, layout, reference):
            damaged.append({"kind": "text", "key": key, "segment": segment, "reason": f"not this config's: {bad}"})
    order = list(needed)
    damaged.sort(key=lambda d: (order.index(d["kind"]), d["key"]))
    needs_recompute = bool(repair and (damaged or store.unreadable or missing))
    result = {"checked": checked, "missing": missing, "damaged": damaged,
              "unreadable_segments": [str(p) for p in store.unreadable], "repaired": 0,
              "needs_recompute": needs_recompute}
    if needs_recompute:
        for kind in sorted({d["kind"] for d in damaged}):
            store.drop(kind, [d["key"] for d in damaged if d["kind"] == kind])
        store.remove_unreadable()
    store.close()
    return result


def _samples_by_key(plan: Plan) -> dict:
    """(kind, key) -> the sample whose latent or prior it is: what its expected shape depends on."""
    out = {}
    for s in plan.samples:
        for v, key in enumerate(s.latent_keys):
            out[("latent", key)] = s
            out[(plan.prior_kind(), plan.prior_key(s, v))] = s
    return out


def prune(cfg: Config, dry_run: bool = False, keep_dtypes: bool = False, all_configs: bool = False) -> dict:
    """Remove every entry this config does not use, and unreadable segment files. With keep_dtypes the
    priors of other train dtypes stay. Refuses (UserError, counts per config and kind) to remove entries
    other configs recorded using, unless all_configs or dry_run. Each segment is replaced before it is
    unlinked (see Store.drop), so a crash at any point leaves every used entry in place."""
    with cache_lock(cfg.cache.dir, "delete"):
        return _prune(cfg, dry_run, keep_dtypes, all_configs)


def _prune(cfg: Config, dry_run: bool, keep_dtypes: bool, all_configs: bool) -> dict:
    plan, store = _open(cfg)
    needed = needed_keys(plan, keep_unused=True)
    unused = {}
    for kind in sorted(store.kinds()):
        if keep_dtypes and kind not in needed and any(kind.startswith(f"{k.name}/") for k in KINDS if k.per_dtype):
            continue
        if keys := store.keys(kind) - needed.get(kind, set()):
            unused[kind] = keys
    theirs = {}  # other config -> kind -> how many of its entries would go
    for source, kinds in other_configs(plan).items():
        counts = {kind: n for kind, keys in unused.items() if (n := len(keys & kinds.get(kind, set())))}
        if counts:
            theirs[source] = counts
    if theirs and not (all_configs or dry_run):
        store.close()
        listed = "; ".join(f"{s} ({', '.join(f'{k} {n}' for k, n in c.items())})" for s, c in theirs.items())
        raise UserError(f"cache.dir '{cfg.cache.dir}' is shared: prune would remove entries other configs use: "
                        f"{listed}; run with --all-configs to remove them anyway (--dry-run lists everything it "
                        "would remove)")
    before = store.bytes_on_disk()
    removed, lost, estimate = {}, [], 0
    for kind, keys in unused.items():
        r = store.drop(kind, keys, dry_run=dry_run)
        removed[kind] = r["removed"]
        estimate += r["estimate"]
        lost += [f"{kind}/{k}" for k in r["lost"]]
    unreadable = [str(p) for p in store.unreadable]
    estimate += store.remove_unreadable(dry_run=dry_run)
    freed = estimate if dry_run else before - store.bytes_on_disk()
    store.close()
    return {"dry_run": dry_run, "entries_removed": removed, "unreadable_removed": unreadable,
            "bytes_freed": freed, "lost": lost, "other_configs": theirs}


def _size(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed by a concurrent prune since the index was built
        return 0
