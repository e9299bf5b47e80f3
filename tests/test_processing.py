"""TransformerLens-style weight processing keeps next-token probabilities and does what it says."""

import jax
import numpy as np
import pytest
from conftest import random_tokens
from hf_models import FAMILIES
from numerics import float64

import jinterp

DECODERS = [f for f in FAMILIES if f != "bert"]


@pytest.mark.parametrize("family", DECODERS)
def test_processing_keeps_probabilities(reference, family):
    _, _, model = reference(family)
    processed = jinterp.process_weights(model)
    tokens = random_tokens(model.cfg.d_vocab)
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(processed(tokens), -1)),
                               np.asarray(jax.nn.softmax(model(tokens), -1)), atol=1e-5, rtol=0)  # measured 1.1e-6
    # In float64 the processing is exact up to float64 rounding: float32's rounding cannot hide an error.
    with jax.enable_x64(True):
        model64 = float64(model)
        exact, processed64 = (np.asarray(jax.nn.softmax(m(tokens), -1))
                              for m in (model64, jinterp.process_weights(model64)))
    np.testing.assert_allclose(processed64, exact, atol=2e-14, rtol=0)  # measured 2.1e-15


def test_each_step_does_what_it_says(reference):
    _, _, model = reference("gpt2")
    processed = jinterp.process_weights(model)
    # Folded norms are set to ones and zeros: exactly.
    assert (np.asarray(processed.blocks.ln1.w) == 1).all() and not np.asarray(processed.blocks.ln1.b).any()
    assert (np.asarray(processed.ln_final.w) == 1).all()
    # Centred in float32: measured 6.6e-9, 6.3e-9 and 3.4e-9.
    assert np.abs(np.asarray(processed.W_E).mean(-1)).max() < 5e-8
    assert np.abs(np.asarray(processed.blocks.attn.W_O).mean(-1)).max() < 5e-8
    assert np.abs(np.asarray(processed.W_U).mean(-1)).max() < 5e-8
    assert not np.asarray(processed.blocks.attn.b_V).any()
    assert processed.cfg.tied_embeddings is False  # folding ln_final unties the unembedding
    # The processed model still runs every site, e.g. the normalized values are unchanged.
    tokens = random_tokens(model.cfg.d_vocab)
    _, a = jinterp.run(model, tokens, capture=["blocks.1.ln1.normalized"])
    _, b = jinterp.run(processed, tokens, capture=["blocks.1.ln1.normalized"])
    np.testing.assert_allclose(np.asarray(a["blocks.1.ln1.normalized"]), np.asarray(b["blocks.1.ln1.normalized"]),
                               atol=2e-5, rtol=0)  # measured 1.7e-6


def test_gqa_value_biases_fold_per_query_head(reference):
    _, _, model = reference("qwen2")  # 6 query heads over 2 kv heads, with value biases
    folded = jinterp.process_weights(model, fold_ln=False, center_writing_weights=False, center_unembed=False)
    tokens = random_tokens(model.cfg.d_vocab)
    np.testing.assert_allclose(np.asarray(folded(tokens)), np.asarray(model(tokens)), atol=2e-5, rtol=0)  # 2.2e-6


def test_options_that_cannot_apply_are_refused_when_asked_for(reference):
    _, _, llama = reference("llama")
    with pytest.raises(ValueError, match="center_writing_weights=True does not apply.*RMSNorm"):
        jinterp.process_weights(llama, center_writing_weights=True)
    _, _, bert = reference("bert")
    with pytest.raises(ValueError, match="fold_ln=True does not apply"):
        jinterp.process_weights(bert, fold_ln=True)
    assert jinterp.process_weights(bert) is not None  # defaults apply only what is valid


def test_a_logit_soft_cap_keeps_the_unembedding_uncentred(reference):
    """Gemma 2 caps its logits with tanh, which does not commute with shifting them: center_unembed is refused
    when asked for and skipped by default (the default processing keeps probabilities, tested above)."""
    _, _, gemma2 = reference("gemma2")
    with pytest.raises(ValueError, match="center_unembed=True does not apply.*soft cap"):
        jinterp.process_weights(gemma2, center_unembed=True)
