"""Run by test_dist.py under torchrun: the cache stage as a function, with rank 1 given another train.dtype
when --skew is passed (as another config file on one machine would), or with --die, rank 1 ending abruptly
in its first latent chunk (as a process the OOM killer takes does) once rank 0 waits at the phase's end
(rank 0's segment is written: torchrun would otherwise stop rank 0 before it gets there).

usage: dist_cache.py CONFIG [--skew | --die]"""

import os
import sys

from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.errors import UserError

rank = int(os.environ.get("RANK", "0"))
if rank == 1 and "--die" in sys.argv:
    import time
    from pathlib import Path

    from pipeline.cache import compute

    def die(plan, *args):
        while not any(Path(plan.cfg.cache.dir, "segments").glob("latent.*.h5")):
            time.sleep(0.1)
        time.sleep(1)  # from its segment's rename to the barrier
        os._exit(9)

    compute.COMPUTE["latent"] = (compute.COMPUTE["latent"][0], die)
cfg = load_config(sys.argv[1], dtype="fp32" if rank == 1 and "--skew" in sys.argv else None)
try:
    run_cache(cfg, progress=False)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
