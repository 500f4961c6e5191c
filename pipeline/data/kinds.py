"""The kinds of cache entry, in one registry (KINDS): the contract between the two stages. Each kind says
which keys a plan needs and what the summaries call it. The cache stage computes them in this order
(how: pipeline/cache/compute.py, one entry per kind); `cache status`, `verify` and `prune`, and training's
check that the cache is complete, all read this list, so a new kind is one entry here (and its computing
there) and nothing else forgets it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import quantize
from pipeline.store.store import Store
from pipeline.config import Config
from pipeline.errors import UserError, via_make
from pipeline.data.plan import BAD_IMAGE, Plan


@dataclass(frozen=True)
class Kind:
    name: str  # the store's kind; with per_dtype, stored as "<name>/<plan.numerics_label>" ("prior/bf16-int8")
    label: str  # what messages call it ("the cache lacks <label> ...")
    jobs: Callable[[Plan, bool], dict[str, Any]]  # (plan, keep_unused) -> key: what computing it needs
    counts: tuple[str, str] = ("", "")  # summary keys: (computed this run, present before)
    unit: str = ""  # progress-bar unit
    computed: bool = False  # computed by a model (pipeline/cache/compute.py); else a by-product of another kind
    chunk: Callable[[Config], int] = lambda cfg: cfg.cache.batch_size  # entries per batch (the unit of work)
    # computed by the denoiser in the train dtype (and model.quantize): one set of entries per dtype and
    # quantization, side by side; the denoiser runs on the device type training uses (pipeline.settings.prior_device)
    per_dtype: bool = False

    def store_kind(self, plan: Plan) -> str:
        return f"{self.name}/{plan.numerics_label}" if self.per_dtype else self.name


def _prior_jobs(plan: Plan, keep_unused: bool) -> dict:
    # with prior_mode = "online" training computes the prior targets itself: none to cache, but prune
    # keeps what is there (keep_unused), since switching back to "cached" must not cost a recompute
    if plan.cfg.train.prior_mode != "cached" and not keep_unused:
        return {}
    return {plan.prior_key(s, v): (s, v) for s, v in plan.cached_draws() if s.prior}


KINDS: tuple[Kind, ...] = (
    Kind("latent", "latents", lambda plan, keep: plan.latent_jobs(), ("latents_encoded", "latents_reused"), "img",
         computed=True),
    # what the latent phase found undecodable, by content: kept as long as the image is in the config
    Kind(BAD_IMAGE, "verdicts on undecodable images", lambda plan, keep: dict.fromkeys(plan.bad)),
    Kind("text", "text embeddings", lambda plan, keep: plan.text_jobs(), ("texts_encoded", "texts_reused"), "caption",
         computed=True),
    Kind("noise", "noise seeds and timesteps", lambda plan, keep: plan.noise_jobs(), ("noise_computed", "noise_reused"),
         "draw", chunk=lambda cfg: 256, computed=True),
    Kind("prior", "priors", _prior_jobs, ("priors_computed", "priors_reused"), "pred", per_dtype=True, computed=True),
)
COMPUTED = tuple(k for k in KINDS if k.computed)


def needed_keys(plan: Plan, keep_unused: bool = False) -> dict[str, set[str]]:
    """store kind -> the keys this config uses (with keep_unused: also what it keeps without using)."""
    return {k.store_kind(plan): set(k.jobs(plan, keep_unused)) for k in KINDS}


def computed(summary: dict) -> int:
    """Entries a cache run computed, from its summary."""
    return sum(summary[k.counts[0]] for k in COMPUTED)


def in_words(summary: dict) -> str:
    """What a cache run computed and what it reused, from its summary, as a sentence for people (the title
    of the printed table; the JSON line keeps the counts)."""
    counts = []  # (what it is called, computed, total)
    for k in COMPUTED:
        n, total = summary[k.counts[0]], summary[k.counts[0]] + summary[k.counts[1]]
        if total:
            counts.append((f"{k.label} for {numerics_words(summary['dtype'], summary.get('quantize', 'none'))}"
                           if k.per_dtype else k.label, n, total))
    done = [(name, n, total) for name, n, total in counts if n]
    if not done:
        return "nothing to compute, everything is cached"
    part = lambda name, n, total: f"{n} {name}" if n == total else f"{n} of {total} {name}"  # noqa: E731
    if len(done) == len(counts) and all(n == total for _, n, total in done):
        return f"done: everything was computed ({', '.join(part(*c) for c in done)})"
    if len(done) == 1:
        name, n, total = done[0]
        return f"done: only {name} were computed ({n if n == total else f'{n} of {total}'}); everything else was reused"
    return f"done: computed {', '.join(part(*c) for c in done)}; everything else was reused"


def numerics_words(dtype: str, scheme: str) -> str:
    """"bf16", or "bf16 with model.quantize = int8": what a set of priors was computed in, for messages."""
    return dtype if scheme == "none" else f"{dtype} with model.quantize = {scheme}"


def why_priors_missing(plan: Plan, store: Store, sample: int = 16) -> str:
    """What differs between the numerics this config needs and those of the cached priors it cannot use
    (their `numerics` attribute: scheme, device type, library versions), read from a few of them: "" when
    nothing differs (the priors are missing for other reasons: new images, another model)."""
    kind, needed = plan.prior_kind(), set(_prior_jobs(plan, False))
    now = quantize.describe(plan.numerics)
    found = []
    for key in sorted(store.keys(kind) - needed)[:sample]:
        recorded = store.attrs(kind, key).get("numerics")
        what = (quantize.differences(json.loads(recorded), now) if recorded is not None
                else "their numerics are not recorded (cached by an earlier version of this program)")
        if what and what not in found:
            found.append(what)
    return f"the cached {kind} entries were computed with other numerics: {'; '.join(found)}" if found else ""


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-flux.toml"  # the Makefile's default


def fix_command(cfg: Config, dtype: str | None = None) -> str:
    """The command that caches what this config lacks, as the user runs commands: make's under make, else
    the plain CLI's."""
    source = Path(cfg.source)
    shown = source.relative_to(Path.cwd()) if source.is_relative_to(Path.cwd()) else source
    if via_make():
        return "make cache" + ("" if source == DEFAULT_CONFIG else f" CONFIG={shown}") + (f" DTYPE={dtype}" if dtype else "")
    return f"python -m pipeline cache --config {shown}" + (f" --dtype {dtype}" if dtype else "")


def check_complete(plan: Plan, store: Store) -> None:
    """Refuse, with the command that fixes it, unless every entry a training run reads is present."""
    cfg = plan.cfg
    missing = {k: sum(not store.has(k.store_kind(plan), key) for key in k.jobs(plan, False)) for k in COMPUTED}
    parts = [f"{k.label} ({n} missing)" for k, n in missing.items() if n and not k.per_dtype]
    if parts and store.unreadable:
        raise UserError(
            f"cache file '{store.unreadable[0]}' cannot be read ({len(store.unreadable)} such files; damaged or not "
            f"ours) and the cache lacks {', '.join(parts)}: delete the file(s), then run {fix_command(cfg)}"
        )
    if parts:
        raise UserError(f"the cache lacks {', '.join(parts)} for this config: run {fix_command(cfg)}")
    for k, n in missing.items():
        if n and k.per_dtype:
            why = why_priors_missing(plan, store)
            raise UserError(
                f"{k.label} for {numerics_words(plan.dtype, plan.quantize)} are not cached ({n} of "
                f"{len(k.jobs(plan, False))} missing for this model and data{'; ' + why if why else ''}): "
                f"run {fix_command(cfg, plan.dtype)}"
            )
