"""Capture-everything cost on an accelerator: a forward pass vs the same pass capturing every
site, for SmolLM2-135M's architecture (its weights when installed, else random weights of the
same shapes: timing depends on shapes only). Prints medians and ratios, float32 and bfloat16.
Needs only jax and jinterp's own dependencies (no torch), so it runs where the reference extra
is not installed:

    PYTHONPATH=. python benchmarks/accelerator_capture.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import jinterp
from jinterp.loading import registry

SMOLLM2 = jinterp.Config(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_mlp=1536, d_vocab=49152,
                         n_ctx=8192, norm="rms", norm_eps=1e-5, act="silu", gated_mlp=True, positional="rotary",
                         rope_theta=100_000.0, tied_embeddings=True, architecture="llama")
WORKLOADS = ((8, 14), (4, 64), (32, 128), (64, 256))


def smollm2() -> tuple[jinterp.Transformer, str]:
    if registry.installed(registry.MODELS["smollm2-135m"]):
        return jinterp.load("smollm2-135m")[0], "SmolLM2-135M weights"
    return jinterp.Transformer.init(SMOLLM2, jax.random.key(0)), "random weights, SmolLM2-135M shapes"


def median_seconds(repeats: int, fn, *args, **kwargs) -> float:
    jax.block_until_ready(fn(*args, **kwargs))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    model, weights = smollm2()
    print(f"devices: {jax.devices()}; {weights}")
    everything = list(jinterp.sites(model))
    print(f"{'dtype':<9} {'batch x seq':>12} {'forward ms':>11} {'capture-all ms':>15} {'ratio':>6}")
    for dtype in ("float32", "bfloat16"):
        typed = model.astype(dtype)
        for batch, seq in WORKLOADS:
            tokens = jax.device_put(np.random.default_rng(0).integers(0, model.cfg.d_vocab, (batch, seq),
                                                                      dtype=np.int32))
            plain = median_seconds(args.repeats, typed, tokens)
            captured = median_seconds(args.repeats, jinterp.run, typed, tokens, capture=everything)
            print(f"{dtype:<9} {f'{batch} x {seq}':>12} {plain * 1e3:11.2f} {captured * 1e3:15.2f} "
                  f"{captured / plain:6.2f}", flush=True)


if __name__ == "__main__":
    main()
