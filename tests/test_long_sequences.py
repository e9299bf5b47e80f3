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
from jinterp import attribution, patching
from jinterp.models import layers, transformer

# Sliding-window layers and grouped-query attention, so that every mask and head layout is chunked too.
CFG = TOY.replace(n_ctx=64, layer_types=("local", "global", "local"), sliding_window=5)
SEQ = 37  # not a multiple of the chunk: the last chunk is shorter


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
    monkeypatch.setattr(layers, "QUERY_CHUNK", 8)  # 5 chunks of 8 queries, the last with 5
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


def test_a_causal_chunk_reads_no_key_after_its_last_query(monkeypatch):
    """Keys after a chunk's last query are masked for all of it: attention skips them (NaN there
    reaches only the queries that may read them)."""
    monkeypatch.setattr(layers, "QUERY_CHUNK", 8)
    rng = np.random.default_rng(0)
    batch, seq, extra = 2, 20, 4  # 4 more key slots, not yet filled (as while decoding)
    q = rng.standard_normal((batch, seq, CFG.n_heads, CFG.d_head)).astype(np.float32)
    k, v = (rng.standard_normal((batch, seq + extra, CFG.n_kv_heads, CFG.d_head)).astype(np.float32) for _ in "kv")
    mask = np.arange(seq + extra)[None, None, :] <= np.arange(seq)[None, :, None]
    mask = np.broadcast_to(mask, (batch, seq, seq + extra))
    k[:, seq:], v[:, seq:] = np.nan, np.nan
    whole = layers.attend(q, k[:, :seq], v[:, :seq], mask[..., :seq], CFG, None)
    skipped = layers.attend(q, k, v, mask, CFG, 0)
    # Measured 1.2 eps32 x scale (shorter products, summed in another order): 8 eps32 x scale.
    scale = float(np.abs(np.asarray(whole)).max())
    np.testing.assert_allclose(np.asarray(skipped), np.asarray(whole), atol=8 * np.finfo(np.float32).eps * scale,
                               rtol=0)
    k[:, 8:seq] = np.nan  # keys of the second and third chunks' queries
    poisoned = np.asarray(layers.attend(q, k, v, mask, CFG, 0))
    assert np.isfinite(poisoned[:, :8]).all() and np.isnan(poisoned[:, 8:]).all()


def test_a_sweep_resumed_after_the_shared_prefix_is_unchanged_by_query_chunks(model, monkeypatch):
    """A sweep's patched runs attend to the base run's cached keys from the first differing token on:
    their query chunks start there, and skip the keys after each chunk's last query."""
    tokens, mask = tokens_and_mask(2)
    corrupted = tokens.copy()
    corrupted[:, 20] = (corrupted[:, 20] + 1) % CFG.d_vocab  # 20 shared positions, then 17 run per patch
    plain = patching.sweep(model, tokens, corrupted, metric, "z", attention_mask=mask, progress=False)
    monkeypatch.setattr(layers, "QUERY_CHUNK", 8)
    chunked = patching.sweep(model, tokens, corrupted, metric, "z", attention_mask=mask, progress=False)
    assert np.abs(np.asarray(plain)).max() > 1e-3  # the corruption matters
    # Measured 0; another program (smaller products): 8 eps32 x scale.
    scale = float(np.abs(np.asarray(plain)).max())
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), atol=8 * np.finfo(np.float32).eps * scale,
                               rtol=0)


def test_chunk_sizes_keep_few_programs_and_bounded_scores():
    """Chunks of at least MIN_QUERY_CHUNK queries, at most QUERY_CHUNK, QUERY_CHUNKS of them where those allow."""
    assert [layers.query_chunk(n) for n in (14, 256, 1024, 2048, 4096, 8192, 32768)] == [
        256, 256, 256, 256, 512, 512, 512]
