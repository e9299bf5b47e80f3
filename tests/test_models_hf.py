"""Every family against HuggingFace transformers on the same random weights: logits and every
residual-stream state (HF hidden states) in float32, refereed by jinterp's own float64 run."""

import copy
import dataclasses

import numpy as np
import pytest
from conftest import random_tokens
from numerics import assert_refereed, max_error, run64

torch = pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")
from hf_models import FAMILIES

import jinterp

# jinterp vs transformers in float32, times the values' scale (their largest magnitude, at least 1):
# measured 3.3e-6 (gemma3's logits, 2.2e-5 at scale 6.7); 5e-7 to 1.8e-6 in the other families. The same
# bound holds jinterp's float32 to its float64 run: measured 3.7e-6 x scale (gemma3).
REL = 2e-5


def scaled(values) -> float:
    return REL * max(1.0, float(np.abs(values).max()))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_hidden_states_match_transformers(reference, family):
    hf, _, model = reference(family)
    tokens = random_tokens(model.cfg.d_vocab)
    with torch.no_grad():
        out = hf(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True)
    hidden = [h.numpy() for h in out.hidden_states]
    expected = out.logits.numpy() if model.cfg.unembed else out.last_hidden_state.numpy()

    sites = ["blocks.*.resid_pre", "ln_final.normalized" if model.cfg.unembed
             else f"blocks.{model.cfg.n_layers - 1}.normalized_resid_post"]
    logits, cache = jinterp.run(model, tokens, capture=sites)
    exact_logits, exact = run64(model, tokens, capture=sites)

    def check(ours, theirs, expected, what):
        np.testing.assert_allclose(ours, theirs, atol=scaled(theirs), rtol=0, err_msg=f"{family} {what}")
        assert_refereed(ours, theirs, expected, bound=scaled(expected), what=f"{family} {what}")

    assert logits.dtype == np.float32
    assert np.abs(expected).max() > 1.0, "reference outputs too small for the check to mean anything"  # 3.3 to 7.4
    check(np.asarray(logits), expected, exact_logits, "logits")
    assert len(hidden) == model.cfg.n_layers + 1
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.resid_pre"
        check(np.asarray(cache[name]), hidden[layer], exact[name], name)
    if model.cfg.unembed:  # HF's last hidden state is the final norm's output
        ln = model.ln_final
        w, b = np.asarray(ln.w, np.float64), 0 if ln.b is None else np.asarray(ln.b, np.float64)
        name = "ln_final.normalized"
        check(np.asarray(cache[name]) * w + b, hidden[-1], exact[name] * w + b, name)
    else:  # BERT: the last block's output (its ln2 output) is the last hidden state
        name = f"blocks.{model.cfg.n_layers - 1}.normalized_resid_post"
        check(np.asarray(cache[name]), hidden[-1], exact[name], name)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_the_float64_referee_equals_transformers_in_float64(reference, family):
    """The referee itself: where transformers computes in float64 throughout (GPT-2 and BERT; its Llama,
    Gemma and NeoX code keep rotary angles, RMSNorm or softmax in float32), it gives jinterp's float64
    run to float64 rounding (measured 3.1e-15)."""
    hf, _, model = reference(family)
    tokens = random_tokens(model.cfg.d_vocab)
    with torch.no_grad():
        theirs = copy.deepcopy(hf).double()(torch.tensor(tokens, dtype=torch.long))
    theirs = (theirs.logits if model.cfg.unembed else theirs.last_hidden_state).numpy()
    assert theirs.dtype == np.float64
    assert max_error(run64(model, tokens)[0], theirs) < 1e-13


def test_sliding_window_matters_in_gemma3(reference):
    """The Gemma 3 test model has a window of 4 over 11 tokens, so local layers really are local."""
    hf, _, model = reference("gemma3")
    assert "local" in model.cfg.layer_types and model.cfg.sliding_window < 11
    global_only = dataclasses.replace(model, cfg=model.cfg.replace(layer_types=("global",) * model.cfg.n_layers))
    tokens = random_tokens(model.cfg.d_vocab)
    assert np.abs(np.asarray(model(tokens)) - np.asarray(global_only(tokens))).max() > 1e-2  # measured 9.7


# bfloat16 against float32, relative to the logits' scale: measured 0.020 (llama), 0.0096 (gpt2), 0.069 (gemma3,
# its sandwich norms), and argmax agreement 1.0, 1.0, 0.91 (2 of 22 positions flip in gemma3).
BF16_REL = {"llama": 0.12, "gpt2": 0.05, "gemma3": 0.35}


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
    assert np.abs(logits16 - logits32).max() < BF16_REL[family] * np.abs(logits32).max()
    assert np.mean(logits16.argmax(-1) == logits32.argmax(-1)) > 0.5  # a broken cast agrees at ~1/200
