"""QK/OV circuits, composition scores, copying scores and direct paths against brute force: dense
matrices, and the attention scores and head outputs the forward itself computes, on random models of
every decoder family (grouped-query attention included)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY

import jinterp
from jinterp import qkov

FAMILIES = {
    "llama_gqa": TOY,  # rotary on 6 of 7 head dims, 6 query heads over 2 kv heads, RMSNorm
    "gpt2": jinterp.Config(d_model=24, n_layers=3, n_heads=4, d_head=6, d_mlp=32, d_vocab=41, n_ctx=16,
                           qkv_bias=True, out_bias=True, mlp_bias=True),
    "neox": jinterp.Config(d_model=24, n_layers=2, n_heads=4, d_head=6, d_mlp=32, d_vocab=41, n_ctx=16,
                           parallel=True, positional="rotary", rotary_dim=4),
    "gemma3": jinterp.Config(d_model=24, n_layers=3, n_heads=4, n_kv_heads=1, d_head=8, d_mlp=32, d_vocab=41,
                             n_ctx=16, norm="rms", norm_placement="sandwich", qk_norm=True, positional="rotary",
                             layer_types=("local", "global", "local"), sliding_window=4, rope_theta_local=100.0,
                             act="gelu_tanh", gated_mlp=True, embed_scale=math.sqrt(24.0)),
    "attn_only": jinterp.Config(d_model=16, n_layers=3, n_heads=2, d_head=8, d_vocab=20, n_ctx=12, attn_only=True,
                                norm=None, positional="learned"),
    "bert": jinterp.Config(d_model=24, n_layers=2, n_heads=4, d_head=6, d_mlp=32, d_vocab=41, n_ctx=16,
                           norm_placement="post", causal=False, unembed=False, embed_norm=True, n_token_types=2,
                           qkv_bias=True, out_bias=True, mlp_bias=True),
}


def _model(name):
    return jinterp.Transformer.init(FAMILIES[name], jax.random.key(1), std=0.3)


def _dense64(f):
    return np.asarray(f.dense(), np.float64)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_circuits_are_the_products_of_the_head_weights_gqa_mapped(name):
    model = _model(name)
    cfg, attn = model.cfg, jinterp.process_weights(model).blocks.attn
    qk, ov = qkov.qk_circuit(model), qkov.ov_circuit(model)
    assert qk.shape == ov.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    group = cfg.n_heads // cfg.n_kv_heads
    # Query head h's kv head, gathered one head at a time (no shared indexing code with qkov).
    W_Q = np.asarray(attn.W_Q)
    W_K = np.stack([np.stack([np.asarray(attn.W_K[layer, h // group]) for h in range(cfg.n_heads)])
                    for layer in range(cfg.n_layers)])
    W_V = np.stack([np.stack([np.asarray(attn.W_V[layer, h // group]) for h in range(cfg.n_heads)])
                    for layer in range(cfg.n_layers)])
    if cfg.qk_norm:
        W_Q, W_K = W_Q * np.asarray(attn.q_norm.w)[:, None, None], W_K * np.asarray(attn.k_norm.w)[:, None, None]
    # The same float32 matmuls of the same matrices: equal.
    np.testing.assert_array_equal(qk.dense(), jnp.asarray(W_Q) @ jnp.swapaxes(jnp.asarray(W_K), -1, -2))
    np.testing.assert_array_equal(ov.dense(), jnp.asarray(W_V) @ attn.W_O)
    np.testing.assert_array_equal(qk[cfg.n_layers - 1, cfg.n_heads - 1].dense(), qk.dense()[-1, -1])


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "neox", "attn_only", "bert"])
def test_qk_circuit_at_each_offset_gives_the_attention_scores(name):
    """scores[b, h, i, j] = attn_scale * n_i W_QK(i - j) n_j^T on the processed model, whose heads read
    the normalised residual n (ln1.normalized) with the norm weights folded in; biases are zero here."""
    model = jinterp.process_weights(_model(name))
    cfg = model.cfg
    tokens = np.random.default_rng(0).integers(0, cfg.d_vocab, (2, 9)).astype(np.int32)
    read = "resid_pre" if cfg.norm is None or cfg.norm_placement == "post" else "ln1.normalized"
    _, cache = jinterp.run(model, tokens, capture=[f"blocks.*.{read}", "blocks.*.attn.scores",
                                                   "blocks.*.attn.pattern", "blocks.*.attn.result"])
    n = np.asarray(cache.stack(read), np.float64)  # [L, b, pos, D]
    scores = np.asarray(cache.stack("attn.scores"), np.float64)
    rotary = cfg.positional == "rotary"
    worst = 0.0
    if not cfg.causal:  # every pair of positions, one QK circuit (learned positions)
        qk = _dense64(qkov.qk_circuit(model, process=False))
        expected = cfg.attn_scale * np.einsum("lbid,lhde,lbje->lbhij", n, qk, n)
        worst = np.abs(expected - scores).max()
    for offset in range(tokens.shape[1]) if cfg.causal else ():
        qk = _dense64(qkov.qk_circuit(model, offset=offset if rotary else None, process=False))  # [L, H, D, D]
        i = np.arange(offset, tokens.shape[1])
        expected = cfg.attn_scale * np.einsum("lbid,lhde,lbie->lbhi", n[:, :, i], qk, n[:, :, i - offset])
        worst = max(worst, np.abs(expected - scores[:, :, :, i, i - offset]).max())
    # float32 forward vs float64 brute force, measured 2.4e-7, 2.6e-7, 2.8e-7, 2.2e-7, 2.7e-7 x scale
    # (llama_gqa, gpt2, neox, attn_only, bert)
    assert worst < 2e-6 * np.abs(scores[scores > -1e30]).max()
    # OV: each head writes sum_j pattern[i, j] n_j W_OV.
    ov = _dense64(qkov.ov_circuit(model, process=False))
    pattern = np.asarray(cache.stack("attn.pattern"), np.float64)
    expected = np.einsum("lbhij,lbjd,lhde->lbihe", pattern, n, ov)
    result = np.asarray(cache.stack("attn.result"), np.float64)
    np.testing.assert_allclose(result, expected, atol=2e-6 * np.abs(result).max(), rtol=0)  # measured <= 2.0e-7 x scale


def test_rotary_offset_zero_is_the_plain_product_and_other_offsets_differ():
    model = _model("llama_gqa")
    plain, zero, three = (qkov.qk_circuit(model, offset=o) for o in (None, 0, 3))
    np.testing.assert_array_equal(zero.dense(), plain.dense())  # W_Q @ I is exact
    assert float(jnp.abs(three.dense() - plain.dense()).max()) > 0.1 * float(jnp.abs(plain.dense()).max())  # 0.94
    R = np.asarray(qkov.rotation(model, 3, layer=0), np.float64)
    np.testing.assert_allclose(R @ R.T, np.eye(TOY.d_head), atol=1e-6)  # a rotation; measured 5.1e-8
    assert R[-1, -1] == 1.0  # the dimension past rotary_dim is not rotated
    with pytest.raises(ValueError, match="offset= applies to rotary models"):
        qkov.qk_circuit(_model("gpt2"), offset=1)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "gemma3"])
def test_composition_scores_equal_dense_products_for_every_pair(name):
    model = _model(name)
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    ov, qk = _dense64(qkov.ov_circuit(model)), _dense64(qkov.qk_circuit(model))
    fro = lambda m: np.linalg.norm(m, axis=(-2, -1))  # noqa: E731
    for kind, receiver in (("q", qk), ("k", np.swapaxes(qk, -1, -2)), ("v", ov)):
        ours = np.asarray(qkov.composition_scores(model, kind))
        assert ours.shape == (L, H, L, H)
        product = np.einsum("lhde,mkef->lhmkdf", ov, receiver)
        dense = fro(product) / (fro(ov)[:, :, None, None] * fro(receiver)[None, None])
        later = np.arange(L)[:, None, None, None] < np.arange(L)[None, None, :, None]
        later = np.broadcast_to(later, ours.shape)
        assert np.isnan(ours[~later]).all()
        np.testing.assert_allclose(ours[later], dense[later], atol=2e-6, rtol=0)  # scores 0.12-0.31; measured 7.0e-8


def test_k_composition_by_construction():
    # test_induction's construction: layer-0 head 0 writes e1, e2, exactly what layer-1 head 0's keys read.
    cfg = jinterp.Config(d_model=4, n_layers=2, n_heads=2, d_head=2, d_vocab=5, n_ctx=8, attn_only=True, norm=None)
    model = jinterp.Transformer.init(cfg, jax.random.key(0))
    e = np.eye(4, dtype=np.float32)
    low, high = e[:, :2], e[:, 2:]
    a = model.blocks.attn
    weights = dict(W_Q=a.W_Q.at[1, 0].set(low), W_K=a.W_K.at[1, 0].set(low), W_V=a.W_V.at[0, 0].set(high).at[0, 1]
                   .set(low), W_O=a.W_O.at[0, 0].set(low.T).at[0, 1].set(high.T))
    model = eqx.tree_at(lambda m: [getattr(m.blocks.attn, k) for k in weights], model, list(weights.values()))
    k = np.asarray(qkov.composition_scores(model, "k", process=False))
    assert k[0, 0, 1, 0] == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert k[0, 1, 1, 0] == 0.0  # the core B1 A2 is exactly zero


def test_copying_score_against_dense_eigenvalues_and_by_construction():
    model = _model("attn_only")
    ours = np.asarray(qkov.copying_score(model))
    pm = jinterp.process_weights(model)
    ov = _dense64(qkov.ov_circuit(pm, process=False))
    W_E, W_U = np.asarray(pm.W_E, np.float64), np.asarray(pm.W_unembed, np.float64)
    for layer in range(3):
        for h in range(2):
            eig = np.linalg.eigvals(W_E @ ov[layer, h] @ W_U)
            assert ours[layer, h] == pytest.approx(eig.sum().real / np.abs(eig).sum(), abs=1e-6)  # measured 5.5e-8
    # A head that maps each token's embedding onto its own unembedding copies (+1), its negation suppresses (-1).
    cfg = jinterp.Config(d_model=8, n_layers=1, n_heads=2, d_head=4, d_vocab=8, n_ctx=4, attn_only=True, norm=None,
                         positional=None)
    model = jinterp.Transformer.init(cfg, jax.random.key(0))
    half = np.eye(8, dtype=np.float32)[:, :4]
    model = eqx.tree_at(lambda m: (m.W_E, m.W_U, m.blocks.attn.W_V, m.blocks.attn.W_O), model,
                        (jnp.eye(8), jnp.eye(8), jnp.stack([jnp.stack([half, half])]),
                         jnp.stack([jnp.stack([2 * half.T, -half.T])])))
    np.testing.assert_allclose(np.asarray(qkov.copying_score(model, process=False)), [[1.0, -1.0]], atol=1e-6)


def test_direct_paths_are_the_top_rows_of_the_dense_products():
    model = _model("gpt2")
    pm = jinterp.process_weights(model)
    tokens = jnp.asarray([0, 5, 17])
    values, ids = qkov.direct_path(model, tokens, k=4)
    dense = np.asarray(pm.W_E[tokens] @ pm.W_unembed)
    np.testing.assert_array_equal(ids, np.argsort(-dense, -1)[:, :4])
    ov = _dense64(qkov.ov_circuit(pm, process=False))[2, 1]
    values, ids = qkov.direct_path(model, tokens, layer=2, head=1, k=4)
    dense = np.asarray(pm.W_E[tokens], np.float64) @ ov @ np.asarray(pm.W_unembed, np.float64)
    np.testing.assert_array_equal(ids, np.argsort(-dense, -1)[:, :4])
    np.testing.assert_allclose(values, np.take_along_axis(dense, np.asarray(ids), -1),
                               atol=1e-6 * np.abs(dense).max())  # measured 1.0e-7 x scale
    with pytest.raises(ValueError, match="both layer= and head="):
        qkov.direct_path(model, tokens, layer=1)
