"""Command line: parses options and calls one stage function. Exit codes: 0 done, 1 internal failure,
2 user error (bad config, missing file, stale cache), 130 interrupted."""

from __future__ import annotations

import json
import os
import sys

import click

# The libraries' info/warning chatter (e.g. "requires torchvision") would bury the one-line messages.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pipeline.config import DTYPES, load_config
from pipeline.errors import UserError

CONFIG = click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="TOML config file."
)
DTYPE = click.option(
    "--dtype", type=click.Choice(DTYPES), default=None,
    help="Train dtype for this command only (overrides train.dtype); priors are cached per dtype.",
)
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")


def _quiet_libraries() -> None:
    # The stages draw one bar per phase; the libraries' per-component loading bars are noise.
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _run(fn, interrupted: str):
    try:
        return fn()
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as e:
        click.echo(f"interrupted: {getattr(e, 'message', None) or interrupted}", err=True)
        sys.exit(130)


def _is_main() -> bool:
    from pipeline.processes import launched_rank

    return launched_rank() == 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _human(key: str, value) -> str:
    """A summary value as a person reads it; the JSON line after the table keeps the exact values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and "bytes" in key:
        return _size(value)
    if key == "seconds":
        return f"{value} s"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_human(k, v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(_human(key, v) for v in value) or "-"
    return str(value)


def _print_summary(title: str, summary: dict) -> None:
    click.echo(f"\n{title}")
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        # a list of paths or reasons (skipped images, unreadable files): one per line, each in full
        lines = [_human(k, x) for x in v] if isinstance(v, list) and len(v) > 1 else [_human(k, v)]
        click.echo(f"  {k:<{width}}  {lines[0]}")
        for line in lines[1:]:
            click.echo(f"  {'':<{width}}  {line}")


@click.group()
def main():
    """LoRA trainer with cached prior-prediction targets: `cache`, then `train`."""


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False), help="TOML config file.")
@DTYPE
@QUIET
@click.pass_context
def cache(ctx, config_path, dtype, quiet):
    """Compute every cache entry the config needs that is not cached yet (latents, text embeddings,
    noise seeds and timesteps, and the base model's predictions for prior samples in the train dtype).
    The subcommands inspect (status), check (verify) and trim (prune) the cache instead."""
    if ctx.invoked_subcommand is not None:
        return  # a group runs before its subcommand; `cache --config F status` lends it F (see _config)
    if config_path is None:
        raise click.UsageError("Missing option '--config'.", ctx)

    def go():
        cfg = load_config(config_path, dtype)
        from pipeline.data.kinds import in_words
        from pipeline.cache.stage import run_cache

        _quiet_libraries()

        s = run_cache(cfg, progress=not quiet)
        if _is_main():  # under a launcher every rank returns the summary; one prints it
            _print_summary(f"cache: {in_words(s)}", s)
            click.echo(json.dumps({"cache_summary": s}))

    _run(go, "every finished cache segment is kept; run the same command again to compute the rest")


# The subcommands take --config/--dtype themselves; given to `cache` instead, they are used from there.
SUB_CONFIG = click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                          help="TOML config file.")


def _config(ctx, config_path, dtype):
    parent = ctx.parent.params
    config_path, dtype = config_path or parent.get("config_path"), dtype or parent.get("dtype")
    if config_path is None:
        raise click.UsageError("Missing option '--config'.", ctx)
    return config_path, dtype, load_config(config_path, dtype)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


@cache.command("status")
@SUB_CONFIG
@DTYPE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.pass_context
def cache_status(ctx, config_path, dtype, as_json):
    """Per kind of entry: how many this config needs, has, lacks, and stores without using."""
    def go():
        from pipeline.cache.maintenance import status

        s = status(_config(ctx, config_path, dtype)[2])
        if as_json:
            click.echo(json.dumps(s))
            return
        quantized = f", model.quantize = {s['quantize']}" if s["quantize"] != "none" else ""
        click.echo(f"cache {s['cache_dir']} for train dtype {s['dtype']}{quantized}")
        w = max(12, *(len(kind) + 1 for kind in s["kinds"]))  # "prior/bf16-int8" is wider than the rest
        # "others": entries other configs of this cache dir use; "stale": entries no config uses (prune's)
        click.echo(f"  {'kind':<{w}}{'needed':>8}{'present':>9}{'missing':>9}{'others':>8}{'stale':>8}{'MiB':>9}")
        for kind, k in s["kinds"].items():
            click.echo(f"  {kind:<{w}}{k['needed']:>8}{k['present']:>9}{k['missing']:>9}{k['other_configs']:>8}"
                       f"{k['stale']:>8}{_mib(k['bytes']):>9}")
        click.echo(f"  priors cached for: {', '.join(s['dtypes_with_priors']) or 'no dtype'}")
        if s["priors_missing"]:
            click.echo(f"  {s['priors_missing']}")
        click.echo(f"  unreadable segment files: {len(s['unreadable_segments'])}")
        click.echo(f"  total: {_mib(s['total_bytes'])} MiB")

    _run(go, "nothing was changed")


@cache.command("verify")
@SUB_CONFIG
@DTYPE
@click.option("--repair", is_flag=True, help="Drop damaged entries and recompute them.")
@click.option("--rehash", is_flag=True, help="First hash the model's weight files again from their contents (after "
              "weights were rewritten in place), then verify.")
@click.pass_context
def cache_verify(ctx, config_path, dtype, repair, rehash):
    """Re-hash every entry this config uses against its stored sha256, and check it is this config's (shapes,
    dtypes); exit 2 if any is damaged."""
    def go():
        from pipeline.cache.maintenance import rehash as rehash_model, verify
        from pipeline.data.kinds import fix_command

        path, dt, cfg = _config(ctx, config_path, dtype)
        if repair:
            _quiet_libraries()
        if rehash:
            r = rehash_model(cfg)
            changed = ", ".join(r["changed"])
            click.echo(f"rehash: {r['files_rehashed']} model files hashed from their contents; "
                       + (f"changed: {changed} (their entries are now missing: {fix_command(cfg, dt)} recomputes them)"
                          if changed else "no fingerprint changed"))
        v = verify(cfg, repair=repair)
        for d in v["damaged"]:
            click.echo(f"damaged: {d['kind']} {d['key']} in {d['segment']}: {d['reason']}")
        for p in v["unreadable_segments"]:
            click.echo(f"unreadable segment file: {p}")
        click.echo(f"verify: {v['checked']} entries checked, {len(v['damaged'])} damaged, "
                   f"{len(v['unreadable_segments'])} unreadable segment files, {v['missing']} not cached")
        if repair:
            click.echo(f"repair: {v['repaired']} entries recomputed")
        elif v["damaged"] or v["unreadable_segments"]:
            fix = f"python -m pipeline cache verify --config {path}{f' --dtype {dt}' if dt else ''} --repair"
            click.echo(f"error: the cache is damaged: run {fix}", err=True)
            sys.exit(2)

    _run(go, "damaged entries not yet recomputed are simply missing; run the same command again")


@cache.command("prune")
@SUB_CONFIG
@DTYPE
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--keep-dtypes", is_flag=True, help="Keep the priors of other train dtypes and model.quantize schemes.")
@click.option("--all-configs", is_flag=True,
              help="Also remove entries that other configs caching into this cache dir use (else refused).")
@click.pass_context
def cache_prune(ctx, config_path, dtype, dry_run, keep_dtypes, all_configs):
    """Remove every cache entry this config does not use (and unreadable segment files). Entries that other
    configs sharing the cache dir use are removed only with --all-configs."""
    def go():
        from pipeline.cache.maintenance import prune
        from pipeline.data.kinds import fix_command

        cfg = _config(ctx, config_path, dtype)[2]
        p = prune(cfg, dry_run=dry_run, keep_dtypes=keep_dtypes, all_configs=all_configs)
        click.echo("prune: would remove (dry run, nothing changed)" if dry_run else "prune: removed")
        for kind, n in p["entries_removed"].items():
            click.echo(f"  {kind:<12}{n:>8} entries")
        for source, counts in p["other_configs"].items():
            use = "use" if dry_run else "used"
            click.echo(f"  of which {source} {use}: {', '.join(f'{k} {n}' for k, n in counts.items())}")
        if p["unreadable_removed"]:
            click.echo(f"  {len(p['unreadable_removed'])} unreadable segment files")
        freed = "would free about" if dry_run else "freed"
        click.echo(f"prune: {freed} {_mib(p['bytes_freed'])} MiB ({p['bytes_freed']} bytes)")
        if p["lost"]:
            click.echo(f"prune: {len(p['lost'])} kept entries were unreadable and are gone: run {fix_command(cfg)}",
                       err=True)

    _run(go, "every segment is complete and every used entry is kept; run the same command again")


@main.command()
@CONFIG
@DTYPE
@QUIET
@click.option("--resume", is_flag=True,
              help="Go on from the newest intact checkpoint in train.output_dir/checkpoints, or refuse.")
@click.option("--restart", is_flag=True,
              help="Start over at step 0 even where train.output_dir holds a run to go on with (that run is "
                   "moved to train.output_dir/previous/).")
@click.option("--overwrite", is_flag=True, hidden=True, help="The former name of --restart.")
def train(config_path, dtype, quiet, resume, restart, overwrite):
    """Train a LoRA on the cache (one denoiser forward per batch). A run of the same settings in
    train.output_dir goes on from its newest checkpoint (nothing to do when it is complete); another run
    there is moved to train.output_dir/previous/. Refuses when the cache lacks anything this run needs,
    naming the command that fixes it."""
    def go():
        cfg = load_config(config_path, dtype)
        from pipeline.train.stage import run_train

        _quiet_libraries()

        s = run_train(cfg, progress=not quiet, resume=resume, restart=restart or overwrite)
        if _is_main():
            _print_summary("train: complete already, nothing done" if s.get("complete_already") else "train: done", s)
            click.echo(json.dumps({"train_summary": s}))

    _run(go, "no LoRA was written; the cache is untouched and checkpoints, if any, are kept (training again with "
             "the same settings goes on from the newest)")


@main.command()
@CONFIG
@click.option("--lora", default=None, type=click.Path(dir_okay=False),
              help="LoRA file (default: the config's train.output_dir/train.lora_name).")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable; default: validation.prompts).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG to write (default: beside the LoRA).")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: validation.steps).")
@click.option("--seed", type=int, default=None, help="Noise seed (default: validation.seed).")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="Image width in pixels (default: validation.width, else data.resolution).")
@click.option("--height", type=click.IntRange(min=1), default=None,
              help="Image height in pixels (default: validation.height, else data.resolution).")
@click.option("--guidance", type=float, default=None,
              help="The pipeline's guidance_scale (default: validation.guidance_scale).")
def sample(config_path, lora, prompts, out, steps, seed, width, height, guidance):
    """Render prompts with the base model and a LoRA through the family's diffusers pipeline, to a PNG grid
    whose images are labelled with their prompt."""

    def go():
        cfg = load_config(config_path)
        from pipeline.sample import sample as run_sample

        _quiet_libraries()
        path = run_sample(cfg, lora, list(prompts), out, steps, seed, width=width, height=height, guidance=guidance)
        click.echo(f"sample: wrote {path}")

    _run(go, "nothing was written")


@main.command("plan-memory")
@CONFIG
@DTYPE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many processes a launcher starts: with train.fsdp, training's figure is one GPU's share.")
def plan_memory(config_path, dtype, as_json, processes):
    """Estimate the peak GPU memory of the cache stage and of training for the config (nothing is loaded:
    the denoiser is built on the meta device from its config; see pipeline/memory.py)."""

    def go():
        from pipeline.memory import plan_memory as estimate, table

        cfg = load_config(config_path, dtype)
        e = estimate(cfg, shards=processes if cfg.train.fsdp else 1)
        if as_json:
            click.echo(json.dumps({"train_peak": e.train_peak, "cache_peak": e.cache_peak, "cache_phase": e.cache_phase,
                                   "parts": e.parts, "cache_parts": e.cache_parts,
                                   "working_sets": e.working_sets}))
            return
        click.echo(f"memory plan for {config_path} (GiB; {cfg.train.dtype}, quantize {cfg.model.quantize}, "
                   f"blocks_to_swap {cfg.train.blocks_to_swap}, batch {cfg.train.batch_size}, {cfg.data.resolution} px, "
                   f"gradient_checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}"
                   + (f", sharded across {processes} processes)" if cfg.train.fsdp and processes > 1 else ")"))
        for row in table(e):
            click.echo(row)

    _run(go, "nothing was changed")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="PNG to write (default RUN_DIR/loss.png).")
def plot(run_dir, out):
    """Plot a run's standard and prior loss and its learning rate from RUN_DIR/metrics.jsonl to a PNG."""

    def go():
        from pipeline.plot import plot_run

        click.echo(f"plot: wrote {plot_run(run_dir, out)}")

    _run(go, "nothing was written")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; any other than 127.0.0.1 needs the access token it prints.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=7860, show_default=True,
              help="Port (0: any free one, printed).")
@click.option("--projects", default="projects", show_default=True, type=click.Path(file_okay=False),
              help="Folder of the config files the UI lists and creates (configs/ shows the examples).")
def ui(host, port, projects):
    """A local web UI over the same config files and run folders: projects, runs, the cache."""

    def go():
        try:
            from pipeline.ui.server import serve
        except ImportError as e:
            raise UserError(f"the UI needs its extra ({e.name} is missing): pip install -e '.[ui]' (or make ui)") from None
        from pathlib import Path

        serve(host, port, Path(projects))

    _run(go, "the UI stopped; runs it started go on")


if __name__ == "__main__":
    main()
