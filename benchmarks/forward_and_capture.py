"""Forward pass and capture-everything cost on SmolLM2-135M: jinterp vs transformers vs
TransformerLens on the same weights, in one process. Prints medians and ratios.

    .venv/bin/python benchmarks/forward_and_capture.py [--repeats 7]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch
from common import paired, smollm2

import jinterp


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer, hf, tl = smollm2()
    print(f"devices: jax {jax.devices()}, torch threads {torch.get_num_threads()}")
    ioi = "When Mary and John went to the store, John gave a drink to"
    workloads = {"IOI batch 8 x 14": (8, len(tokenizer.encode(ioi))), "batch 4 x 64": (4, 64),
                 "batch 2 x 256": (2, 256)}
    everything = list(jinterp.sites(model))
    without_result = [n for n in everything if not n.endswith("attn.result")]

    def measure(batch: int, seq: int) -> dict:
        tokens = np.random.default_rng(0).integers(0, model.cfg.d_vocab, (batch, seq)).astype(np.int32)
        torch_tokens = torch.tensor(tokens, dtype=torch.long)
        with torch.no_grad():
            return paired({
                "hf": lambda: hf(torch_tokens),
                "tl": lambda: tl(torch_tokens),
                "tl_cache": lambda: tl.run_with_cache(torch_tokens),
                "ji": lambda: jax.block_until_ready(model(tokens)),
                "ji_cache": lambda: jax.block_until_ready(jinterp.run(model, tokens, capture=everything)),
                "ji_cache_nr": lambda: jax.block_until_ready(jinterp.run(model, tokens, capture=without_result)),
            }, args.repeats)

    rows = []
    for name, (batch, seq) in workloads.items():
        t = measure(batch, seq)
        rows.append((name, t["hf"], t["tl"], t["ji"], t["tl_cache"], t["ji_cache"], t["ji_cache_nr"]))

    print("\nmedian seconds (lower is better)")
    header = f"{'workload':<18} {'HF fwd':>8} {'TL fwd':>8} {'jinterp':>8} | {'TL cache':>9} {'ji all':>8}"
    print(header + f" {'ji all-res':>10}")
    for name, *times in rows:
        print(f"{name:<18} " + " ".join(f"{t:8.3f}" for t in times[:3]) + " | "
              + f"{times[3]:9.3f} {times[4]:8.3f} {times[5]:10.3f}")
    print("\nratios")
    for name, t_hf, t_tl, t_ji, t_tl_cache, t_ji_cache, t_ji_nr in rows:
        print(f"{name:<18} jinterp forward is {t_hf / t_ji:.2f}x HF, {t_tl / t_ji:.2f}x TL; "
              f"capture-all costs {t_ji_cache / t_ji:.2f}x a forward in jinterp "
              f"({t_ji_nr / t_ji:.2f}x without per-head attn.result), {t_tl_cache / t_tl:.2f}x in TL "
              f"(TL caches no attn.result by default); jinterp capture-all is {t_tl_cache / t_ji_cache:.2f}x faster "
              f"than TL run_with_cache")


if __name__ == "__main__":
    main()
