"""Bad input gets a clear error naming the problem and the valid choices; nothing is silently wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY, random_tokens

import jinterp

TOKENS = random_tokens(TOY.d_vocab, (2, 6))


def test_edit_value_of_the_wrong_shape(toy):
    with pytest.raises(ValueError, match=r"Add vector at 'resid_pre' has shape \(35,\).*\(2, 6, 36\)"):
        jinterp.run(toy, TOKENS, edits=jinterp.Add("blocks.0.resid_pre", jnp.ones(35)))
    with pytest.raises(ValueError, match=r"Replace value at 'attn.z' has shape \(2, 6, 36\).*axes"):
        jinterp.run(toy, TOKENS, edits=jinterp.Replace("blocks.0.attn.z", jnp.ones((2, 6, 36))))


def test_edit_value_of_the_wrong_dtype(toy):
    with pytest.raises(TypeError, match="must be a float array, got dtype int32"):
        jinterp.run(toy, TOKENS, edits=jinterp.Replace("blocks.0.resid_pre", jnp.ones((2, 6, 36), jnp.int32)))
    with pytest.raises(TypeError, match="positions must be integer indices"):
        jinterp.Zero("blocks.0.resid_pre", positions=[1.5])


def test_head_and_position_indices(toy):
    with pytest.raises(ValueError, match=r"head 6 is out of range: there are 6 heads"):
        jinterp.run(toy, TOKENS, edits=jinterp.Zero("blocks.0.attn.z", heads=[6]))
    with pytest.raises(ValueError, match=r"head 2 is out of range: there are 2 kv heads"):
        jinterp.run(toy, TOKENS, edits=jinterp.Zero("blocks.0.attn.v", heads=[2]))
    with pytest.raises(ValueError, match="has no 'head' axis"):
        jinterp.run(toy, TOKENS, edits=jinterp.Zero("blocks.0.resid_pre", heads=[0]))
    with pytest.raises(ValueError, match=r"position 6 is out of range: there are 6 positions"):
        jinterp.run(toy, TOKENS, edits=jinterp.Zero("blocks.0.resid_pre", positions=[6]))


def test_tokens_outside_the_vocabulary(toy):
    bad = TOKENS.copy()
    bad[1, 3] = TOY.d_vocab
    with pytest.raises(ValueError, match=r"Token id 53 at \[batch 1, position 3\].*valid ids 0..52"):
        jinterp.run(toy, bad)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match="Token id -1"):
        toy(bad)


def test_out_of_vocabulary_under_jit_is_nan_not_a_clamped_token(toy):
    """Inside jit the ids cannot be checked eagerly; they embed as NaN instead of silently clamping."""
    bad = jnp.asarray(TOKENS).at[0, 2].set(TOY.d_vocab + 5)
    logits = jax.jit(lambda t: toy.forward(t)[0])(bad)
    assert np.isnan(np.asarray(logits[0, 2:])).all() and np.isfinite(np.asarray(logits[1])).all()


def test_token_shapes_and_dtypes(toy):
    with pytest.raises(ValueError, match=r"\[batch, seq\].*tokens\[None\]"):
        toy(TOKENS[0])
    with pytest.raises(TypeError, match="integer ids"):
        toy(TOKENS.astype(np.float32))
    with pytest.raises(ValueError, match=r"Sequence length 25 exceeds.*n_ctx=24"):
        toy(np.zeros((1, 25), np.int32))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), tokens have \(2, 6\)"):
        toy(TOKENS, attention_mask=np.ones((2, 5)))
    with pytest.raises(ValueError, match="no token-type embeddings"):
        toy(TOKENS, token_type_ids=np.zeros_like(TOKENS))


def test_not_an_intervention(toy):
    with pytest.raises(TypeError, match=r"Expected an Intervention \(Replace, Add"):
        jinterp.run(toy, TOKENS, edits=[{"site": "blocks.0.resid_pre"}])


def test_unknown_site_kind(toy):
    # A kind jinterp does not know may be a site of a wrapped model (jinterp.byo): checked when run.
    message = r"Unknown site 'blocks\.0\.resid_pr'.*Closest valid names: blocks\.0\.resid_pre"
    with pytest.raises(ValueError, match=message):
        jinterp.run(toy, TOKENS, edits=jinterp.Add("blocks.0.resid_pr", jnp.ones(3)))
    with pytest.raises(ValueError, match="outside the blocks and has no layer"):
        jinterp.Zero("blocks.0.embed")


@pytest.mark.parametrize("changes, message", [
    (dict(n_kv_heads=4), "must be a positive multiple of n_kv_heads=4"),
    (dict(act="swiglu"), r"Unknown activation 'swiglu'; valid choices: 'relu', 'gelu', 'gelu_tanh', 'silu'"),
    (dict(norm="rmsnorm"), r"Unknown norm 'rmsnorm'.*Did you mean 'rms'"),
    (dict(rotary_dim=5), "rotary_dim=5 must be even"),
    (dict(layer_types=("local",) * 3), "need a positive sliding_window"),
    (dict(layer_types=("global",)), "layer_types has 1 entries for n_layers=3"),
    (dict(d_model=0), "d_model must be a positive int"),
    (dict(banana=1), r"Unknown Config field\(s\) \['banana'\]"),
])
def test_config_errors(changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TOY.replace(**changes)
