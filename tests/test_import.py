"""Importing jinterp changes nothing outside it, and no public name shadows a module.

``jinterp.reuse_freed_memory()`` is an explicit call: on glibc, large blocks then come from the reused
arena, not from fresh ``mmap``s that are returned to the kernel on free (so a repeated forward does not
fault its output pages in again; the time that saves is in benchmarks/forward_and_capture.py), up to
a threshold beyond which blocks are mmap'd again (so that huge ones cannot fragment the arena)."""

import os
import platform
import subprocess
import sys

import pytest

# How many bytes glibc holds in mmap'd blocks (mallinfo2's hblkhd) while an array of argv[2] bytes is alive.
PROGRAM = """
import ctypes
import sys
import jinterp
import numpy as np

if sys.argv[1] == "reuse":
    assert jinterp.reuse_freed_memory()


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = np.ones(int(sys.argv[2]), np.uint8)
print(libc.mallinfo2().hblkhd)
"""


def mmapped_bytes(how: str, size: int) -> int:
    result = subprocess.run([sys.executable, "-c", PROGRAM, how, str(size)], capture_output=True, text=True,
                            check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="jinterp tunes glibc's malloc only (Linux); other platforms are left as they are")
def test_large_blocks_come_from_the_reused_arena_once_asked_for():
    from jinterp._allocator import MMAP_THRESHOLD

    block = MMAP_THRESHOLD // 2
    assert mmapped_bytes("reuse", block) < block
    assert mmapped_bytes("import only", block) >= block  # glibc's default: a fresh mmap, unmapped on free
    assert mmapped_bytes("reuse", 2 * MMAP_THRESHOLD) >= 2 * MMAP_THRESHOLD  # beyond the threshold: mmap'd


def test_import_changes_nothing_outside_jinterp():
    program = "import os; before = os.environ.get('XLA_FLAGS'); import jinterp; print(os.environ.get('XLA_FLAGS'))"
    for flags in (None, "--xla_cpu_use_thunk_runtime=true"):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": flags} if flags else {})
        out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.strip() == str(flags)


def test_no_public_name_shadows_a_module():
    """jinterp.models is the subpackage (the model list is jinterp.named_models); every public name
    that is also a submodule's name is that submodule."""
    import importlib
    import pkgutil

    import jinterp

    modules = {info.name for info in pkgutil.iter_modules(jinterp.__path__)}
    for name in jinterp.__all__:
        if name in modules:
            assert getattr(jinterp, name) is importlib.import_module(f"jinterp.{name}"), name
    assert jinterp.models.Transformer is jinterp.Transformer
