"""Loading SmolLM2-135M: jinterp converting a GGUF, jinterp from its cache, and transformers
reading the same GGUF — each in a fresh process; wall time and peak RSS.

    .venv/bin/python benchmarks/load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

# Peak RSS from VmHWM: a vforked child's ru_maxrss would carry the parent's peak across exec.
PEAK = """
import re
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
"""
JINTERP = PEAK + """
import json, time
start = time.perf_counter()
import jinterp
model, tokenizer = jinterp.load("smollm2-135m", progress=False)
print(json.dumps([time.perf_counter() - start, peak()]))
"""
TRANSFORMERS = PEAK + """
import json, os, time
os.environ["HF_HUB_OFFLINE"] = "1"
start = time.perf_counter()
import torch, transformers, jinterp
source = jinterp.loading.registry.locate(jinterp.loading.registry.MODELS["smollm2-135m"])
model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
print(json.dumps([time.perf_counter() - start, peak()]))
"""


def measure(script: str, cache: str) -> tuple[float, float]:
    env = {**os.environ, "JINTERP_CACHE": cache, "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    seconds, rss = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {"jinterp, converting the GGUF": [], "jinterp, from its cache": [], "transformers (GGUF)": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            results["jinterp, converting the GGUF"].append(measure(JINTERP, cache))
            results["jinterp, from its cache"].append(measure(JINTERP, cache))
            results["transformers (GGUF)"].append(measure(TRANSFORMERS, cache))
    print(f"median of {args.repeats} fresh processes (imports included)")
    medians = {}
    for name, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        rss = statistics.median(r[1] for r in runs)
        medians[name] = seconds
        print(f"  {name:<30} {seconds:6.2f} s   peak RSS {rss / 2**20:6.0f} MiB")
    reference = medians["transformers (GGUF)"]
    print(f"jinterp from cache is {reference / medians['jinterp, from its cache']:.1f}x faster than transformers; "
          f"converting is {reference / medians['jinterp, converting the GGUF']:.1f}x")


if __name__ == "__main__":
    main()
