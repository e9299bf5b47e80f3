"""The machine's limit and how close jinterp's forward gets to it, beside transformers' forward.

    .venv/bin/python benchmarks/roofline.py [--repeats 7]

1. Peak: sustained matmul FLOP/s of a large square matmul in float32 and bfloat16, with JAX (as
   jinterp compiles it: XLA's default CPU kernels without YNNPACK, and with XLA's defaults) and with
   PyTorch. The fastest float32 figure is the peak a float32 forward is held to.
2. Workloads: SmolLM2-135M's forward (random tokens) at 8 x 14, 4 x 64, 2 x 256 and 1 x 1024, timed
   in interleaved repeats with transformers' on the same weights. FLOPs are counted from the config:
   2 x (multiply-adds of every matmul) per token, attention's scores and weighted sum over the keys
   each query may read (its own and earlier ones: both libraries skip the later, masked keys) and the
   unembedding.

Prints each workload's achieved FLOP/s, its fraction of the peak, and jinterp's speed relative to
transformers. Medians of interleaved repeats (machines here are noisy).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import paired, smollm2, timed

import jinterp

SHAPES = ((8, 14), (4, 64), (2, 256), (1, 1024))


def forward_flops(cfg, batch: int, seq: int) -> float:
    """FLOPs of one forward: matmuls (2 per multiply-add), causal attention (query i reads i + 1 keys), the
    unembedding."""
    d, heads, kv, e, m = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    projections = d * (heads * e + 2 * kv * e) + heads * e * d  # q, k, v and the output
    mlp = (3 if cfg.gated_mlp else 2) * d * m
    attention = 2 * heads * e * (seq + 1) / 2  # scores and the weighted sum of values, per query on average
    per_token = 2 * cfg.n_layers * (projections + mlp + attention) + 2 * d * cfg.d_vocab
    return float(per_token * batch * seq)


def matmul_peak(dtype: str, repeats: int, size: int = 2048) -> dict[str, float]:
    """FLOP/s of a [size, size] x [size, size] matmul, median of ``repeats``, per implementation."""
    x = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    flops = 2.0 * size**3
    found = {}
    for label, options in (("JAX (jinterp's options)", jinterp.compiler_options()), ("JAX (XLA defaults)", {})):
        a = jnp.asarray(x, dtype)
        f = jax.jit(lambda m: m @ m, compiler_options=options)
        found[label] = flops / timed(lambda f=f, a=a: f(a).block_until_ready(), repeats)
    t = torch.tensor(x, dtype=getattr(torch, dtype))
    found["PyTorch"] = flops / timed(lambda: t @ t, repeats)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"devices: jax {jax.devices()}, torch threads {torch.get_num_threads()}")
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        found = matmul_peak(dtype, args.repeats)
        peaks[dtype] = max(found.values())
        print(f"{dtype} 2048^2 matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in found.items()))
    peak = peaks["float32"]
    print(f"\nfloat32 peak: {peak / 1e9:.0f} GFLOP/s (the fastest above)")

    model, _, hf, _ = smollm2(with_tl=False)
    print(f"\n{'workload':<10} {'GFLOP':>7} | {'jinterp s':>9} {'GFLOP/s':>8} {'of peak':>8} | {'HF s':>7} "
          f"{'GFLOP/s':>8} {'of peak':>8} | jinterp vs HF")
    for batch, seq in SHAPES:
        tokens = np.random.default_rng(seq).integers(0, model.cfg.d_vocab, (batch, seq)).astype(np.int32)
        torch_tokens = torch.tensor(tokens, dtype=torch.long)
        with torch.no_grad():
            t = paired({"ji": lambda tokens=tokens: jax.block_until_ready(model(tokens)),
                        "hf": lambda torch_tokens=torch_tokens: hf(torch_tokens)}, args.repeats)
        flops = forward_flops(model.cfg, batch, seq)
        rate = {k: flops / seconds for k, seconds in t.items()}
        print(f"{batch} x {seq:<6} {flops / 1e9:7.1f} | {t['ji']:9.3f} {rate['ji'] / 1e9:8.0f} "
              f"{rate['ji'] / peak:8.0%} | {t['hf']:7.3f} {rate['hf'] / 1e9:8.0f} {rate['hf'] / peak:8.0%} "
              f"| {t['hf'] / t['ji']:.2f}x")


if __name__ == "__main__":
    main()
