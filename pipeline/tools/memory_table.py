"""`make memory-table`: the table of docs/memory.md from the planner (pipeline/memory.py)
for each family's public full-size configs and table rows (its planning capability, and its variants':
another public size gets rows of its own) at 1024 px, batch 1,
LoRA rank 16 on attention, AdamW, bf16, with gradient checkpointing (without it, activations alone are
tens of GiB for the large transformers). A row's fourth field, where it has one, is the cache stage's text
encoders: model.text_encoder_quantize, or "offload" (model.text_encoder_offload); else "none"."""

from __future__ import annotations

import click

from pipeline.config import LoraConfig
from pipeline.families import FAMILIES, family_class
from pipeline.memory import GiB, Settings, estimate
from pipeline.tools.public_configs import ENCODERS, encoder_params, public_family


@click.command()
def main():
    click.echo("| family | quantize | text encoders | blocks_to_swap | train.fsdp | cache stage (GiB) | training (GiB) | "
               "fits 48 GB | fits 24 GB | fits 16 GB |")
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for name in FAMILIES:
        planning = family_class(name).planning
        if planning is None:  # no public configs to plan
            continue
        rows(name, planning)
        for variant in planning.variants:  # another public size of the family: rows of its own
            rows(name, variant, variant)
    click.echo("\nFull fine-tuning (train.method = \"full\", all weights, bf16 weights, gradient checkpointing, 1024 px, "
               "batch 1):\n")
    click.echo("| family | optimizer | weights update | fused backward | training (GiB) | fits 24 GB | fits 48 GB | "
               "fits 80 GB |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for name in FAMILIES:
        planning = family_class(name).planning
        if planning is not None:
            for variant in [None, *planning.variants]:
                full_rows(name, planning if variant is None else variant, variant)

    click.echo("\nFull fine-tuning sharded (train.fsdp under a launcher: AdamW, fp32 master weights; one GPU's "
               "share):\n")
    click.echo("| family | GPUs | training per GPU (GiB) | fits 24 GB | fits 48 GB | fits 80 GB |")
    click.echo("|---|---|---|---|---|---|")
    for name in FAMILIES:
        planning = family_class(name).planning
        if planning is not None:
            for variant in [None, *planning.variants]:
                sharded_full_rows(name, planning if variant is None else variant, variant)


# (optimizer, master weights, fused backward): the cheapest first, then what the memory buys
FULL_ROWS = (("adafactor", False, True), ("adamw8bit", False, True), ("adamw", False, True), ("adamw", True, False))


def full_rows(name: str, planning, variant=None) -> None:
    """The full fine-tuning rows of one public model (training only: its cache stage is a LoRA run's)."""
    family = public_family(name, variant)
    shown = f"{name} (full)" if variant is None else f"{name} ({variant.label}, full)"
    for optimizer, master, fused in FULL_ROWS:
        e = estimate(family, dict(planning.denoiser_config), LoraConfig(), Settings(
            gradient_checkpointing=True, optimizer=optimizer, method="full", master_weights=master,
            fused_backward=fused))
        fits = lambda gb: "yes" if e.train_peak <= gb * 1e9 else "no"  # noqa: E731
        update = "fp32 master" if master else "stochastic rounding"
        click.echo(f"| {shown} | {optimizer} | {update} | {'yes' if fused else 'no'} | {e.train_peak / GiB:.1f} | "
                   f"{fits(24)} | {fits(48)} | {fits(80)} |")


def sharded_full_rows(name: str, planning, variant=None) -> None:
    """Full fine-tuning sharded across 4 and 8 GPUs (what train.fsdp takes for it: AdamW, and with bf16
    weights fp32 master copies; no fused backward), for the families that shard (those with blocks)."""
    family = public_family(name, variant)
    if not family.swap_blocks:
        return
    shown = f"{name} (full)" if variant is None else f"{name} ({variant.label}, full)"
    for processes in (4, 8):
        e = estimate(family, dict(planning.denoiser_config), LoraConfig(), Settings(
            gradient_checkpointing=True, optimizer="adamw", method="full", master_weights=True,
            fsdp_processes=processes))
        fits = lambda gb: "yes" if e.train_peak <= gb * 1e9 else "no"  # noqa: E731
        click.echo(f"| {shown} | {processes} | {e.train_peak / GiB:.1f} | {fits(24)} | {fits(48)} | {fits(80)} |")


def rows(name: str, planning, variant=None) -> None:
    """The table's rows of one public model of the family `name`: its own, or `variant` (one of its planning
    variants, named after its label in the family column)."""
    family = public_family(name, variant)
    encoders = ENCODERS[name] if variant is None else encoder_params(name, variant)
    shown = name if variant is None else f"{name} ({variant.label})"
    for quantize, swap, processes, *text in planning.table_rows:
        text = text[0] if text else "none"
        e = estimate(family, dict(planning.denoiser_config), LoraConfig(), Settings(
            quantize=quantize, blocks_to_swap=swap, gradient_checkpointing=True, encoder_dtype="bf16",
            fsdp_processes=processes, text_encoder_quantize="none" if text == "offload" else text,
            text_encoder_offload=text == "offload"), encoders, dict(planning.vae_config))
        peak = max(e.cache_peak, e.train_peak)
        fits = lambda gb: "yes" if peak <= gb * 1e9 else "no"  # noqa: E731 - cards are sold in 10^9 bytes
        sharded = f"{processes} GPUs" if processes > 1 else "-"
        click.echo(f"| {shown} | {quantize} | {text} | {swap} | {sharded} | {e.cache_peak / GiB:.1f} | "
                   f"{e.train_peak / GiB:.1f} | {fits(48)} | {fits(24)} | {fits(16)} |")


if __name__ == "__main__":
    main()
