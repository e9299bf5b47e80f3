"""Peak memory of SmolLM2-135M sweeps, captures and SAE activation streaming under memory budgets.

Each case runs in a fresh subprocess (peak RSS counts everything a process ever held):

- ``sweep``: a ``resid_pre`` activation-patching sweep (every layer and position) on IOI prompts, with
  ``memory_budget`` set to what a process budget (``--budget-gb``) leaves after the weights and the
  runtime; the process's peak resident memory is checked against the process budget.
- ``collect``: ``jinterp.collect`` of every layer's ``resid_post`` at every position of
  ``--sequences`` windows of standard-library docstrings, under ``--activation-budget-mb``. The
  results live on the host and are counted separately: the check is peak RSS minus the resident
  memory before (weights, runtime, compiled programs: the measured run is the second of two identical
  ones) minus the result bytes, against the activation budget.
  ``collect-unbudgeted`` runs the same capture as one forward over all the sequences, for comparison.
- ``sae``: ``ModelActivations(...).all()`` at ``blocks.15.resid_post`` under the same activation budget,
  counted the same way.

    .venv/bin/python benchmarks/memory_budget.py [--budget-gb 2] [--activation-budget-mb 384] [--sequences 48]
    .venv/bin/python benchmarks/memory_budget.py --case collect   # one case, in this process
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import subprocess
import sys
import time

import common  # noqa: F401  (imports jinterp before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np

import jinterp
from experiments import ioi
from experiments.stdlib_text import stdlib_documents, windows
from jinterp import memory, patching
from jinterp.collection import collect  # jinterp.collect once exported
from jinterp.models.declaration import site_specs
from jinterp.sae import ModelActivations

CASES = ("sweep", "collect", "collect-unbudgeted", "sae")


def status_gb(field: str) -> float:
    """A memory line of /proc/self/status in GB: VmRSS (resident now), VmHWM (its peak)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kb * 1024 / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def reset_peak() -> bool:
    """Restarts VmHWM from the current resident size (Linux 4.0+), so that the measured work's own peak shows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sweep(model, tokenizer, args) -> None:
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
    chunks = patching.sweep_chunks(model, clean, corrupt, metric, "resid_pre", logit_positions=[-1],
                                   memory_budget=activations)
    result = np.asarray(chunks.run(progress=True))
    seconds = time.perf_counter() - start
    sweep_peak = status_gb("VmHWM")
    peak = max(load_peak, peak_rss_gb())  # (resetting VmHWM resets ru_maxrss too)
    print(f"sweep: SmolLM2-135M resid_pre, {args.prompts} prompts x {clean.shape[1]} tokens: {result.size} patches "
          f"in {chunks.n} chunks, {seconds:.1f} s")
    print(f"sweep: weights {weights_gb:.2f} GB; resident after loading {after_load:.2f} GB; activation budget "
          f"{activations / 1e9:.2f} GB")
    if sweep_peak_known:
        print(f"sweep: peak resident memory while loading {load_peak:.2f} GB, while sweeping {sweep_peak:.2f} GB")
    print(f"sweep: peak resident memory {peak:.2f} GB against a budget of {args.budget_gb:.2f} GB: "
          f"{'within' if peak <= args.budget_gb else 'OVER'} it")


def text_windows(tokenizer, args) -> np.ndarray:
    tokens = windows(tokenizer, list(stdlib_documents().values()), args.seq)
    if len(tokens) < args.sequences:
        raise SystemExit(f"only {len(tokens)} windows of {args.seq} tokens in the text; ask for fewer --sequences")
    return tokens[:args.sequences]


def report(case: str, work, args, result_bytes, unbudgeted_bytes: int, detail: str) -> None:
    """Runs ``work()`` twice and prints the second run's peak resident memory beyond what was resident
    before it and its results. The first run compiles (XLA's compilation takes memory of its own,
    freed after it, shown separately)."""
    before = status_gb("VmRSS")
    start = time.perf_counter()
    first = work()
    compile_seconds = time.perf_counter() - start
    del first
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back, so that the next baseline is honest
    first_peak = peak_rss_gb()
    after_load = status_gb("VmRSS")
    if not reset_peak():
        raise SystemExit("this kernel cannot reset the peak resident size (/proc/self/clear_refs)")
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    peak = status_gb("VmHWM")
    results_gb = result_bytes(result) / 1e9
    beyond = peak - after_load - results_gb
    budget = args.activation_budget_mb * 2**20 / 1e9
    print(f"{case}: {detail}: {seconds:.1f} s ({compile_seconds:.1f} s the first time, compiling)")
    print(f"{case}: resident after loading {before:.2f} GB (first run's peak {first_peak:.2f} GB, compiling "
          f"included), before the measured run {after_load:.2f} GB; results {results_gb:.2f} GB; one forward over "
          f"every sequence would need ~{unbudgeted_bytes / 1e9:.2f} GB of activations (estimate)")
    print(f"{case}: peak resident memory {peak:.2f} GB; minus the resident memory before and the results: "
          f"{beyond:.2f} GB against an activation budget of {budget:.2f} GB: "
          f"{'within' if beyond <= budget else 'OVER'} it")


def collect_case(model, tokenizer, args, budgeted: bool = True) -> None:
    tokens = text_windows(tokenizer, args)
    names = [f"blocks.{layer}.resid_post" for layer in range(model.cfg.n_layers)]
    specs = site_specs(model.cfg, 1, args.seq, 0)
    each = memory.run_bytes(specs, names) + memory.values_bytes(specs, names)
    budget = args.activation_budget_mb * 2**20
    size = min(len(tokens), int(budget // each)) if budgeted else len(tokens)
    work = lambda: collect(model, tokens, "blocks.*.resid_post", memory_budget=budget,  # noqa: E731
                           batch_size=None if budgeted else len(tokens))
    report("collect" if budgeted else "collect-unbudgeted", work, args,
           lambda result: sum(value.nbytes for value in result.values()), len(tokens) * each,
           f"every layer's resid_post of {len(tokens)} x {args.seq} tokens, {size} sequences per forward")


def sae(model, tokenizer, args) -> None:
    tokens = jnp.asarray(text_windows(tokenizer, args))
    source = ModelActivations(model, tokens, "blocks.15.resid_post", sequences_per_batch=8, skip=1,
                              memory_budget=args.activation_budget_mb * 2**20)
    cfg = model.cfg.replace(n_layers=16, layer_types=model.cfg.layer_types[:16])  # the layers run
    each = memory.run_bytes(site_specs(cfg, 1, args.seq, 0), ["blocks.15.resid_post"])
    report("sae", source.all, args, lambda result: result.nbytes, len(tokens) * each,
           f"ModelActivations.all() at blocks.15.resid_post, {len(tokens)} x {args.seq} tokens, "
           f"{source.sequences_per_forward(len(tokens))} sequences per forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, help="run one case in this process (default: each in a subprocess)")
    parser.add_argument("--budget-gb", type=float, default=2.0, help="the sweep's whole-process budget")
    parser.add_argument("--prompts", type=int, default=4, help="the sweep's IOI prompts")
    parser.add_argument("--activation-budget-mb", type=float, default=384, help="collect's and the SAE source's")
    parser.add_argument("--sequences", type=int, default=48, help="text windows for collect and the SAE source")
    parser.add_argument("--seq", type=int, default=128, help="tokens per window")
    args = parser.parse_args()
    if args.case is None:
        for case in CASES:
            subprocess.run([sys.executable, __file__, "--case", case, *sys.argv[1:]], check=True)
        return
    model, tokenizer = jinterp.load("smollm2-135m", progress=False)
    {"sweep": sweep, "collect": collect_case, "collect-unbudgeted": lambda *a: collect_case(*a, budgeted=False),
     "sae": sae}[args.case](model, tokenizer, args)


if __name__ == "__main__":
    main()
