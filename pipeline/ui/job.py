"""The subprocess a UI run is: `python -m pipeline cache --config F`, then `train --config F`, as a user
would type them, with their output in one log. Started in its own session, it outlives the browser and
the UI; the UI stops it with SIGINT to its process group, which reaches the running stage as Ctrl-C does
(its checkpoints are kept), and no later stage starts. Its exit status goes to a JSON file beside the log.

    python -m pipeline.ui.job CONFIG RECORD   (RECORD: the job's path without suffix; .log and .status.json)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.atomic import replacing


def main(config: str, record: str) -> int:
    stopping = []
    # a handler, not SIG_IGN: an ignored SIGINT would be inherited by the stages and they could not be stopped
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    log = Path(record + ".log")
    rc, stage = 0, ""
    with open(log, "ab") as out:
        for stage in ("cache", "train"):
            if stopping:
                break
            out.write(f"$ python -m pipeline {stage} --config {config}\n".encode())
            out.flush()
            rc = subprocess.call([sys.executable, "-m", "pipeline", stage, "--config", config],
                                 stdout=out, stderr=subprocess.STDOUT)
            if rc != 0:
                break
    error = next((line for line in reversed(log.read_text(errors="replace").splitlines())
                  if line.startswith(("error: ", "interrupted: "))), "")
    with replacing(Path(record + ".status.json")) as tmp:
        tmp.write_text(json.dumps({"rc": rc, "stage": stage, "message": error, "stopped": bool(stopping)}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
