"""convforge.allocator: glibc keeps large freed blocks in its heap once a training process asks it to."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# In a fresh interpreter: allocate and free a 64 MiB tensor and say where glibc put it (mallinfo2: bytes in
# mmapped blocks, and whether the heap kept the freed block).
PROBE = """
import ctypes, sys, torch
from convforge.allocator import keep_freed_blocks

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_blocks()
assert keep_freed_blocks() == applied  # once per process, same answer
block = torch.empty(64 << 20, dtype=torch.uint8)
mmapped = libc.mallinfo2().hblkhd
del block
print(applied, mmapped >= 64 << 20, libc.mallinfo2().fordblks >= 64 << 20)
"""


def _probe(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    return out.stdout.split()


@glibc_only
def test_raised_thresholds_keep_a_large_freed_block_in_the_heap():
    applied, mmapped, kept_free = _probe()
    assert applied == "True"
    assert mmapped == "False" and kept_free == "True"  # allocated from the heap, kept there once freed


@glibc_only
def test_opting_out_leaves_glibc_defaults():
    applied, mmapped, kept_free = _probe(CONVFORGE_SYSTEM_MALLOC="1")
    assert applied == "False"
    assert mmapped == "True" and kept_free == "False"  # glibc's default: a 64 MiB block is mmapped and unmapped
