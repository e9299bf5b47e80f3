"""Varied strings for tokenizer checks: prose, unicode, emoji, whitespace runs, code, numbers."""

from __future__ import annotations

import random

BASE = [
    "The capital of France is", "When Mary and John went to the store, John gave a drink to",
    "Hello, world!", "  leading spaces", "trailing spaces   ", "tabs\tand\nnewlines\n\n\nmany",
    "multiple     spaces    inside", "\n", " ", "", "a", "I'm sure you'll see they've done it, didn't they?",
    "café naïve façade résumé coöperate", "Ελληνικά κείμενο", "Русский текст с пунктуацией.",
    "中文文本，包含标点。", "日本語のテキストです。", "한국어 텍스트", "العربية نص", "עברית טקסט", "हिन्दी पाठ",
    "emoji 😀😃😄 and 👩‍👩‍👧‍👦 family and flags 🇫🇷🇯🇵", "🤖🧠💡", "math ∑∫∂√∞ ≤ ≥ ≠ ± × ÷",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>", "SELECT * FROM users WHERE id = 42;",
    "{\"key\": [1, 2.5, -3e10, null, true]}", "https://example.org/path?q=1&r=two#frag",
    "1234567890", "3.14159 2.71828 -0.0001 1e-9 6.022e23", "$1,234.56 and €99,99 and ¥1000",
    "phone: +1 (555) 123-4567", "2024-11-30T12:34:56Z", "0x1F 0b1010 0o777", "  12  345   6789",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier", "ALL CAPS SHOUTING!!!",
    "repeated repeated repeated repeated", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "!!!???...,,,;;;:::",
    "quotes “curly” ‘single’ «guillemets» „low“", "dashes – — ‒ and ellipsis …", "zero\u200bwidth\u200bspace",
    "combining e\u0301 vs é", "\u00a0non-breaking\u00a0spaces\u00a0", "<|im_start|>user\nhi<|im_end|>",
    "<bos>text after a special token", "[CLS] bert style [SEP]", "Mixed 123abc456def 7g8h9i",
]
WORDS = ["the", "model", "attention", "head", "residual", "stream", "Paris", "London", "東京", "naïve", "🙂",
         "42", "3.5", "x_1", "foo()", "\n", "\t", "  ", "ß", "İstanbul", "Ω", "don't", "GPT-2", "--", "##"]


def varied_strings(n: int = 240, seed: int = 0) -> list[str]:
    """The base strings plus random mixtures of words, spacing and punctuation (deterministic)."""
    rng = random.Random(seed)
    out = list(BASE)
    while len(out) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        seps = [rng.choice([" ", " ", " ", "", "  ", "\n", ", ", ". "]) for _ in words]
        out.append("".join(w + s for w, s in zip(words, seps)))
    return out
