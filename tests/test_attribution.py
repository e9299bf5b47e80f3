"""Attribution patching against real patching; input attribution completeness."""

import jax
import numpy as np
import pytest
from conftest import LINEAR, TOY, corrupted_pair
from conftest import toy_metric as metric

import jinterp
from jinterp import attribution, patching

CLEAN, CORRUPT = corrupted_pair(1)


@pytest.mark.parametrize("site, per", [("resid_pre", "position"), ("mlp_out", "layer"), ("z", "head"),
                                       ("k", "head_position"), ("pattern", "head_position")])
def test_shapes_match_the_sweep(toy, site, per):
    estimate = attribution.attribution_patching(toy, CLEAN, CORRUPT, metric, site, per=per)
    swept = patching.sweep(toy, CLEAN, CORRUPT, metric, site, per=per, progress=False)
    assert estimate.shape == swept.shape


def test_exact_for_a_linear_metric_on_a_site_feeding_the_unembedding():
    """Attention-only, no norm: logits are linear in the final residual stream, so the first-order
    estimate of patching resid_post of the last layer is the patching result itself."""
    model = jinterp.Transformer.init(LINEAR, jax.random.key(0), std=0.3)
    clean, corrupt = CLEAN % 17, CORRUPT % 17
    estimate = attribution.attribution_patching(model, clean, corrupt, metric, "resid_post")
    swept = patching.sweep(model, clean, corrupt, metric, "resid_post", progress=False)
    base = float(metric(model(corrupt)))
    np.testing.assert_allclose(np.asarray(estimate[-1]), np.asarray(swept[-1]) - base, atol=2e-6,
                               rtol=0)  # measured 2.6e-7
    assert np.abs(np.asarray(estimate[-1])).max() > 0.02  # not a comparison of zeros: measured 0.11


def test_noising_direction(toy):
    estimate = attribution.attribution_patching(toy, CLEAN, CORRUPT, metric, "z", direction="noise")
    assert estimate.shape == (TOY.n_layers, TOY.n_heads) and np.isfinite(np.asarray(estimate)).all()


def test_correlates_with_patching_on_smollm2_ioi(named):
    """The issue's check: attribution patching vs activation patching across heads (z) on
    SmolLM2-135M IOI prompts; the correlation is printed and must be high."""
    from test_patching import answer_metric

    model, tokenizer, _, _ = named("smollm2-135m")
    pairs = [(" Mary", " John"), (" Tom", " James"), (" Anna", " Lisa")]
    clean = np.array([tokenizer.encode(f"When{a} and{b} went to the store,{b} gave a drink to") for a, b in pairs])
    corrupt = np.array([tokenizer.encode(f"When{a} and{b} went to the store,{a} gave a drink to") for a, b in pairs])
    answers = np.array([(tokenizer.encode(a)[0], tokenizer.encode(b)[0]) for a, b in pairs])
    score = answer_metric(answers)
    estimate = attribution.attribution_patching(model, clean, corrupt, score, "z", logit_positions=[-1])
    swept = patching.sweep(model, clean, corrupt, score, "z", logit_positions=[-1], progress=False)
    base = float(score(model(corrupt)))
    correlation = np.corrcoef(np.asarray(estimate).ravel(), np.asarray(swept).ravel() - base)[0, 1]
    print(f"attribution vs activation patching, heads (z), SmolLM2 IOI: r = {correlation:.3f}")
    assert correlation > 0.8  # measured 0.982


def test_integrated_gradients_completeness(named):
    """Attributions sum to metric(input) - metric(baseline) within 1%. Baseline: " the" everywhere
    except the first token, kept as it is: interpolating the first token's embedding (the model's
    attention sink, with massive activations) makes the path rough, and an all-zero embedding is
    singular for RMSNorm."""
    model, tokenizer, _, _ = named("smollm2-135m")
    tokens = np.array([tokenizer.encode("When Mary and John went to the store, John gave a drink to")])
    mary, john = tokenizer.encode(" Mary")[0], tokenizer.encode(" John")[0]

    def logit_diff(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    baseline = np.full_like(tokens, tokenizer.encode(" the")[0])
    baseline[:, 0] = tokens[:, 0]
    ig = attribution.integrated_gradients(model, tokens, logit_diff, baseline_tokens=baseline, steps=64,
                                          logit_positions=[-1])
    total, difference = attribution.completeness(model, tokens, logit_diff, ig, baseline_tokens=baseline,
                                                 logit_positions=[-1])
    assert ig.shape == tokens.shape
    assert abs(total - difference) <= 0.01 * abs(difference), (total, difference)  # measured 1.6e-3 relative


def test_saliency_and_input_x_gradient(toy):
    s = attribution.saliency(toy, CLEAN, metric)
    ixg = attribution.input_x_gradient(toy, CLEAN, metric)
    assert s.shape == ixg.shape == CLEAN.shape and (np.asarray(s) >= 0).all()
    # Causal model, metric at the last position: every position can matter, none is NaN.
    assert np.isfinite(np.asarray(ixg)).all()


@pytest.mark.parametrize("site", ["z", "resid_pre"])
def test_bfloat16_sweeps_and_attribution_track_float32(toy, site):
    """A bfloat16 model sweeps and attributes end to end (norms and softmax in float32, attribution's
    sums of products in float32): its results follow the float32 model's."""
    clean, corrupt = corrupted_pair(0)
    low = toy.astype("bfloat16")
    for method in (lambda m: patching.sweep(m, clean, corrupt, metric, site, progress=False),
                   lambda m: attribution.attribution_patching(m, clean, corrupt, metric, site)):
        full, half = np.asarray(method(toy)), method(low)
        assert half.dtype in (np.dtype("bfloat16"), np.float32)
        scale = float(np.abs(full).max())
        # bfloat16 rounding through 3 layers: measured at most 0.062 x scale (z attribution): 5x that.
        assert np.abs(np.asarray(half, np.float32) - full).max() <= 0.31 * scale
        assert scale > 0.5  # measured 0.86 to 2.1: the corruption matters
