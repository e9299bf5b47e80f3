"""Float32 and bfloat16 accuracy of jinterp and transformers against a float64 referee, on the same
weights. Prints, per model and dtype, the worst and median logit error of each library and their ratio.

    .venv/bin/python benchmarks/numerics.py [--models smollm2-135m gemma3-270m] [--prompts FILE]

The referee is jinterp's own forward in float64 (``jax.enable_x64``) on the dequantised weights both
libraries read (transformers keeps GGUF weights in float32 even when asked for float64). Each prompt
runs in right-padded batches and in left-padded batches (with the attention mask), and the first 16
alone (no padding), since a kernel's rounding depends on the shapes it gets; an error is the
largest |logit - float64 logit| over a prompt's real positions. ``--prompts`` takes a file of
held-out prompts, one per line (``\\n`` inside a line is a newline).
"""

from __future__ import annotations

import argparse
import statistics

import common  # noqa: F401  (jinterp imported, HF offline, the tests directory on the path)
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jinterp

PROMPTS = [
    "The capital of France is", "When Mary and John went to the store, John gave a drink to",
    "After Alice and Bob finished lunch, Bob handed the keys to", "def fibonacci(n):\n    if n < 2:\n        return n",
    "In 1492, Columbus sailed the ocean blue. The", "Émilie a mangé 3 pommes 🍎 et",
    "The quick brown fox jumps over the lazy dog. " * 3, "import numpy as np\nx = np.arange(10)\nprint(x.sum())",
    "Once upon a time, in a land far away, there lived a", "The mitochondria is the powerhouse of the",
    "Q: What is 17 times 23?\nA:", "Water boils at 100 degrees Celsius at sea level, but at higher altitudes it",
    "Les chats sont des animaux", " ".join(["alpha", "beta", "gamma", "delta", "epsilon"] * 12),
    "In the beginning was the Word, and the Word was with God, and the Word was God. " * 4,
    "1, 1, 2, 3, 5, 8, 13, 21,", "SELECT name, count(*) FROM users GROUP BY name HAVING count(*) > 1;",
    "The theory of general relativity, published by Albert Einstein in 1915, describes gravity as",
    "<html><body><h1>Welcome</h1><p>This page", "Dear Sir or Madam,\n\nI am writing to inform you that",
    "日本の首都は", "Die Hauptstadt von Deutschland ist", "Step 1: preheat the oven to 180°C. Step 2:",
    "The Pythagorean theorem states that in a right triangle the square of the hypotenuse",
    "User: Can you summarise this article?\nAssistant:", "for i in range(10):\n    for j in range(i):\n       ",
    "Photosynthesis converts light energy into chemical energy, storing it in", "2 + 2 = 4, 3 + 3 = 6, 4 + 4 =",
    "She opened the door slowly, and there, in the dim light of the hallway, stood",
    "The stock market fell sharply on Monday after investors reacted to", "A B C D E F G H I J K L M N O",
    "Once more unto the breach, dear friends, once more; or close the wall up with our English dead. " * 3,
]
LAYOUTS = ("alone", "right-padded", "left-padded")


def padded(rows: list[list[int]], pad: int, left: bool, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = np.full((len(rows), length), pad, np.int32), np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        at = slice(length - len(row), length) if left else slice(0, len(row))
        tokens[i, at], mask[i, at] = row, True
    return tokens, mask


ALONE = 16  # prompts run alone: every length is a compilation of each model and dtype


def batches(rows: list[list[int]], pad: int, layout: str, size: int = 8):
    """(tokens, mask) batches of one layout: each of the first ``ALONE`` prompts alone, or batches of
    ``size`` prompts padded to the longest prompt (a vocabulary of 262,144 makes one batch of every
    prompt's float64 logits large)."""
    if layout == "alone":
        return [(np.asarray([row], np.int32), np.ones((1, len(row)), bool)) for row in rows[:ALONE]]
    length = max(map(len, rows))
    return [padded(rows[i:i + size], pad, layout == "left-padded", length) for i in range(0, len(rows), size)]


def errors(logits, referee, mask) -> list[float]:
    """Per prompt: the largest |logit - referee| over its real positions."""
    return [float(np.abs(logits[i][mask[i]].astype(np.float64) - referee[i][mask[i]]).max())
            for i in range(len(mask))]


def measure(name: str, prompts: list[str], dtypes: list[str]) -> list[tuple]:
    model, tokenizer = jinterp.load(name, progress=False)
    source = jinterp.loading.registry.locate(jinterp.loading.registry.MODELS[name])
    rows = [tokenizer.encode(p) for p in prompts]
    pad = tokenizer.pad_token_id or 0
    with jax.enable_x64(True):
        exact = model.astype(jnp.float64)
    found = []
    for dtype in dtypes:  # one dtype's models at a time, and one batch's float64 logits (262,144 words: large)
        ours = model.astype(dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                               dtype=getattr(torch, dtype)).eval()
        for layout in LAYOUTS:
            j_err, h_err = [], []
            for tokens, mask in batches(rows, pad, layout):
                with jax.enable_x64(True):
                    referee = np.asarray(jinterp.run(exact, tokens, attention_mask=mask)[0])
                logits = np.asarray(jinterp.run(ours, tokens, attention_mask=mask)[0].astype(jnp.float32))
                with torch.no_grad():
                    theirs = hf(torch.tensor(tokens, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()
                j_err += errors(logits, referee, mask)
                h_err += errors(theirs, referee, mask)
                del referee, logits, theirs
                print(".", end="", flush=True)
            found.append((name, dtype, layout, j_err, h_err))
        del hf, ours
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--prompts", help="a file of prompts, one per line (\\n for a newline inside one)")
    args = parser.parse_args()
    prompts = PROMPTS if args.prompts is None else [
        line.replace("\\n", "\n") for line in open(args.prompts, encoding="utf-8").read().splitlines() if line.strip()]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{len(prompts)} prompts x {len(LAYOUTS)} layouts ({', '.join(LAYOUTS)}); referee: jinterp in float64")
    print(f"{'model':<14} {'dtype':<9} {'layout':<13} {'jinterp worst':>13} {'HF worst':>9} {'ratio':>6} | "
          f"{'jinterp median':>14} {'HF median':>9} {'ratio':>6}")
    totals: dict = {}
    for name in args.models:
        for model, dtype, layout, ours, theirs in measure(name, prompts, args.dtypes):
            totals.setdefault((model, dtype), ([], []))
            totals[(model, dtype)][0].extend(ours)
            totals[(model, dtype)][1].extend(theirs)
            print("\r" + row(model, dtype, layout, ours, theirs))
    print("\nall layouts")
    for (model, dtype), (ours, theirs) in totals.items():
        print(row(model, dtype, "all", ours, theirs))


def row(model, dtype, layout, ours, theirs) -> str:
    worst, median = (max(ours), max(theirs)), (statistics.median(ours), statistics.median(theirs))
    return (f"{model:<14} {dtype:<9} {layout:<13} {worst[0]:13.2e} {worst[1]:9.2e} {worst[0] / worst[1]:6.2f} | "
            f"{median[0]:14.2e} {median[1]:9.2e} {median[0] / median[1]:6.2f}")


if __name__ == "__main__":
    main()
