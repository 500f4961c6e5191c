"""An image file with a valid header and a huge tail is never read whole: the plan hashes it as it streams
and the decoder reads what it needs, so the peak memory of planning and decoding it stays that of a plain
image (before, the whole file was read into memory to hash it: 6.7 GB for a 6 GB tail)."""

import subprocess
import sys

import pytest

TAIL = 768 * 2**20  # bytes after the PNG's end; sparse on disk, but a whole read puts them all in memory

PROBE = """
import resource, sys
from pipeline.config import load_config
from pipeline.data.images import prepare_image
from pipeline.data.plan import make_plan

plan = make_plan(load_config(sys.argv[1]))
image = next(s for s in plan.samples if s.path.name == "000.png" and s.concept == 0)
prepare_image(image.path, image.bucket)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
"""


def _peak(path) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_an_image_with_a_huge_tail_is_not_read_whole(project):
    path, _ = project()
    plain = _peak(path)
    image = project.root / "data" / "standard" / "000.png"
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size + TAIL)  # a valid PNG, then 768 MiB of zeros after its end
    tailed = _peak(path)
    assert tailed - plain < TAIL // 8, (plain, tailed)
