"""Long prompts on SmolLM2-135M: time and peak memory of a run with captures, a `z` (head) sweep and
attribution patching at 256, 1,024 and 2,048 tokens, each length in a fresh process.

    .venv/bin/python benchmarks/long_prompt.py [--lengths 256 1024 2048] [--limit-gb 4]

One prompt of random tokens; the corrupted prompt differs in one token four positions before the end
(as a name near the end of a long context would), and the metric reads the last position. Each
length runs in a child process whose peak resident memory (weights, compiled programs and buffers
included) is reported against ``--limit-gb``, beside jinterp's own estimate of a full forward's
activations (``jinterp.memory``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(length: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jinterp
    from jinterp import attribution, memory, patching

    jinterp.reuse_freed_memory()
    model, _ = jinterp.load("smollm2-135m", progress=False)
    clean = np.random.default_rng(length).integers(0, model.cfg.d_vocab, (1, length)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[0, -4] = (corrupt[0, -4] + 1) % model.cfg.d_vocab
    answer = int(clean[0, -1])

    def metric(logits):
        return logits[:, -1, answer].mean()

    found = {"estimate_gb": memory.run_bytes(jinterp.sites(model, clean)) / 2**30}

    def timed(name, fn):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        found[name] = time.perf_counter() - start
        found[name.removesuffix("_s") + "_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    capture = ["blocks.*.resid_pre", "blocks.*.attn.z", "blocks.*.mlp_out"]
    timed("forward_s", lambda: model(clean))
    timed("forward_again_s", lambda: model(clean))
    timed("run_capture_s", lambda: jinterp.run(model, clean, capture=capture)[0])
    timed("z_sweep_s", lambda: patching.sweep(model, clean, corrupt, metric, "z", logit_positions=[-1],
                                              progress=False))
    timed("attribution_z_s", lambda: attribution.attribution_patching(model, clean, corrupt, metric, "z",
                                                                      logit_positions=[-1]))
    found["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del jnp
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--limit-gb", type=float, default=4.0)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    print(f"{'tokens':>6} | {'forward':>8} {'run+capture':>11} {'z sweep':>8} {'attribution':>11} | "
          f"{'peak RSS':>8} {'estimate':>8}   (seconds, first calls with compile; GiB)")
    worst = 0.0
    for length in args.lengths:
        out = subprocess.run([sys.executable, __file__, "--child", str(length)], capture_output=True, text=True)
        if out.returncode:
            print(f"{length:>6} | failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
            worst = float("inf")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        worst = max(worst, r["peak_rss_gb"])
        phases = ("forward", "forward_again", "run_capture", "z_sweep", "attribution_z")  # the first to reach the peak
        reached = next(p for p in phases if r[f"{p}_peak_gb"] >= r["peak_rss_gb"])
        print(f"{length:>6} | {r['forward_again_s']:8.2f} {r['run_capture_s']:11.2f} {r['z_sweep_s']:8.2f} "
              f"{r['attribution_z_s']:11.2f} | {r['peak_rss_gb']:8.2f} {r['estimate_gb']:8.2f}   peak in {reached}")
    print(f"largest peak {worst:.2f} GiB: {'within' if worst <= args.limit_gb else 'OVER'} {args.limit_gb} GiB")


if __name__ == "__main__":
    main()
