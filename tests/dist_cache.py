"""Run by test_dist.py under torchrun: the cache stage as a function, with rank 1 given another train.dtype
when --skew is passed (as another config file on one machine would).

usage: dist_cache.py CONFIG [--skew]"""

import os
import sys

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.errors import UserError

rank = int(os.environ.get("RANK", "0"))
cfg = load_config(sys.argv[1], dtype="fp32" if rank == 1 and "--skew" in sys.argv else None)
try:
    run_cache(cfg, progress=False)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
