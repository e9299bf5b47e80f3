"""Shared benchmark helpers: the same SmolLM2-135M weights in jinterp, transformers and
TransformerLens, and a median-of-runs timer."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jinterp  # noqa: E402

# Benchmarks time repeated calls: every library in the process reuses freed host memory (see
# jinterp.reuse_freed_memory) instead of faulting fresh pages in on every call.
jinterp.reuse_freed_memory()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference-model builders


def timed(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (machines here are noisy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(fns: dict, repeats: int = 7, warmup: int = 1) -> dict:
    """Median seconds of each function, timed in interleaved rounds so that drift in the
    machine's speed hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def smollm2(with_tl: bool = True):
    """(jinterp model, tokenizer, transformers model, TransformerLens model or None) on one set of weights."""
    import torch
    import transformers
    from hf_models import build_tl

    model, tokenizer = jinterp.load("smollm2-135m", progress=False)
    source = jinterp.loading.registry.locate(jinterp.loading.registry.MODELS["smollm2-135m"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                           dtype=torch.float32).eval()
    return model, tokenizer, hf, build_tl("llama", hf) if with_tl else None
