"""Long sequences in bounded memory: attention a chunk of queries at a time, and blocks recomputed in
the backward pass, change no value (benchmarks/long_prompt.py measures the memory they save).

Both switch on by size (``layers.QUERY_CHUNK`` queries, ``transformer.RECOMPUTE_TOKENS`` tokens); the
tests lower the thresholds so that a small model crosses them, and compare with the plain computation.
"""

import jax
import numpy as np
import pytest
from conftest import TOY

import jinterp
from jinterp import attribution
from jinterp.models import layers, transformer

# Sliding-window layers and grouped-query attention, so that every mask and head layout is chunked too.
CFG = TOY.replace(n_ctx=64, layer_types=("local", "global", "local"), sliding_window=5)
SEQ = 37  # not a multiple of the chunk: the last chunk is padded


@pytest.fixture(scope="module")
def model():
    return jinterp.Transformer.init(CFG, jax.random.key(3), std=0.3)


def tokens_and_mask(seed: int = 0):
    tokens = np.random.default_rng(seed).integers(0, CFG.d_vocab, (2, SEQ)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :6] = 0  # the second row left-padded
    return tokens, mask


def metric(logits):
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


def test_attention_in_chunks_of_queries_equals_attention_at_once(model, monkeypatch):
    tokens, mask = tokens_and_mask()
    whole, whole_cache = jinterp.run(model, tokens, attention_mask=mask, capture="blocks.*.attn.z")
    monkeypatch.setattr(layers, "QUERY_CHUNK", 8)  # 5 chunks of 8 queries, the last with 3
    chunked, chunked_cache = jinterp.run(model, tokens, attention_mask=mask, capture="blocks.*.attn.z")
    # Measured 0 (each query's scores, softmax and sum are computed alike); another program that happens
    # to agree bit for bit: 8 eps32 x scale (tests/README.md), room for a different kernel on the smaller product.
    scale = float(np.abs(np.asarray(whole)).max())
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=0,
                               atol=8 * np.finfo(np.float32).eps * scale)
    for name in whole_cache:
        z = np.asarray(whole_cache[name])
        np.testing.assert_allclose(np.asarray(chunked_cache[name]), z, rtol=0,
                                   atol=8 * np.finfo(np.float32).eps * float(np.abs(z).max()), err_msg=name)


def test_recomputing_blocks_and_chunks_in_the_backward_changes_no_gradient(model, monkeypatch):
    tokens, mask = tokens_and_mask(1)
    corrupted = tokens.copy()
    corrupted[:, -3] = (corrupted[:, -3] + 1) % CFG.d_vocab
    plain = attribution.attribution_patching(model, tokens, corrupted, metric, "z", attention_mask=mask)
    monkeypatch.setattr(layers, "QUERY_CHUNK", 8)
    monkeypatch.setattr(transformer, "RECOMPUTE_TOKENS", 1)
    recomputed = attribution.attribution_patching(model, tokens, corrupted, metric, "z", attention_mask=mask)
    assert np.abs(np.asarray(plain)).max() > 1e-3  # the corruption matters
    # Measured 0 on values up to 4.1; the recomputed forward may fuse differently: 8 eps32 x scale.
    scale = float(np.abs(np.asarray(plain)).max())
    np.testing.assert_allclose(np.asarray(recomputed), np.asarray(plain), atol=8 * np.finfo(np.float32).eps * scale,
                               rtol=0)
