"""Every family against HuggingFace transformers on the same random weights: logits and every
residual-stream state (HF hidden states) within 1e-4 in float32."""

import dataclasses

import numpy as np
import pytest
from conftest import random_tokens

torch = pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")
from hf_models import FAMILIES

import jinterp

ATOL = 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_hidden_states_match_transformers(reference, family):
    hf, _, model = reference(family)
    tokens = random_tokens(model.cfg.d_vocab)
    with torch.no_grad():
        out = hf(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    expected = out.logits.numpy() if model.cfg.unembed else out.last_hidden_state.numpy()

    logits, cache = jinterp.run(model, tokens, capture=["blocks.*.resid_pre", "blocks.*.resid_post"])

    assert logits.dtype == np.float32
    assert np.abs(expected).max() > 1.0, "reference outputs too small for the check to mean anything"
    np.testing.assert_allclose(np.asarray(logits), expected, atol=ATOL, rtol=0)
    assert len(hidden) == model.cfg.n_layers + 1
    for layer in range(model.cfg.n_layers):
        np.testing.assert_allclose(np.asarray(cache[f"blocks.{layer}.resid_pre"]), hidden[layer], atol=ATOL, rtol=0,
                                   err_msg=f"{family} resid_pre of layer {layer}")
    if model.cfg.unembed:  # HF's last hidden state is the final norm's output
        _, final = jinterp.run(model, tokens, capture=["ln_final.normalized"])
        ln = model.ln_final
        normed = np.asarray(final["ln_final.normalized"]) * np.asarray(ln.w) + (0 if ln.b is None else np.asarray(ln.b))
        np.testing.assert_allclose(normed, hidden[-1], atol=ATOL, rtol=0)
    else:  # BERT: the last block's output (its ln2 output) is the last hidden state
        _, final = jinterp.run(model, tokens, capture=[f"blocks.{model.cfg.n_layers - 1}.normalized_resid_post"])
        np.testing.assert_allclose(np.asarray(final[f"blocks.{model.cfg.n_layers - 1}.normalized_resid_post"]),
                                   hidden[-1], atol=ATOL, rtol=0)


def test_sliding_window_matters_in_gemma3(reference):
    """The Gemma 3 test model has a window of 4 over 11 tokens, so local layers really are local."""
    hf, _, model = reference("gemma3")
    assert "local" in model.cfg.layer_types and model.cfg.sliding_window < 11
    global_only = dataclasses.replace(model, cfg=model.cfg.replace(layer_types=("global",) * model.cfg.n_layers))
    tokens = random_tokens(model.cfg.d_vocab)
    assert np.abs(np.asarray(model(tokens)) - np.asarray(global_only(tokens))).max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_bfloat16_tracks_float32(reference, family):
    _, _, model = reference(family)
    tokens = random_tokens(model.cfg.d_vocab)
    low = model.astype("bfloat16")
    assert low.cfg.dtype == "bfloat16" and low.W_E.dtype == np.dtype("bfloat16")
    logits16 = np.asarray(low(tokens)).astype(np.float32)
    logits32 = np.asarray(model(tokens))
    assert low(tokens).dtype == np.dtype("bfloat16")
    # bf16 keeps ~3 significant digits; errors compound over layers.
    assert np.abs(logits16 - logits32).max() < 0.1 * np.abs(logits32).max()
    assert np.mean(logits16.argmax(-1) == logits32.argmax(-1)) > 0.8
