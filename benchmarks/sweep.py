"""Activation patching on SmolLM2-135M with IOI prompts: jinterp's sweeps against
TransformerLens' generic_activation_patch loop and against TransformerLens with the patches
batched by hand, on the same weights in one process. Checks that the results agree (1e-4) and
prints medians and ratios (jinterp's first call, compile included, and its repeated calls); also
attribution patching's cost in forward-pass equivalents.

The causal-reuse limit: a patch at layer l changes nothing before layer l, and (a causal model)
nothing before the first position its value differs at, nor any logit but the one the metric reads.
The FLOPs a sweep needs at that limit (every changed patch's layers from l on, at those positions,
and one unembedding per prompt) divided by the machine's float32 matmul peak (as
benchmarks/roofline.py measures it) is the fastest the sweep could run; each sweep's time is
printed as a multiple of it.

    .venv/bin/python benchmarks/sweep.py [--prompts 4] [--repeats 3] [--tl-repeats 1]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import smollm2, timed
from roofline import matmul_peak

from jinterp import attribution, patching

NAMES = [(" Mary", " John"), (" Tom", " James"), (" Anna", " Lisa"), (" David", " Paul"), (" Sarah", " Emma"),
         (" Mark", " Peter"), (" Laura", " Kate"), (" Steve", " Mike")]


def ioi(tokenizer, n):
    clean, corrupt, answers = [], [], []
    for a, b in NAMES[:n]:
        clean.append(tokenizer.encode(f"When{a} and{b} went to the store,{b} gave a drink to"))
        corrupt.append(tokenizer.encode(f"When{a} and{b} went to the store,{a} gave a drink to"))
        answers.append((tokenizer.encode(a)[0], tokenizer.encode(b)[0]))
    lengths = {len(c) for c in clean + corrupt}
    assert len(lengths) == 1, "names must be single tokens so prompts align"
    return np.array(clean, np.int32), np.array(corrupt, np.int32), np.array(answers)


def metric_for(answers):
    """Mean logit difference, correct minus distractor, at the last position."""

    def metric(logits):
        last = logits[:, -1]
        return (jnp.take_along_axis(last, answers[:, :1], 1) - jnp.take_along_axis(last, answers[:, 1:], 1)).mean()

    return metric


def limit_flops(cfg, site: str, clean, corrupt) -> float:
    """FLOPs of the sweep's changed patches at the causal-reuse limit (module docstring)."""
    d, heads, kv, e, m = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    batch, seq = clean.shape
    first = int(np.argmax((clean != corrupt).any(0)))

    def token_layer(keys):  # one position through one block, attending to ``keys`` positions
        return 2 * (d * (heads * e + 2 * kv * e) + heads * e * d + (3 if cfg.gated_mlp else 2) * d * m
                    + 2 * heads * e * keys)

    total = 0.0
    for layer in range(cfg.n_layers):
        starts = [first] * heads if site == "z" else range(first, seq)  # each patch's first changed position
        for start in starts:
            total += batch * (cfg.n_layers - layer) * sum(token_layer(q + 1) for q in range(start, seq))
            total += batch * 2 * d * cfg.d_vocab  # the metric's one logit position
    return total


def tl_batched_resid_pre(tl, clean_tokens, corrupt_tokens, clean_cache, tl_metric):
    """TransformerLens with the patches batched by hand: one forward per layer, every position's
    patch a copy of the corrupted batch."""
    n, seq = corrupt_tokens.shape
    out = torch.zeros(tl.cfg.n_layers, seq)
    batch = corrupt_tokens.repeat(seq, 1)  # [seq * n, seq]: copy p patches position p
    for layer in range(tl.cfg.n_layers):
        clean_resid = clean_cache[f"blocks.{layer}.hook_resid_pre"]

        def hook(resid, hook, clean_resid=clean_resid):
            for p in range(seq):
                resid[p * n:(p + 1) * n, p] = clean_resid[:, p]
            return resid

        logits = tl.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])
        for p in range(seq):
            out[layer, p] = tl_metric(logits[p * n:(p + 1) * n])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tl-repeats", type=int, default=1, help="the TransformerLens loop takes minutes a run")
    args = parser.parse_args()
    model, tokenizer, _, tl = smollm2()
    clean, corrupt, answers = ioi(tokenizer, args.prompts)
    print(f"SmolLM2-135M, {args.prompts} IOI prompts of {clean.shape[1]} tokens; jax {jax.devices()}, "
          f"torch threads {torch.get_num_threads()}")
    metric = metric_for(jnp.asarray(answers))

    torch_answers = torch.tensor(answers)

    def tl_metric(logits):
        last = logits[:, -1]
        return (last.gather(1, torch_answers[:, :1]) - last.gather(1, torch_answers[:, 1:])).mean()

    from transformer_lens import patching as tl_patching

    peak = max(matmul_peak("float32", 5).values())
    print(f"float32 matmul peak {peak / 1e9:.0f} GFLOP/s (benchmarks/roofline.py)")

    tc, tk = torch.tensor(clean).long(), torch.tensor(corrupt).long()
    with torch.no_grad():
        _, clean_cache = tl.run_with_cache(tc)
    rows = []
    for site, tl_fn in (("resid_pre", tl_patching.get_act_patch_resid_pre),
                        ("z", tl_patching.get_act_patch_attn_head_out_all_pos)):
        def ours(site=site):
            return jax.block_until_ready(patching.sweep(model, clean, corrupt, metric, site, logit_positions=[-1],
                                                        progress=False))
        first = timed(ours, repeats=1, warmup=0)  # includes compiling
        t_ours = timed(ours, repeats=args.repeats, warmup=0)
        result = np.asarray(ours())
        with torch.no_grad():
            tl_result = tl_fn(tl, tk, clean_cache, tl_metric).numpy()
            t_tl = timed(lambda fn=tl_fn: fn(tl, tk, clean_cache, tl_metric), repeats=args.tl_repeats, warmup=0)
            t_batched = None
            if site == "resid_pre":
                batched = tl_batched_resid_pre(tl, tc, tk, clean_cache, tl_metric).numpy()
                assert np.abs(batched - tl_result).max() < 1e-3
                t_batched = timed(lambda: tl_batched_resid_pre(tl, tc, tk, clean_cache, tl_metric),
                                  repeats=args.tl_repeats, warmup=0)
        difference = np.abs(result - tl_result).max()
        assert difference < 1e-4, f"{site}: jinterp and TransformerLens differ by {difference}"
        at_limit = limit_flops(model.cfg, site, clean, corrupt) / peak
        rows.append((site, result.size, first, t_ours, t_tl, t_batched, difference, at_limit))

    for site, n, first, t_ours, t_tl, t_batched, diff, at_limit in rows:
        batched = f", TL batched by hand {t_batched:.1f} s ({t_batched / first:.1f}x)" if t_batched else ""
        print(f"{site:<10} {n} patches: jinterp {first:.1f} s with compile ({t_ours:.1f} s repeated), TL loop "
              f"{t_tl:.1f} s -> {t_tl / first:.1f}x faster with compile, {t_tl / t_ours:.1f}x repeated{batched}; "
              f"the causal-reuse limit at peak {at_limit:.2f} s: jinterp {t_ours / at_limit:.1f}x it; "
              f"max |difference| {diff:.1e}")

    # Attribution patching's cost relative to a forward pass, on the sweep's prompts and on the
    # demo's batch of 32 (the prompts repeated), where fixed overheads matter less.
    for n in sorted({len(clean), 32}):
        reps = -(-n // len(clean))
        c, k, a = (np.tile(x, (reps, 1))[:n] for x in (clean, corrupt, answers))
        score = metric_for(jnp.asarray(a))
        forward = timed(lambda k=k: jax.block_until_ready(model(k)), repeats=args.repeats)
        for site in ("resid_pre", "z"):
            t_attr = timed(lambda s=site, c=c, k=k, score=score: jax.block_until_ready(
                attribution.attribution_patching(model, c, k, score, s, logit_positions=[-1])), repeats=args.repeats)
            print(f"attribution patching ({site}, {n} prompts): {t_attr:.2f} s = {t_attr / forward:.1f} forward "
                  f"passes (one forward {forward:.2f} s)")


if __name__ == "__main__":
    main()
