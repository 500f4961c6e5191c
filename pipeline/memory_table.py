"""`make memory-table`: the README's "Memory and quantization" table from the planner (pipeline/memory.py)
for the public full-size configs at 1024 px, batch 1, LoRA rank 16 on attention, AdamW, bf16, with
gradient checkpointing (without it, activations alone are tens of GiB for Flux and HiDream)."""

from __future__ import annotations

import click

from pipeline.config import LoraConfig
from pipeline.memory import GiB, Settings, estimate
from pipeline.public_configs import DENOISERS, ENCODERS, VAES, public_family

ROWS = {"flux": [("none", 0), ("none", 30), ("none", 50), ("int8", 0), ("fp8", 0), ("nf4", 0)],
        "sdxl": [("none", 0), ("int8", 0), ("nf4", 0)],
        "hidream": [("none", 0), ("none", 24), ("none", 40), ("int8", 0), ("fp8", 0), ("nf4", 0)]}


@click.command()
def main():
    click.echo("| family | quantize | blocks_to_swap | cache stage (GiB) | training (GiB) | fits 24 GB | fits 16 GB |")
    click.echo("|---|---|---|---|---|---|---|")
    for name, rows in ROWS.items():
        family = public_family(name)
        for quantize, swap in rows:
            e = estimate(family, DENOISERS[name], LoraConfig(), Settings(
                quantize=quantize, blocks_to_swap=swap, gradient_checkpointing=True, encoder_dtype="bf16"),
                ENCODERS[name], VAES[name])
            peak = max(e.cache_peak, e.train_peak)
            fits = lambda gb: "yes" if peak <= gb * 1e9 else "no"  # noqa: E731 - cards are sold in 10^9 bytes
            click.echo(f"| {name} | {quantize} | {swap} | {e.cache_peak / GiB:.1f} | {e.train_peak / GiB:.1f} | "
                       f"{fits(24)} | {fits(16)} |")


if __name__ == "__main__":
    main()
