"""Greedy generation on SmolLM2-135M: jinterp's jitted KV-cache decode loop vs transformers' `generate`
on the same weights and the same left-padded prompts, in one process; and what a steering edit at
every step costs. Checks that both produce the same tokens. Prints medians and ratios.

    .venv/bin/python benchmarks/generate.py [--new-tokens 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from common import paired, smollm2

import jinterp
from jinterp.generation import generate

PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
           "Once upon a time", "def fibonacci(n):"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer, hf, _ = smollm2(with_tl=False)
    n = args.new_tokens
    print(f"devices: jax {jax.devices()}, torch threads {torch.get_num_threads()}; "
          f"{len(PROMPTS)} prompts, up to {n} new tokens, greedy, stop at EOS")
    steer = jinterp.Add("blocks.10.resid_post", jax.random.normal(jax.random.key(0), (model.cfg.d_model,)), 4.0)

    def ours(edits=()):
        return generate(model, tokenizer, PROMPTS, n, edits=edits)

    start = time.perf_counter()
    first = ours()
    print(f"jinterp first call (compile + run): {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    ours(steer)
    print(f"jinterp first call with a steering edit (compile + run): {time.perf_counter() - start:.2f} s")
    prompt = torch.tensor(first.prompt_tokens, dtype=torch.long)
    mask = torch.tensor(first.prompt_mask, dtype=torch.long)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=mask, max_new_tokens=n, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    expected = theirs()[:, prompt.shape[1]:].numpy()
    same = expected.shape == first.tokens.shape and np.array_equal(expected, first.tokens)
    print(f"same tokens as transformers: {same}; new tokens per prompt: {first.n_generated.tolist()}")
    t = paired({"hf": theirs, "ji": ours, "ji_steer": lambda: ours(steer)}, args.repeats)
    tokens = int(first.n_generated.sum())
    print("\nmedian seconds (lower is better), new tokens/s")
    for name, label in (("hf", "transformers generate"), ("ji", "jinterp generate"),
                        ("ji_steer", "jinterp + steering every step")):
        print(f"{label:<32} {t[name]:7.3f} s  {tokens / t[name]:8.1f} tok/s")
    print(f"\njinterp is {t['hf'] / t['ji']:.2f}x transformers; steering costs {t['ji_steer'] / t['ji']:.2f}x")


if __name__ == "__main__":
    main()
