"""Which configs use a cache dir. Entries do not say which config wrote them, so each cache run records, in
`<cache.dir>/configs/<hash of the config's path>.json`, the config file and the keys it uses. `prune` reads
these records to tell the entries another config uses (refused without --all-configs) from those no config
uses any more. A record only claims; the entries stay where they are, and deleting the folder is safe
(prune then cannot tell, and removes what this config does not use, as before the records existed).

Configs that use the same entries apart from the train dtype's priors count as one owner: that is one
config run in several dtypes (`--dtype`), whose other dtypes' priors prune removes unless --keep-dtypes.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import replacing
from pipeline.store.keys import digest
from pipeline.data.kinds import KINDS, needed_keys
from pipeline.data.plan import Plan

DIR = "configs"


def _per_dtype(kind: str) -> bool:
    return any(kind.startswith(f"{k.name}/") for k in KINDS if k.per_dtype)


def _path(plan: Plan) -> Path:
    return Path(plan.cfg.cache.dir) / DIR / f"{digest('config', plan.cfg.source)[:16]}.json"


def _identity(plan: Plan, needed: dict[str, set[str]]) -> str:
    # the entries used apart from the priors, and what a prior's key adds to them except the dtype
    shared = {kind: sorted(keys) for kind, keys in needed.items() if not _per_dtype(kind)}
    return digest(shared, plan.denoiser_fp, plan.family.prediction_settings())


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
        return record if {"config", "identity", "kinds"} <= set(record) else None
    except (OSError, ValueError):
        return None  # half-written by hand or foreign: it claims nothing


def record(plan: Plan) -> None:
    """Record that this config uses its entries (the cache stage calls this before it computes any)."""
    needed = needed_keys(plan, keep_unused=True)
    identity, path = _identity(plan, needed), _path(plan)
    kinds = {kind: sorted(keys) for kind, keys in needed.items() if keys}
    old = _read(path)
    if old and old["identity"] == identity:  # the same config cached in another dtype before: keep those priors
        kinds = {**{k: v for k, v in old["kinds"].items() if _per_dtype(k)}, **kinds}
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps({"config": plan.cfg.source, "identity": identity, "kinds": kinds}))


def other_configs(plan: Plan) -> dict[str, dict[str, set[str]]]:
    """config file -> store kind -> keys, for every other config that recorded using this cache dir and whose
    file still exists (a deleted config's entries are no one's)."""
    folder = Path(plan.cfg.cache.dir) / DIR
    if not folder.is_dir():
        return {}
    own, identity = _path(plan), _identity(plan, needed_keys(plan, keep_unused=True))
    out = {}
    for path in sorted(folder.glob("*.json")):
        r = _read(path)
        if r is None or path == own or r["identity"] == identity or not Path(r["config"]).is_file():
            continue
        out[r["config"]] = {kind: set(keys) for kind, keys in r["kinds"].items()}
    return out
