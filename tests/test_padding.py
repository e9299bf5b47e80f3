"""Left or right padding with an attention mask: real tokens get the unpadded results, every family."""

import numpy as np
import pytest
from conftest import random_tokens
from numerics import assert_refereed, run64

import jinterp

SITES = ["blocks.*.resid_post", "blocks.*.attn.z"]


def pad(tokens: np.ndarray, n: int, side: str, pad_id: int = 0):
    padding = np.full((tokens.shape[0], n), pad_id, tokens.dtype)
    real = np.ones_like(tokens, bool)
    if side == "left":
        return np.concatenate([padding, tokens], 1), np.concatenate([np.zeros_like(padding, bool), real], 1)
    return np.concatenate([tokens, padding], 1), np.concatenate([real, np.zeros_like(padding, bool)], 1)


def close(actual, expected, message=""):
    """Equal up to float32 rounding of differently shaped computations: 2e-6 of the values' scale. Measured:
    2.1e-7 x scale (BERT), 0 in the other families."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, atol=2e-6 * scale, rtol=0, err_msg=message)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox", "bert"])
def test_padded_rows_equal_unpadded_runs(reference, family, side):
    _, _, model = reference(family)
    short = random_tokens(model.cfg.d_vocab, (1, 7), seed=1)
    long = random_tokens(model.cfg.d_vocab, (1, 10), seed=2)
    padded, mask = pad(short, 3, side, pad_id=5)
    batch = np.concatenate([padded, long])
    batch_mask = np.concatenate([mask, np.ones_like(long, bool)])

    out, cache = jinterp.run(model, batch, capture=SITES, attention_mask=batch_mask)
    alone_short, cache_short = jinterp.run(model, short, capture=SITES)
    alone_long, _ = jinterp.run(model, long)

    real = mask[0]
    close(np.asarray(out[0])[real], np.asarray(alone_short[0]))
    close(np.asarray(out[1]), np.asarray(alone_long[0]))
    for name in cache:
        close(np.asarray(cache[name][0])[real], np.asarray(cache_short[name][0]), f"{family} {side}: {name}")
    assert np.isfinite(np.asarray(out)).all(), "padding positions must stay finite (no NaN from empty rows)"


def test_padding_matches_transformers_right_padded(reference):
    """Right padding with HF's own mask gives HF's logits at the real tokens (HF positions are arange)."""
    import torch

    hf, _, model = reference("llama")
    tokens, mask = pad(random_tokens(model.cfg.d_vocab, (2, 8), seed=3), 4, "right")
    mask[1, 6:] = False
    with torch.no_grad():
        as_torch = lambda x: torch.tensor(x, dtype=torch.long)
        expected = hf(as_torch(tokens), attention_mask=as_torch(mask)).logits
    ours, theirs = np.asarray(model(tokens, attention_mask=mask))[mask], expected.numpy()[mask]
    exact = run64(model, tokens, attention_mask=mask)[0][mask]
    bound = 2e-5 * np.abs(theirs).max()  # as tests/test_models_hf.py; measured 2.5e-6 (8e-7 x scale)
    np.testing.assert_allclose(ours, theirs, atol=bound, rtol=0)
    assert_refereed(ours, theirs, exact, bound=bound, what="llama, right-padded")
