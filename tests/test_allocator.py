"""glibc keeps a batch's freed memory for the next one: page faults counted, not timed.

Each case runs in its own interpreter: the thresholds are process-wide and the first setting
stands. A block above glibc's largest automatic mmap threshold (32 MiB) is allocated, touched
and freed again and again; with the defaults every round faults its pages in afresh, with
``keep_freed_memory`` the later rounds reuse the heap.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
BLOCK_MB, ROUNDS = 64, 6
PAGES = BLOCK_MB * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")

ROUNDS_SCRIPT = f"""
import ctypes, json, resource, sys
from pipeline.model import allocator
kept = allocator.keep_freed_memory(int(sys.argv[1]))
again = allocator.keep_freed_memory(int(sys.argv[1]) + 1)  # a second value does not stand
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = {BLOCK_MB} * 1024 * 1024
faults = []
for _ in range({ROUNDS}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"kept": kept, "again": again, "faults": faults}}))
"""


def rounds(mb: int) -> dict:
    done = subprocess.run([sys.executable, "-c", ROUNDS_SCRIPT, str(mb)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


@glibc
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    default, kept = rounds(0), rounds(256)
    assert default["kept"] is False and kept["kept"] is True
    assert default["again"] is False and kept["again"] is False
    # glibc's defaults: every round maps, touches and unmaps the whole block
    assert all(f >= 0.9 * PAGES for f in default["faults"][1:]), default["faults"]
    # kept: the first round faults the heap in once, the later ones reuse it
    assert kept["faults"][0] >= 0.9 * PAGES
    assert sum(kept["faults"][1:]) < 0.02 * PAGES * (ROUNDS - 1), kept["faults"]


HANDLER_SCRIPT = """
import io, json, os, resource, sys
from PIL import Image
from pipeline.config import Settings
from pipeline.model.handler import TorchModelHandler
keep = int(sys.argv[1]) if sys.argv[1:] else Settings().malloc_keep_mb  # none: the default
handler = TorchModelHandler(Settings(model="efficientnet_lite0", torch_threads=1, malloc_keep_mb=keep))
buf = io.BytesIO()
Image.new("RGB", (320, 240), (120, 30, 200)).save(buf, "JPEG")
batch = [buf.getvalue()] * 16
for _ in range(2):  # loads the model, sets the thresholds, grows the heap to a batch's peak
    handler.run_inference(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    handler.run_inference(batch)
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@glibc
@pytest.mark.process
def test_the_model_handler_keeps_its_batches_memory() -> None:
    """The handler sets the thresholds when it loads its model (Settings.malloc_keep_mb, whose
    default is what the second process runs with)."""
    def faults(*mb: str) -> int:
        done = subprocess.run([sys.executable, "-c", HANDLER_SCRIPT, *mb], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])["faults"]

    default, kept = faults("0"), faults()
    print(f"\nminor faults over 3 batches of 16: glibc defaults {default}, kept {kept}")
    assert default > 10_000  # tens of MB of activations faulted in per batch
    assert kept < default / 20
