"""ACDC's edge trials, each receiver's as one vmapped program (jinterp.acdc, batched=True), against the
same algorithm with one patched forward per trial in a Python loop (batched=False), in one process, on
the IOI prompts of SmolLM2-135M (the first --layers layers and the unembedding: the full 30-layer graph
has 70,651 edges, a run of hours on 2 CPU cores). Checks that both find the same circuit; prints the
seconds, trials per second and the ratio. Both runs are timed after a warm-up run that compiles them.

    .venv/bin/python benchmarks/acdc.py [--layers 2] [--prompts 4] [--tau 0.01]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import timed  # noqa: F401 - sets up the process as every benchmark does

import jinterp
from jinterp import acdc

NAMES = [(" Mary", " John"), (" Tom", " James"), (" Anna", " Lisa"), (" David", " Paul"), (" Sarah", " Emma"),
         (" Mark", " Peter"), (" Laura", " Kate"), (" Steve", " Mike")]


def ioi(tokenizer, n):
    clean = [tokenizer.encode(f"When{a} and{b} went to the store,{b} gave a drink to") for a, b in NAMES[:n]]
    corrupt = [tokenizer.encode(f"When{a} and{b} went to the store,{a} gave a drink to") for a, b in NAMES[:n]]
    assert len({len(c) for c in clean + corrupt}) == 1, "names must be single tokens so prompts align"
    return np.array(clean, np.int32), np.array(corrupt, np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tau", type=float, default=0.01)
    args = parser.parse_args()
    model, tokenizer = jinterp.load("smollm2-135m", progress=False)
    model = model.first_layers(args.layers)
    clean, corrupt = ioi(tokenizer, args.prompts)
    options = dict(logit_positions=[-1], progress=False)
    runs = {}
    for batched in (True, False):
        acdc.acdc(model, clean, corrupt, args.tau, batched=batched, **options)  # compiles
        start = time.perf_counter()
        runs[batched] = acdc.acdc(model, clean, corrupt, args.tau, batched=batched, **options)
        runs[batched].seconds = time.perf_counter() - start
    same = bool((runs[True].circuit == runs[False].circuit).all())
    graph = runs[True].graph
    print(f"SmolLM2-135M, first {args.layers} layers, {args.prompts} IOI prompts of {clean.shape[1]} tokens; "
          f"{graph.n_edges} edges, tau={args.tau}: {runs[True].n_edges} kept, KL {runs[True].metric:.4f} "
          f"(empty {runs[True].metric_empty:.3f}); same circuit both ways: {same}")
    for batched, name in ((True, "vmapped trials per receiver"), (False, "one forward per trial")):
        r = runs[batched]
        print(f"  {name:<28} {r.seconds:8.2f} s  {r.trials} trials, {r.forwards} forwards, "
              f"{r.forwards / r.seconds:7.1f} forwards/s")
    print(f"  ratio (loop / vmapped): {runs[False].seconds / runs[True].seconds:.2f}x")


if __name__ == "__main__":
    main()
