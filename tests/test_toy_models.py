"""Toy configurations (attention-only, no layer norm, no positions) build, run, capture and train."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jinterp

ATTN_ONLY = jinterp.Config(d_model=32, n_layers=2, n_heads=4, d_head=8, d_vocab=17, n_ctx=12, attn_only=True,
                           norm=None, positional="learned")
NO_NORM_MLP = jinterp.Config(d_model=24, n_layers=1, n_heads=3, d_head=8, d_mlp=48, d_vocab=13, n_ctx=6,
                             norm=None, positional=None, act="relu", unembed_bias=True, qkv_bias=True, out_bias=True,
                             mlp_bias=True)


def test_attention_only_sites_and_shapes():
    model = jinterp.Transformer.init(ATTN_ONLY, jax.random.key(0))
    names = jinterp.sites(model)
    assert "blocks.0.mlp_out" not in names and "blocks.0.resid_mid" not in names and "blocks.0.ln1.scale" not in names
    assert "pos_embed" in names and "ln_final.normalized" not in names
    tokens = jnp.arange(10)[None] % 17
    logits, cache = jinterp.run(model, tokens, capture="all")
    assert logits.shape == (1, 10, 17)
    # Attention-only, no norm: the residual stream is exactly the sum of its parts.
    resid = cache["embed"] + cache["pos_embed"] + cache["blocks.0.attn_out"] + cache["blocks.1.attn_out"]
    # The forward adds the parts in this order: the same float32 additions, the same bits.
    np.testing.assert_array_equal(np.asarray(cache["blocks.1.resid_post"]), np.asarray(resid))
    # Another program's matmul: measured 0; 8 eps32 x the logits' scale (0.009) allowed.
    np.testing.assert_allclose(np.asarray(logits), np.asarray(resid @ model.W_U), atol=1e-8, rtol=0)


def test_attn_result_sums_to_attn_out():
    model = jinterp.Transformer.init(NO_NORM_MLP, jax.random.key(1), std=0.3)
    _, cache = jinterp.run(model, jnp.arange(6)[None] % 13, capture=["blocks.0.attn.result", "blocks.0.attn_out"])
    total = cache["blocks.0.attn.result"].sum(2) + model.blocks.attn.b_O[0]
    np.testing.assert_allclose(np.asarray(total), np.asarray(cache["blocks.0.attn_out"]), atol=2e-6,
                               rtol=0)  # measured 1.8e-7


def test_a_toy_model_trains_with_optax():
    model = jinterp.Transformer.init(NO_NORM_MLP, jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (16, 6), 0, 13)
    targets = (tokens + 1) % 13  # learnable: next id
    optimizer = optax.adam(1e-2)
    state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(tokens), targets).mean()
        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, value

    first = None
    for _ in range(60):
        model, state, value = step(model, state)
        first = value if first is None else first
    assert float(value) < 0.2 * float(first)  # measured 2.0e-5 from 2.56


def test_first_layers_keeps_every_earlier_site():
    # Local and global layers alternate, so the cut must keep each layer's type and rotary base.
    cfg = jinterp.Config(d_model=24, n_layers=4, n_heads=3, d_head=8, d_mlp=40, d_vocab=29, n_ctx=16,
                         layer_types=("local", "global", "local", "global"), sliding_window=3, positional="rotary",
                         rope_theta_local=100.0)
    model = jinterp.Transformer.init(cfg, jax.random.key(1), std=0.3)
    tokens = np.random.default_rng(0).integers(0, 29, (2, 10))
    capture = ["embed"] + [f"blocks.*.{kind}" for kind in ("attn.rot_q", "attn.pattern", "mlp.post", "resid_post")]
    _, full = jinterp.run(model, tokens, capture=capture)
    cut = model.first_layers(3)
    assert cut.cfg.n_layers == 3 and cut.cfg.layer_types == ("local", "global", "local")
    _, part = jinterp.run(cut, tokens, capture=capture)
    assert len(part) == 1 + 4 * 3
    for name in part:
        np.testing.assert_array_equal(part[name], full[name], err_msg=name)
    assert not np.array_equal(part["blocks.2.resid_post"], full["blocks.3.resid_post"])
    with pytest.raises(ValueError, match=r"n in \[1, n_layers=4\]"):
        model.first_layers(5)
