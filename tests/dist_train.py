"""Run by test_dist.py under torchrun: `python -m pipeline train` as a function, then this rank's LoRA as it
holds it in memory (train.method = "full": its trained weights) is written to <dir>/rank-<r>.safetensors, so that the test can compare the ranks. Ranks
other than 0 get their own train.output_dir, which must stay absent: they write nothing. Rank 0 writes the
step its run resumed from to <dir>/resumed_from_step.

usage: dist_train.py CONFIG DIR [--resume] [--skew]   (--skew: rank 1 gets another learning rate)"""

import dataclasses
import os
import sys
from pathlib import Path

from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.train.stage import train_lora

config, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
cfg = load_config(config)
if rank:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(out / f"output-of-rank-{rank}")))
if rank and "--skew" in sys.argv:
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=cfg.optimizer.lr * 2))
try:
    model, summary = train_lora(cfg, progress=False, resume="--resume" in sys.argv)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
# under FSDP (train.fsdp) a rank holds its shard of each tensor: that is what it writes
weights = {k: (v.to_local() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
           for k, v in (get_peft_model_state_dict(model) if cfg.train.method == "lora" else
                        {n: p for n, p in model.named_parameters() if p.requires_grad}).items()}
save_file(weights, str(out / f"rank-{rank}.safetensors"))
if not rank:  # where the run went on from (--resume)
    (out / "resumed_from_step").write_text(str(summary.get("resumed_from_step")))
