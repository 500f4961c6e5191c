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
    except KeyboardInterrupt:
        click.echo(f"interrupted: {interrupted}", err=True)
        sys.exit(130)


def _print_summary(title: str, summary: dict) -> None:
    click.echo(f"\n{title}")
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        click.echo(f"  {k:<{width}}  {v}")


@click.group()
def main():
    """LoRA trainer with cached prior-prediction targets: `cache`, then `train`."""


@main.command()
@CONFIG
@DTYPE
@QUIET
def cache(config_path, dtype, quiet):
    """Compute every cache entry the config needs that is not cached yet (latents, text embeddings,
    noise seeds and timesteps, and the base model's predictions for prior samples in the train dtype)."""
    def go():
        cfg = load_config(config_path, dtype)
        from pipeline.cache_stage import run_cache

        _quiet_libraries()

        s = run_cache(cfg, progress=not quiet)
        work = s["latents_encoded"] + s["texts_encoded"] + s["noise_computed"] + s["priors_computed"]
        _print_summary("cache: nothing to compute, everything is cached" if not work else "cache: done", s)
        click.echo(json.dumps({"cache_summary": s}))

    _run(go, "every finished cache segment is kept; run the same command again to compute the rest")


@main.command()
@CONFIG
@DTYPE
@QUIET
def train(config_path, dtype, quiet):
    """Train a LoRA on the cache (one denoiser forward per batch). Refuses when the cache lacks
    anything this run needs, naming the command that fixes it."""
    def go():
        cfg = load_config(config_path, dtype)
        from pipeline.train_stage import run_train

        _quiet_libraries()

        s = run_train(cfg, progress=not quiet)
        _print_summary("train: done", s)
        click.echo(json.dumps({"train_summary": s}))

    _run(go, "no LoRA was written (the cache is untouched); run the same command again to train")


if __name__ == "__main__":
    main()
