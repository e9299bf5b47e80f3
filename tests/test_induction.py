"""The induction experiment: scores on hand-made attention patterns, half losses on hand-made
logits, K-composition on hand-set weights, the data generator, and a shortened run through
``runs.execute`` (the full run, which forms induction heads, is ``jinterp run induction``)."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_runs import assert_identical

import jinterp
from experiments import induction
from jinterp import runs

L = 5  # segment length of the hand-made patterns: sequences of 2L positions


def one_hot_pattern(keys_of_query) -> np.ndarray:
    """A pattern [query, key] attending from each query i to key keys_of_query(i) only."""
    pattern = np.zeros((2 * L, 2 * L), np.float32)
    for i in range(2 * L):
        pattern[i, keys_of_query(i)] = 1.0
    return pattern


def test_scores_on_hand_made_patterns():
    # The induction pattern: from i in the second copy to i - (L - 1); elsewhere to position 0.
    induction_pattern = one_hot_pattern(lambda i: i - L + 1 if i >= L else 0)
    previous = one_hot_pattern(lambda i: max(i - 1, 0))
    same = one_hot_pattern(lambda i: i - L if i >= L else i)  # the earlier occurrence itself: not induction
    patterns = jnp.asarray(np.stack([induction_pattern, previous, same]))
    np.testing.assert_array_equal(induction.induction_score(patterns, L), [1.0, 0.0, 0.0])  # means of 0s and 1s
    # Of queries 1..2L-1 the induction pattern attends to i - 1 only at i = 1 (to key 0).
    np.testing.assert_allclose(induction.previous_token_score(patterns), [1 / (2 * L - 1), 1.0, 0.0],
                               rtol=2e-7)  # float32's 1 / 31: measured 7.5e-9
    # Causal uniform attention: row i spreads 1 / (i + 1) over keys 0..i.
    uniform = np.tril(np.ones((2 * L, 2 * L))) / np.arange(1, 2 * L + 1)[:, None]
    expected_induction = np.mean([1 / (i + 1) for i in range(L, 2 * L)])
    expected_previous = np.mean([1 / (i + 1) for i in range(1, 2 * L)])
    # approx's default: 1e-6 relative; measured 9e-8 and 8e-8.
    assert float(induction.induction_score(jnp.asarray(uniform), L)) == pytest.approx(expected_induction)
    assert float(induction.previous_token_score(jnp.asarray(uniform))) == pytest.approx(expected_previous)
    # Leading axes (batch, layer, head) are kept.
    stacked = jnp.broadcast_to(patterns[0], (3, 2, 4, 2 * L, 2 * L))
    assert induction.induction_score(stacked, L).shape == (3, 2, 4)


def test_half_losses_select_the_first_and_the_repeated_tokens():
    vocab = 7
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (3, 2 * L)), jnp.int32)
    logits = np.zeros((3, 2 * L, vocab), np.float32)  # uniform: ln(vocab) everywhere ...
    for i in range(L, 2 * L - 1):  # ... except certainty about every repeated token L+1..2L-1
        logits[np.arange(3), i, tokens[:, i + 1]] = 100.0
    losses = induction.half_losses(jnp.asarray(logits), tokens, L)
    assert float(losses["loss_first"]) == pytest.approx(math.log(vocab), rel=5e-7)  # measured 3.4e-8
    assert float(losses["loss_repeated"]) == pytest.approx(0.0, abs=1e-7)  # exactly 6 e^-100; measured 0


def test_k_composition_follows_where_a_layer0_head_writes():
    """Layer-1 head 0 queries and keys read e1, e2. Layer-0 head 0 reads e3, e4 and writes e1, e2:
    its output is what the keys read (score |P12|_F / (|P12|_F |W_OV|_F) = 1/sqrt 2). Head 1 reads
    e1, e2 and writes e3, e4, which the keys never see (score 0)."""
    cfg = jinterp.Config(d_model=4, n_layers=2, n_heads=2, d_head=2, d_vocab=5, n_ctx=8, attn_only=True,
                         norm=None)
    model = jinterp.Transformer.init(cfg, jax.random.key(0))
    e = np.eye(4, dtype=np.float32)
    low, high = e[:, :2], e[:, 2:]  # [d_model, d_head] embeddings of span(e1, e2) and span(e3, e4)
    attn = model.blocks.attn
    W_Q = attn.W_Q.at[1, 0].set(low)
    W_K = attn.W_K.at[1, 0].set(low)
    W_V = attn.W_V.at[0, 0].set(high).at[0, 1].set(low)
    W_O = attn.W_O.at[0, 0].set(low.T).at[0, 1].set(high.T)
    model = eqx_replace(model, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O)
    scores = np.asarray(induction.k_composition(model))
    assert scores.shape == (2, 2)
    assert scores[0, 0] == pytest.approx(1 / math.sqrt(2), rel=1e-6)  # measured 6.7e-8
    assert scores[1, 0] == 0.0  # products of exact zeros


def eqx_replace(model, **weights):
    """``model`` with some attention weights replaced."""
    names = list(weights)
    return eqx.tree_at(lambda m: [getattr(m.blocks.attn, n) for n in names], model, [weights[n] for n in names])


def test_segments_repeat_exactly_and_batches_are_a_function_of_the_step():
    tokens, start, length = induction.segment_sequences(jax.random.key(3), 200, 32, 11, 3, 16)
    tokens, start, length = np.asarray(tokens), np.asarray(start), np.asarray(length)
    assert tokens.shape == (200, 32) and tokens.min() >= 0 and tokens.max() < 11
    assert length.min() >= 3 and length.max() <= 16 and len(set(length)) > 8
    assert start.min() >= 0 and (start + 2 * length).max() <= 32 and len(set(start)) > 8
    for row, s, n in zip(tokens, start, length):
        np.testing.assert_array_equal(row[s + n: s + 2 * n], row[s: s + n])
    # Elsewhere the tokens are random: far fewer than a quarter of other positions equal their token L back.
    copies = [row[s + n + k] == row[s + k] for row, s, n in zip(tokens, start, length) for k in range(n)]
    others = [row[p] == row[p - n] for row, s, n in zip(tokens, start, length) for p in range(n, 32)
              if not s + n <= p < s + 2 * n]
    assert all(copies) and np.mean(others) < 0.25  # measured 0.086 (1/11 expected)

    batches = induction.SegmentBatches(jax.random.key(1), 4, 16, 9, 2, 8)
    again = induction.SegmentBatches(jax.random.key(1), 4, 16, 9, 2, 8)
    step5 = np.asarray(batches(jnp.int32(5)))
    np.testing.assert_array_equal(step5, again(jnp.int32(5)))
    np.testing.assert_array_equal(step5, eqx.filter_jit(lambda b, s: b(s))(batches, jnp.int32(5)))
    scanned = jax.lax.scan(lambda c, s: (c, batches(s)), 0, jnp.arange(7, dtype=jnp.int32))[1]
    np.testing.assert_array_equal(scanned[5], step5)  # inside the training loop's scan too
    assert not np.array_equal(step5, batches(jnp.int32(6)))
    assert not np.array_equal(step5, induction.SegmentBatches(jax.random.key(2), 4, 16, 9, 2, 8)(jnp.int32(5)))

    probe = np.asarray(induction.repeated_sequences(jax.random.key(0), 3, 6, 50))
    np.testing.assert_array_equal(probe[:, :6], probe[:, 6:])


def test_phase_change_is_the_steepest_drop():
    steps = np.arange(0, 1001, 50)
    loss = 4.0 - 3.0 / (1 + np.exp(-(steps - 610) / 20.0))  # a sigmoid falling fastest at step 610
    at, slope = induction.phase_change(steps, loss)
    assert at == 650 and slope < 0  # the interval 600-650 holds the steepest fall


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="max_segment=40 <= n_ctx // 2 = 32"):
        induction.check(induction.Config(max_segment=40))
    with pytest.raises(ValueError, match="d_model=64 must be a multiple of n_heads=5"):
        induction.check(induction.Config(n_heads=5))


# Too short for the phase change (~700 steps at the defaults), long enough for the first thing the model
# learns: copying tokens seen earlier in the context, which lowers the loss on the repeated half only.
SHORT = ["vocab=64", "n_ctx=32", "d_model=32", "n_heads=4", "max_segment=16", "steps=100", "learning_rate=0.003",
         "eval_every=20", "checkpoint_every=40", "eval_sequences=16", "llc_every=100", "llc_examples=64",
         "llc_chains=1", "llc_draws=10", "llc_batch_size=16"]


def test_shortened_run_trains_reports_and_restores(tmp_path):
    cfg = runs.make_config(induction.Config, overrides=SHORT)
    results = runs.execute(induction.EXPERIMENT, cfg, tmp_path, quiet=True)
    history, analysis = results["history"], results["analysis"]
    assert history["loss"].shape == (100,) and history["eval_step"].tolist() == list(range(0, 101, 20))
    assert history["induction"].shape == (6, 2, 4) and history["previous_token"].shape == (6, 2, 4)
    first, repeated = history["loss_first"], history["loss_repeated"]
    assert repeated[-1] < repeated[0] - 0.04 and repeated[-1] < first[-1] - 0.04  # it learns: 0.072 and 0.096
    assert abs(first[-1] - math.log(64)) < 0.1  # random tokens stay unpredictable: measured 0.024
    # Every row of a pattern sums to 1, so a score is a mean attention in [0, 1].
    assert ((history["induction"] >= 0) & (history["induction"] <= 1)).all()
    # Zeroing a head changes the loss; the table covers every head.
    assert analysis["ablated_loss_repeated"].shape == (2, 4)
    assert not np.allclose(analysis["ablated_loss_repeated"], analysis["loss_repeated"])
    np.testing.assert_allclose(analysis["example_pattern"].sum(-1), 1.0, rtol=2e-6)  # measured 2.4e-7
    np.testing.assert_array_equal(results["example"][:16], results["example"][16:])

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert metrics["phase_change_step"] in range(20, 101, 20)
    heads = {f"L{layer}H{head}" for layer in (0, 1) for head in range(4)}
    assert set(metrics["ablation_repeated_loss_increase"]) == heads
    assert metrics["induction_head"].startswith("L1H") and metrics["previous_token_head"].startswith("L0H")
    assert metrics["final"]["loss_repeated"] == float(analysis["loss_repeated"])  # a JSON round trip: exact
    estimates = results["llc"]  # snapshots at steps 0 and 100, every head's refined LLC too
    assert estimates["step"].tolist() == [0, 100] and estimates["head_mean"].shape == (2, 2, 4)
    assert np.isfinite(estimates["head_mean"]).all() and set(metrics["llc"]["heads_final"]) == heads
    plots = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert plots == ["ablation.png", "attention_patterns.png", "final_scores.png", "k_composition.png", "llc.png",
                     "llc_heads.png", "loss_curves.png", "score_trajectories.png"]
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == len(plots)

    again = runs.execute(induction.EXPERIMENT, cfg, tmp_path, quiet=True)  # restored, not retrained
    assert_identical(results, again)
    assert json.loads((tmp_path / "run.json").read_text())["steps"]["results"]["restored"]
    # Lose everything after training: the model comes back from the training loop's last checkpoint
    # and the analysis, recomputed from it, is the same to the bit.
    store = runs.Store(tmp_path / "checkpoints", print)
    store.delete("results")
    store.delete("analysis")
    resumed = runs.execute(induction.EXPERIMENT, cfg, tmp_path, quiet=True)
    assert_identical(results, resumed)
    steps = json.loads((tmp_path / "run.json").read_text())["steps"]
    assert steps["model"]["restored"] and not steps["analysis"]["restored"]
    assert steps["llc/000000100"]["restored"]  # LLC results come back from their checkpoints
