"""Reused host memory on Linux: ``jinterp.reuse_freed_memory()``, an explicit, process-wide choice.

XLA:CPU takes every output and temporary buffer from glibc's malloc, which serves large blocks
(and every block of a thread other than the main one that does not fit its 64 MB heap) with a
fresh ``mmap`` and returns them to the kernel when freed. So each forward pass touches all its
output memory for the first time again: on SmolLM2-135M at 2 x 256 tokens that is ~57,000 page
faults for a plain forward and ~150,000 when every site is captured, about a tenth of the run
time. ``reuse_freed_memory()`` has malloc keep freed memory for reuse instead: one arena for all
threads, grown with ``brk`` rather than ``mmap`` for blocks under 512 MiB, trimmed only when more
than 1 GiB lies free at its top. The process then keeps memory it freed for its next allocations
instead of returning it to the system, as caching allocators do (its resident size stays near its
peak). Blocks of 512 MiB and more are still mmap'd and returned: in the one arena such blocks left
holes that the next call's did not fit, and a 2,048-token SmolLM2 forward's second call grew the
process from 2.9 to 4.7 GiB (with them mmap'd, the whole benchmark peaks at 3.4-3.6 GiB, and at 3.3
without this function; benchmarks/long_prompt.py). Smaller blocks, every block of a 2 x 256-token
run capturing every site included, are reused. It changes the whole process, so jinterp never calls
it for you: call it first thing in a script (before JAX starts its backend, whose threads then share
the one arena). Other platforms are unaffected.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's malloc.h
TRIM_THRESHOLD = 1 << 30
MMAP_THRESHOLD = 512 << 20


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep and reuse freed memory (see above); True where it applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # An arena is chosen when a thread first allocates: XLA's threads, started with the backend, get the main one.
    for option, value in ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        libc.mallopt(option, value)
    return True
