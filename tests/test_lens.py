"""Residual-stream tools: decompositions sum to the residual, DLA sums to the logit difference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY, random_tokens

import jinterp
from jinterp import lens

GPT2ISH = jinterp.Config(d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=64, d_vocab=29, n_ctx=12, norm="layer",
                         positional="learned", qkv_bias=True, out_bias=True, mlp_bias=True)


@pytest.mark.parametrize("cfg", [TOY, GPT2ISH], ids=["rms-rotary-gqa", "layernorm-learned"])
def test_decomposition_and_direct_logit_attribution(cfg):
    model = jinterp.Transformer.init(cfg, jax.random.key(0), std=0.3)
    tokens = random_tokens(cfg.d_vocab, (2, 6))
    logits, cache = jinterp.run(model, tokens, capture=lens.site_names(model))
    parts, labels = lens.decompose_resid(model, cache)
    assert labels[0] == "embed" and labels[-1] == f"{cfg.n_layers - 1}_mlp_out"
    if cfg.out_bias:  # output biases write a constant the components leave out
        bias = model.blocks.attn.b_O.sum(0) + model.blocks.mlp.b_out.sum(0)
        parts = jnp.concatenate([parts, jnp.broadcast_to(bias, parts[:1].shape)])
    final = np.asarray(cache[f"blocks.{cfg.n_layers - 1}.resid_post"])
    # The components summed in another order than the forward's: measured 0; 8 eps32 x the scale (31) allowed.
    np.testing.assert_allclose(np.asarray(parts.sum(0)), final, atol=3e-5, rtol=0)

    directions = lens.logit_directions(model, [3, 5], [7, 1])  # one direction per example
    dla = lens.direct_logit_attribution(model, cache, parts, directions)
    expected = np.asarray([logits[0, -1, 3] - logits[0, -1, 7], logits[1, -1, 5] - logits[1, -1, 1]])
    norm_bias = 0 if model.ln_final.b is None else np.asarray(directions @ model.ln_final.b)
    np.testing.assert_allclose(np.asarray(dla.sum(0)) + norm_bias, expected, atol=5e-6, rtol=0)  # measured 4.8e-7


def test_head_results_sum_to_attn_out(toy):
    tokens = random_tokens(TOY.d_vocab, (2, 6))
    _, cache = jinterp.run(toy, tokens, capture=lens.site_names(toy))
    heads, labels = lens.stack_head_results(toy, cache)
    assert heads.shape == (TOY.n_layers * TOY.n_heads, 2, 6, TOY.d_model) and labels[7] == "L1H1"
    per_layer = heads.reshape(TOY.n_layers, TOY.n_heads, 2, 6, -1).sum(1)
    np.testing.assert_allclose(np.asarray(per_layer[1]), np.asarray(cache["blocks.1.attn_out"]), atol=2e-5,
                               rtol=0)  # measured 1.9e-6


def test_logit_lens_ends_at_the_logits(toy):
    tokens = random_tokens(TOY.d_vocab, (2, 6))
    logits, cache = jinterp.run(toy, tokens, capture=lens.site_names(toy))
    lensed = lens.logit_lens(toy, cache)
    assert lensed.shape == (TOY.n_layers + 1, 2, TOY.d_vocab)
    # Another program than the forward's: measured 0; 8 eps32 x the logits' scale (4.9) allowed.
    np.testing.assert_allclose(np.asarray(lensed[-1]), np.asarray(logits[:, -1]), atol=5e-6, rtol=0)
    accumulated, labels = lens.accumulated_resid(toy, cache)
    assert accumulated.shape[0] == TOY.n_layers + 1 and labels[-1] == "final"


def test_missing_sites_and_unsuitable_models(toy):
    _, cache = jinterp.run(toy, random_tokens(TOY.d_vocab, (1, 4)), capture=["embed"])
    with pytest.raises(KeyError, match=r"lacks 'blocks.0.attn_out'; run with capture=jinterp.lens.site_names\(model\)"):
        lens.decompose_resid(toy, cache)
    bert = jinterp.Transformer.init(jinterp.Config(d_model=16, n_layers=1, n_heads=2, d_head=8, d_mlp=16, d_vocab=9,
                                                   n_ctx=8, norm_placement="post", unembed=False, causal=False),
                                    jax.random.key(0))
    with pytest.raises(ValueError, match="needs a pre-norm decoder"):
        lens.decompose_resid(bert, cache)
