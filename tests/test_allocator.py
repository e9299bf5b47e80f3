"""jinterp._allocator: on glibc, large blocks come from the reused arena, not from fresh ``mmap``s that
are returned to the kernel on free (so a repeated forward does not fault its output pages in again;
the time that saves is in benchmarks/forward_and_capture.py)."""

import os
import platform
import subprocess
import sys

import pytest

# How many bytes glibc holds in mmap'd blocks (mallinfo2's hblkhd) while a 256 MiB array is alive.
PROGRAM = """
import ctypes
import jinterp
import numpy as np


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = np.ones(64 * 2 ** 20, np.float32)
print(libc.mallinfo2().hblkhd)
"""


def mmapped_bytes(**environment) -> int:
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True,
                            env={**os.environ, **environment})
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="jinterp tunes glibc's malloc only (Linux); other platforms are left as they are")
def test_large_blocks_come_from_the_reused_arena_unless_opted_out():
    block = 256 * 2 ** 20
    assert mmapped_bytes() < block
    assert mmapped_bytes(JINTERP_KEEP_MALLOC="1") >= block  # glibc's default: a fresh mmap, unmapped on free
