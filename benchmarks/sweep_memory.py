"""Peak memory of a SmolLM2-135M activation-patching sweep under a memory budget.

Loads SmolLM2-135M (fp32 weights), runs a ``resid_pre`` sweep (every layer and position) on IOI
prompts with ``memory_budget`` set to what the process budget leaves after the weights and the
runtime, and reports the process's peak resident memory (``ru_maxrss``: weights, compiled
programs, the clean and corrupted caches and the chunks' activations together) against the budget.
Run it in a fresh process: peak RSS counts everything the process ever held.

    .venv/bin/python benchmarks/sweep_memory.py [--budget-gb 2] [--prompts 4]
"""

from __future__ import annotations

import argparse
import resource
import time

import common  # noqa: F401  (imports jinterp before JAX starts)
import jax
import numpy as np

import jinterp
from experiments import ioi
from jinterp import patching


def status_gb(field: str) -> float:
    """A memory line of /proc/self/status in GB: VmRSS (resident now), VmHWM (its peak)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kb * 1024 / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def reset_peak() -> bool:
    """Restarts VmHWM from the current resident size (Linux 4.0+), so that the sweep's own peak shows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gb", type=float, default=2.0, help="the whole process's budget")
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()

    model, tokenizer = jinterp.load("smollm2-135m", progress=False)
    prompts = ioi.make_prompts(tokenizer, ioi.Config(n_prompts=args.prompts))
    clean, corrupt = prompts["clean_tokens"], prompts["corrupt_tokens"]
    metric = ioi.logit_diff_metric(prompts["io"], prompts["s"])
    weights_gb = sum(x.nbytes for x in jax.tree.leaves(model)) / 1e9
    after_load = status_gb("VmRSS")
    load_peak = peak_rss_gb()
    sweep_peak_known = reset_peak()
    # What the budget leaves for activations: the resident memory so far (weights, runtime) and
    # ~0.4 GB for XLA's compiled programs and scratch buffers.
    activations = (args.budget_gb - after_load - 0.4) * 1e9
    if activations <= 0:
        raise SystemExit(f"a {args.budget_gb} GB budget leaves nothing for activations after loading "
                         f"({after_load:.2f} GB resident)")

    start = time.perf_counter()
    chunks = patching.sweep_chunks(model, clean, corrupt, metric, "resid_pre", metric_positions=[-1],
                                   memory_budget=activations)
    result = np.asarray(chunks.run(progress=True))
    seconds = time.perf_counter() - start
    sweep_peak = status_gb("VmHWM")
    peak = max(load_peak, peak_rss_gb())  # (resetting VmHWM resets ru_maxrss too)
    print(f"SmolLM2-135M resid_pre sweep, {args.prompts} prompts x {clean.shape[1]} tokens: {result.size} patches "
          f"in {chunks.n} chunks, {seconds:.1f} s")
    print(f"weights {weights_gb:.2f} GB; resident after loading {after_load:.2f} GB; activation budget "
          f"{activations / 1e9:.2f} GB")
    if sweep_peak_known:
        print(f"peak resident memory while loading {load_peak:.2f} GB, while sweeping {sweep_peak:.2f} GB")
    print(f"peak resident memory {peak:.2f} GB against a budget of {args.budget_gb:.2f} GB: "
          f"{'within' if peak <= args.budget_gb else 'OVER'} it")


if __name__ == "__main__":
    main()
