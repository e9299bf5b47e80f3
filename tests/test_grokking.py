"""The grokking experiment: the Fourier basis and frequency measures on functions with known
spectra, the precise cross-entropy against float64, the fast answer logits against the full
forward, restricted and excluded loss on constructed logits, a shortened run that memorises, then
generalises, and a run interrupted mid-training and resumed bit for bit."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_runs import assert_identical

from experiments import grokking
from jinterp import fourier, runs

# Small p and model with a larger train fraction and learning rate: generalises within ~1500 epochs.
SHORT = ["p=23", "train_fraction=0.6", "d_model=64", "d_mlp=128", "learning_rate=0.003", "epochs=1600",
         "eval_every=200", "checkpoint_every=800", "llc_every=800", "llc_chains=2", "llc_draws=30",
         "llc_step_size=0.0001"]


def logsumexp64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]


# Fourier basis -------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [3, 7, 113])
def test_fourier_basis_is_orthonormal_and_the_textbook_one(p):
    F = np.asarray(fourier.basis(p), np.float64)
    # A float32 basis, normalised in float64: one rounding of each entry (at most 6e-8 relative).
    np.testing.assert_allclose(F @ F.T, np.eye(p), atol=1e-6)  # measured 7.3e-8
    x = np.arange(p)
    np.testing.assert_allclose(F[0], np.full(p, p**-0.5), rtol=2e-7)  # measured 1.9e-8
    k = (p - 1) // 2
    np.testing.assert_allclose(F[2 * k - 1], np.sqrt(2 / p) * np.cos(2 * np.pi * k * x / p), atol=2e-7)  # 3.0e-8
    np.testing.assert_allclose(F[2 * k], np.sqrt(2 / p) * np.sin(2 * np.pi * k * x / p), atol=2e-7)  # 1.7e-8
    assert fourier.labels(p)[:3] == ["const", "cos 1", "sin 1"] and len(fourier.labels(p)) == p


def test_fourier_rejects_even_or_tiny_p():
    for bad in (4, 1, 2.0):
        with pytest.raises(ValueError, match=f"odd p >= 3.*got {bad!r}"):
            fourier.basis(bad)


def test_frequency_norms_of_known_embeddings():
    p = 11
    x = np.arange(p)
    W = np.zeros((p, 3), np.float32)
    W[:, 0] = 3 * np.cos(2 * np.pi * 2 * x / p)
    W[:, 1] = 4 * np.sin(2 * np.pi * 5 * x / p) + 1.5  # + a constant, which no frequency counts
    expected = np.zeros(5)
    expected[[1, 4]] = 3 * np.sqrt(p / 2), 4 * np.sqrt(p / 2)  # |cos(2 pi k x / p)| = sqrt(p / 2)
    np.testing.assert_allclose(fourier.frequency_norms(jnp.asarray(W)), expected, atol=5e-6)  # measured 5.1e-7
    components = np.asarray(fourier.component_norms(jnp.asarray(W)))
    np.testing.assert_allclose(components[[0, 3, 10]], [1.5 * np.sqrt(p), 3 * np.sqrt(p / 2), 4 * np.sqrt(p / 2)],
                               rtol=5e-7)  # measured 4.5e-8


def test_frequency_fractions_2d_of_known_functions():
    p, w1, w2 = 11, 3, 4
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    angle = lambda w, x: 2 * np.pi * w * x / p  # noqa: E731
    product = 3 * np.cos(angle(w1, a)) * np.sin(angle(w1, b)) + 7.0  # frequency w1 alone (and a constant)
    mixed = 3 * np.cos(angle(w1, a)) * np.cos(angle(w1, b)) + np.cos(angle(w2, a))
    fractions = np.asarray(fourier.frequency_fractions_2d(jnp.asarray(np.stack([product, mixed], -1), jnp.float32)))
    # Energies over the grid: |cos(w1 a) cos(w1 b)|^2 = (p/2)^2, |cos(w2 a)|^2 = p * p/2.
    first, second = 9 * (p / 2) ** 2, p * p / 2
    expected = np.zeros((5, 2))
    expected[w1 - 1] = 1.0, first / (first + second)
    expected[w2 - 1, 1] = second / (first + second)
    np.testing.assert_allclose(fractions, expected, atol=5e-7)  # measured 3.5e-8


# Losses and logits ---------------------------------------------------------------------------------

def test_cross_entropy_matches_float64_where_log_softmax_rounds_to_zero():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 13)).astype(np.float32) * 3
    logits[0] = 0.0
    logits[0, 4] = 30.0  # the answer's probability is 1 - 12 e^-30: float32 log_softmax gives loss 0
    logits[1] = logits[0]
    labels = np.array([4, 2, 0, 5, 12, 7], np.int32)
    expected = logsumexp64(logits) - logits[np.arange(6), labels].astype(np.float64)
    got = np.asarray(grokking.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got[1:], expected[1:], rtol=5e-7)  # measured 4.3e-8
    # Row 0's loss is log(1 + 12 e^-30): logsumexp64 gets it from 30 + 1.1e-12 - 30, which cancels in float64
    # too (measured 2.3e-4 off); log1p does not. abs=0: approx's default abs=1e-12 would accept any answer.
    exact = np.log1p(12 * np.exp(-30))
    assert expected[0] == pytest.approx(exact, rel=2e-3, abs=0)
    assert got[0] == pytest.approx(exact, rel=5e-7, abs=0)  # measured 5.4e-8
    assert float(optax.softmax_cross_entropy_with_integer_labels(logits, labels)[0]) == 0.0  # what it fixes

    grad = np.asarray(jax.grad(lambda x: grokking.cross_entropy(x, jnp.asarray(labels)).sum())(jnp.asarray(logits)))
    x = logits.astype(np.float64)
    softmax = np.exp(x - logsumexp64(x)[:, None])
    expected_grad = softmax - np.eye(13)[labels]
    expected_grad[0, 4] = -12 * np.exp(-30) / (1 + 12 * np.exp(-30))  # 1 - softmax without cancellation
    np.testing.assert_allclose(grad, expected_grad, rtol=5e-6, atol=0)  # measured 5.4e-7 relative
    assert grad[0, 4] < 0


def test_answer_logits_equal_the_full_forward():
    cfg = grokking.Config(p=13, d_model=32, n_heads=4, d_mlp=48)
    model = grokking.init_model(cfg, jax.random.key(1))
    pairs = grokking.make_pairs(cfg.p, 0.3, seed=0)
    fast = np.asarray(eqx.filter_jit(grokking.answer_logits)(model, pairs.tokens))
    full = np.asarray(model(pairs.tokens))[:, -1, : cfg.p]
    np.testing.assert_allclose(fast, full, rtol=1e-5, atol=3e-6)  # measured 4.8e-7
    assert fast.shape == (169, 13) and np.abs(fast).max() > 0.1  # measured 1.57
    assert model.cfg.d_vocab == 14 and model.W_U.std() == pytest.approx(14**-0.5, rel=0.15)  # 0.029 (of 448 draws)
    tokens = np.asarray(pairs.tokens)
    assert (tokens[:, 2] == 13).all() and (np.asarray(pairs.labels) == (tokens[:, 0] + tokens[:, 1]) % 13).all()
    assert int(pairs.is_train.sum()) == round(0.3 * 169)


def test_restricted_and_excluded_loss_on_constructed_logits():
    """Logits = bias[c] + 4 cos(w1 (a + b - c)) + 2 cos(w2 (a + b - c)) + cos(a - c): keeping w1 leaves
    bias + the w1 term (the a-only term has no (a + b) component and no mean over (a, b));
    excluding w1 leaves everything else."""
    p, w1, w2 = 11, 2, 3
    a, b, c = np.meshgrid(np.arange(p), np.arange(p), np.arange(p), indexing="ij")
    angle = lambda w, x: 2 * np.pi * w * x / p  # noqa: E731
    bias = np.linspace(-1, 1, p)[c]
    term1, term2, a_only = 4 * np.cos(angle(w1, a + b - c)), 2 * np.cos(angle(w2, a + b - c)), np.cos(angle(1, a - c))
    logits = bias + term1 + term2 + a_only
    labels = (np.arange(p)[:, None] + np.arange(p)[None, :]) % p
    is_train = np.random.default_rng(0).random((p, p)) < 0.4

    def loss64(kept):  # [a, b] cross-entropy of logits [a, b, c], float64
        return logsumexp64(kept) - np.take_along_axis(kept, labels[..., None], -1)[..., 0]

    measures = grokking.restricted_and_excluded(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                                jnp.asarray(is_train), grokking.sum_directions(p, [w1]))
    # float32 against float64: measured 2.8e-7, 1.6e-7 and 7.7e-8 relative.
    assert float(measures["restricted_loss"]) == pytest.approx(loss64(bias + term1).mean(), rel=3e-6)
    assert float(measures["excluded_loss"]) == pytest.approx(loss64(bias + term2 + a_only)[is_train].mean(), rel=3e-6)
    both = grokking.restricted_and_excluded(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                            jnp.asarray(is_train), grokking.sum_directions(p, [w1, w2]))
    assert float(both["excluded_loss"]) == pytest.approx(loss64(bias + a_only)[is_train].mean(), rel=3e-6)
    directions = np.asarray(grokking.sum_directions(p, [1, 2, 5])).reshape(6, -1)
    np.testing.assert_allclose(directions @ directions.T, np.eye(6), atol=1e-5)  # measured 7.8e-7


def test_key_frequencies_end_at_the_largest_gap():
    norms = np.array([0.1, 5.0, 0.2, 4.0, 0.1, 3.0, 0.15])
    assert grokking.choose_key_frequencies(norms, 5) == [2, 4, 6]
    assert grokking.choose_key_frequencies(norms, 2) == [2, 4]  # of 5/4 and 4/3, the larger gap is after 4
    assert grokking.choose_key_frequencies(np.array([1.0, 1.0]), 8) == [1]


def test_bad_configs_are_refused_naming_the_value():
    for overrides, message in ((["p=12"], r"odd p >= 3 .*got 12"), (["n_heads=3"], "multiple of n_heads=3"),
                               (["key_frequencies=[57]"], r"key frequency 57 is not in 1..56"),
                               (["train_fraction=1.0"], r"train_fraction must be in \(0, 1\)")):
        with pytest.raises(ValueError, match=message):
            grokking.check(runs.make_config(grokking.Config, overrides=overrides))


# A shortened run -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("grokking")
    cfg = runs.make_config(grokking.Config, overrides=SHORT)
    return cfg, runs.execute(grokking.EXPERIMENT, cfg, directory, quiet=True), directory


def test_short_run_memorises_then_generalises(short_run):
    cfg, results, directory = short_run
    history, progress, analysis = results["history"], results["progress"], results["analysis"]
    assert history["loss"].shape == (1600,) and history["loss"][-1] < history["loss"][0] / 1e3
    assert list(history["eval_step"]) == list(range(0, 1601, 200)) and "params" not in history
    metrics = json.loads((directory / "metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert metrics["train_accuracy_epoch"] < metrics["test_accuracy_epoch"] <= 1600  # grokking, in small: 1600
    assert metrics["final"]["train_accuracy"] == 1.0 and metrics["final"]["test_accuracy"] >= 0.99  # 1.0
    assert history["test_accuracy"][history["eval_step"] == metrics["train_accuracy_epoch"]][0] < 0.9  # 0.40
    keys = metrics["key_frequencies"]
    assert keys == [int(k) for k in analysis["key_frequencies"]] and 1 <= len(keys) <= cfg.max_key_frequencies
    assert 0.5 < metrics["key_embedding_fraction"] <= 1.0  # measured 0.91
    # The generalising circuit: keeping only the key frequencies works, removing them breaks it.
    assert metrics["final"]["restricted_loss"] < 0.1 < 1.0 < metrics["final"]["excluded_loss"]  # measured 5.7 (excl.)
    assert progress["restricted_loss"].shape == progress["excluded_loss"].shape == (9,)
    assert progress["excluded_loss"][0] == pytest.approx(history["train_loss"][0], abs=2e-4)  # ~ln p at init: 1.7e-5
    assert analysis["neuron_fractions"].shape == (11, 128)
    assert (analysis["neuron_fractions"][:, analysis["neuron_alive"]].sum(0) <= 1 + 1e-5).all()  # disjoint parts

    # The LLC of the snapshots at epochs 0, 800, 1600, each a checkpointed step.
    estimates = results["llc"]
    assert estimates["step"].tolist() == [0, 800, 1600] and estimates["loss_trace"].shape == (3, 2, 30)
    assert np.isfinite(estimates["mean"]).all() and metrics["llc"]["epoch"] == [0, 800, 1600]
    np.testing.assert_allclose(estimates["init_loss"][-1], history["train_loss"][-1], rtol=2e-6)  # w0's loss: 1.7e-7
    assert (directory / "checkpoints" / "llc" / "000000800.json").exists()
    plots = sorted(p.name for p in (directory / "plots").glob("*.png"))
    assert plots == ["embedding_fourier.png", "example_neurons.png", "llc.png", "loss_accuracy.png",
                     "neuron_frequencies.png", "progress_measures.png"]
    page = (directory / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots) and "Progress measures" in page
    assert metrics["config_hash"] == runs.config_hash("grokking", cfg) and metrics["epochs_per_second"] > 0


def test_a_run_interrupted_mid_training_resumes_bit_identically(short_run, tmp_path, monkeypatch):
    """An exception at the evaluation of epoch 1000 (the last checkpoint: epoch 800); the rerun resumes
    from it and ends with the uninterrupted run's bits. (kill -9 at any moment is covered by
    tests/test_train.py and tests/test_runs.py: the loop and the store resume the same way.)"""
    cfg, results, _ = short_run
    evaluate, calls = grokking.evaluate, []

    def interrupted(model, pairs):
        calls.append(1)
        if len(calls) == 6:  # epochs 0, 200, ..., 1000
            raise KeyboardInterrupt("stopped mid-training")
        return evaluate(model, pairs)

    monkeypatch.setattr(grokking, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runs.execute(grokking.EXPERIMENT, cfg, tmp_path, quiet=True)
    assert [p.name for p in (tmp_path / "checkpoints" / "model").glob("*.json")] == ["000000800.json"]
    monkeypatch.setattr(grokking, "evaluate", evaluate)
    assert_identical(results, runs.execute(grokking.EXPERIMENT, cfg, tmp_path, quiet=True))
