"""`make memory-table`: the README's "Memory and quantization" table from the planner (pipeline/memory.py)
for the public full-size configs at 1024 px, batch 1, LoRA rank 16 on attention, AdamW, bf16, with
gradient checkpointing (without it, activations alone are tens of GiB for Flux and HiDream)."""

from __future__ import annotations

import click

from pipeline.config import LoraConfig
from pipeline.memory import GiB, Settings, estimate
from pipeline.public_configs import DENOISERS, ENCODERS, VAES, public_family

# (quantize, blocks_to_swap, processes training is sharded across with train.fsdp; 1: not sharded)
ROWS = {"flux": [("none", 0, 1), ("none", 30, 1), ("none", 50, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1)],
        "sdxl": [("none", 0, 1), ("int8", 0, 1), ("nf4", 0, 1)],
        "hidream": [("none", 0, 1), ("none", 24, 1), ("none", 40, 1), ("int8", 0, 1), ("fp8", 0, 1), ("nf4", 0, 1),
                    ("none", 24, 4), ("none", 24, 8)]}


@click.command()
def main():
    click.echo("| family | quantize | blocks_to_swap | train.fsdp | cache stage (GiB) | training (GiB) | fits 24 GB | "
               "fits 16 GB |")
    click.echo("|---|---|---|---|---|---|---|---|")
    for name, rows in ROWS.items():
        family = public_family(name)
        for quantize, swap, processes in rows:
            e = estimate(family, DENOISERS[name], LoraConfig(), Settings(
                quantize=quantize, blocks_to_swap=swap, gradient_checkpointing=True, encoder_dtype="bf16",
                fsdp_processes=processes), ENCODERS[name], VAES[name])
            peak = max(e.cache_peak, e.train_peak)
            fits = lambda gb: "yes" if peak <= gb * 1e9 else "no"  # noqa: E731 - cards are sold in 10^9 bytes
            sharded = f"{processes} GPUs" if processes > 1 else "-"
            click.echo(f"| {name} | {quantize} | {swap} | {sharded} | {e.cache_peak / GiB:.1f} | {e.train_peak / GiB:.1f} | "
                       f"{fits(24)} | {fits(16)} |")


if __name__ == "__main__":
    main()
