"""ACDC's edge trials, each receiver's as one vmapped program (jinterp.acdc, batched=True), against the
same algorithm with one patched forward per trial in a Python loop (batched=False), in one process, on
the IOI prompts of SmolLM2-135M (the first --layers layers and the unembedding; the full 30-layer graph
has 70,651 edges: 35 minutes of vmapped trials on 2 CPU cores, 65 one forward per trial). Checks that
both find the same circuit; prints the seconds, trials per second and the ratio. Both runs are timed
after a warm-up run that compiles them (with ``--checkpoints``, below, each includes its compiles
instead: a warm-up would double hours).

``--compare-eap`` then sets ACDC's circuit beside EAP's (``circuits.edge_attribution`` with the IOI
logit difference, pruned to the same number of edges): the edges both keep, and each circuit's
faithfulness (``circuits.faithfulness``: the share of the clean-corrupted logit difference it
recovers). The comparison means something only on the whole model (``--layers 30``; ``--no-loop`` skips
the one-forward-per-trial baseline and the warm-up run: the one run's time then includes compiling).
``--checkpoints DIR`` saves each receiver's trials and decision
there as it completes (``acdc(step=Run.step)``): the whole-graph run can be stopped at any point and
resumed; its time is then the sum of every step's own compute time, as saved.

    .venv/bin/python benchmarks/acdc.py [--layers 2] [--prompts 4] [--tau 0.01] [--compare-eap] [--no-loop]
        [--checkpoints DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import timed  # noqa: F401 - sets up the process as every benchmark does

import jinterp
from jinterp import acdc, circuits
from jinterp.runs import Run

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
    parser.add_argument("--compare-eap", action="store_true", help="ACDC beside EAP at the same edge count")
    parser.add_argument("--no-loop", action="store_true", help="skip the one-forward-per-trial baseline")
    parser.add_argument("--checkpoints", type=Path, help="save each receiver there: a stopped run resumes")
    args = parser.parse_args()
    model, tokenizer = jinterp.load("smollm2-135m", progress=False)
    model = model.first_layers(args.layers)
    clean, corrupt = ioi(tokenizer, args.prompts)
    options = dict(logit_positions=[-1], progress=True)
    runs = {}
    for batched in (True,) if args.no_loop else (True, False):
        if not args.no_loop and args.checkpoints is None:  # timed against the loop: both after a run
            acdc.acdc(model, clean, corrupt, args.tau, batched=batched, **options)  # that compiles them
        saved = None if args.checkpoints is None else Run(args.checkpoints / ("vmapped" if batched else "loop"), args)
        start = time.perf_counter()
        runs[batched] = acdc.acdc(model, clean, corrupt, args.tau, batched=batched,
                                  step=None if saved is None else saved.step, **options)
        runs[batched].seconds = time.perf_counter() - start
        if saved:  # each step's compute time as first measured, restored or not
            runs[batched].seconds = sum(t["seconds"] for t in saved.timings.values())
    same = "not run" if args.no_loop else bool((runs[True].circuit == runs[False].circuit).all())
    graph = runs[True].graph
    print(f"SmolLM2-135M, first {args.layers} layers, {args.prompts} IOI prompts of {clean.shape[1]} tokens; "
          f"{graph.n_edges} edges, tau={args.tau}: {runs[True].n_edges} kept, KL {runs[True].metric:.4f} "
          f"(empty {runs[True].metric_empty:.3f}); same circuit both ways: {same}")
    for batched, name in ((True, "vmapped trials per receiver"), (False, "one forward per trial")):
        if batched in runs:
            r = runs[batched]
            print(f"  {name:<28} {r.seconds:8.2f} s  {r.trials} trials, {r.forwards} forwards, "
                  f"{r.forwards / r.seconds:7.1f} forwards/s")
    if not args.no_loop:
        print(f"  ratio (loop / vmapped): {runs[False].seconds / runs[True].seconds:.2f}x")
    if args.compare_eap:
        compare_with_eap(model, tokenizer, clean, corrupt, runs[True], args.prompts)


def compare_with_eap(model, tokenizer, clean, corrupt, found: acdc.ACDCResult, n: int) -> None:
    """EAP's circuit with as many edges as ACDC's, and both circuits' overlap and faithfulness."""
    correct = np.array([tokenizer.encode(a)[-1] for a, _ in NAMES[:n]])
    wrong = np.array([tokenizer.encode(b)[-1] for _, b in NAMES[:n]])

    def logit_difference(logits):
        last = logits[:, -1]
        return (last[np.arange(n), correct] - last[np.arange(n), wrong]).mean()

    options = dict(logit_positions=[-1])
    scores, graph = circuits.edge_attribution(model, clean, corrupt, logit_difference, progress=False, **options)
    eap = circuits.prune(scores, graph, n_edges=found.n_edges)
    both = int((eap & found.circuit).sum())
    print(f"  ACDC vs EAP at {found.n_edges} edges: {both} edges in both ({both / max(found.n_edges, 1):.0%})")
    for name, circuit in (("ACDC", found.circuit), ("EAP", eap)):
        f = circuits.faithfulness(model, circuit, clean, corrupt, logit_difference, **options)
        print(f"  {name:<5} circuit: logit difference {f['circuit']:.3f} (clean {f['clean']:.3f}, corrupted "
              f"{f['corrupted']:.3f}): normalized faithfulness {f['normalized']:.3f}")


if __name__ == "__main__":
    main()
