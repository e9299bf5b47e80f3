"""Distributed alignment search: a planted variable is recovered, files round-trip, bad input is refused."""

from __future__ import annotations

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jinterp
from jinterp import das

N_SYMBOLS, D = 48, 16  # more symbols than dimensions: their noise spans every direction but u
FALSE, TRUE = N_SYMBOLS, N_SYMBOLS + 1
PLANTED = jinterp.Config(d_model=D, n_layers=1, n_heads=1, d_head=4, d_vocab=N_SYMBOLS + 2, n_ctx=2,
                         attn_only=True, norm=None, positional=None, architecture="planted toy")


def planted_model(seed: int = 0):
    """A model whose residual stream holds the parity of its one token along a planted direction ``u``
    and nothing else the output reads: ``embed(x) = 2 (+1 odd, -1 even) u + 3 noise(x)``, the noise
    orthogonal to ``u`` and the same for tokens 2j and 2j + 1; attention writes nothing (W_O = 0); the
    unembedding reads ``u`` only (TRUE along +u, FALSE along -u). So the model outputs TRUE iff the token
    is odd, and the variable "parity" lives in span(u) and nowhere else."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=D)
    u /= np.linalg.norm(u)
    noise = np.repeat(rng.normal(size=(PLANTED.d_vocab // 2, D)), 2, axis=0)  # tokens 2j, 2j + 1 share theirs,
    noise -= np.outer(noise @ u, u)  # so nothing but u tells the parity
    sign = np.where(np.arange(PLANTED.d_vocab) % 2, 1.0, -1.0)
    W_E = 2 * sign[:, None] * u + 3 * noise
    W_U = np.zeros((D, PLANTED.d_vocab))
    W_U[:, TRUE], W_U[:, FALSE] = 2 * u, -2 * u  # logits +-4: the labels dominate the symbols (0)
    model = jinterp.Transformer.init(PLANTED, jax.random.key(seed))
    model = eqx.tree_at(lambda m: (m.W_E, m.W_U, m.blocks.attn.W_O),
                        model, (jnp.asarray(W_E, jnp.float32), jnp.asarray(W_U, jnp.float32),
                                jnp.zeros_like(model.blocks.attn.W_O)))
    return model, u


def parity_pairs(seed: int, n: int):
    """(base, source) single tokens and the counterfactual label: base with the source's parity."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, N_SYMBOLS, (n, 1)).astype(np.int32)
    source = rng.integers(0, N_SYMBOLS, (n, 1)).astype(np.int32)
    return base, source, np.where(source[:, 0] % 2, TRUE, FALSE).astype(np.int32)


def hand_iia(model, u, basis, base, source, labels) -> float:
    """IIA by hand: h' = h + Q Q^T (s - h) on the embeddings, read out along u."""
    W_E = np.asarray(model.W_E, np.float64)
    h, s = W_E[base[:, 0]], W_E[source[:, 0]]
    q = np.asarray(basis, np.float64)
    edited = h + (s - h) @ q @ q.T
    predicted = np.where(edited @ u > 0, TRUE, FALSE)
    return float((predicted == labels).mean())


@pytest.fixture(scope="module")
def planted():
    model, u = planted_model()
    base, source, labels = parity_pairs(1, 4096)
    fitted = das.fit(model, "blocks.0.resid_post", 1, [0], base, source, labels, steps=150, batch_size=256,
                     optimizer=optax.adam(5e-2), variable="parity", eval_every=150, progress=False)
    return model, u, fitted


def test_das_recovers_the_planted_direction(planted):
    model, u, fitted = planted
    alignment = fitted.params
    q = np.asarray(alignment.basis(), np.float64)
    np.testing.assert_allclose(q.T @ q, np.eye(1), atol=2e-6)  # orthonormal, as float32 QR guarantees: measured 2.2e-7
    angle = np.degrees(np.arccos(min(1.0, abs(float(q[:, 0] @ u)))))  # the principal angle to span(u)
    assert angle < 3, f"learned subspace is {angle:.1f} degrees from the planted direction"  # measured 1.2
    # The loss cannot reach 0: logits +-4 against 0 for each of the 48 symbols.
    assert fitted.history["loss"][-20:].mean() < 0.7 < 1.0 < fitted.history["loss"][:5].mean()  # 4.8 at first

    base, source, labels = parity_pairs(2, 400)  # held out
    iia = das.accuracy(alignment, model, base, source, labels)
    assert iia == hand_iia(model, u, alignment.basis(), base, source, labels)
    assert iia > 0.99  # measured 1.0
    # Identity ("change nothing") gets the pairs with equal parity only; a random direction does little better.
    assert 0.4 < np.mean(labels == np.where(base[:, 0] % 2, TRUE, FALSE)) < 0.6  # measured 0.495
    random = das.Alignment.init(model, "blocks.0.resid_post", 1, [0], jax.random.key(7))
    random_iia = das.accuracy(random, model, base, source, labels)
    assert random_iia == hand_iia(model, u, random.basis(), base, source, labels)
    assert random_iia < 0.75  # measured 0.495
    # Interchanging the whole space is patching the source's embedding: the source's own label.
    full = das.Alignment.init(model, "blocks.0.resid_post", D, [0], jax.random.key(8))
    assert das.accuracy(full, model, base, source, labels) == 1.0


def test_interchange_matches_the_formula(planted):
    model, _, fitted = planted
    alignment = fitted.params
    base, source, _ = parity_pairs(3, 6)
    _, cache = jinterp.run(model, base, capture=["blocks.0.resid_post"])
    q = np.asarray(np.linalg.qr(np.asarray(alignment.rotation, np.float64))[0])
    h = np.asarray(model.W_E, np.float64)[base[:, 0]]
    s = np.asarray(model.W_E, np.float64)[source[:, 0]]
    expected = (h + (s - h) @ q @ q.T) @ np.asarray(model.W_U, np.float64)
    logits = alignment.logits(model, jnp.asarray(base), jnp.asarray(source))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=0)  # float32 vs float64: measured 2.1e-6


def test_save_and_load_round_trip(planted, tmp_path):
    model, _, fitted = planted
    alignment = fitted.params
    das.save(alignment, tmp_path / "das")
    config = json.loads((tmp_path / "das" / "das.json").read_text())
    assert (config["site"], config["layer"], config["positions"], config["k"]) == ("blocks.0.resid_post", 0, [0], 1)
    assert config["variable"] == "parity" and config["model_fingerprint"] == jinterp.tuned_lens.model_fingerprint(model)
    loaded = das.load(tmp_path / "das", model)
    assert loaded.rotation.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(loaded.rotation), np.asarray(alignment.rotation))
    assert (loaded.site, loaded.positions, loaded.variable, loaded.fingerprint) == (
        alignment.site, alignment.positions, alignment.variable, alignment.fingerprint)
    base, source, _ = parity_pairs(4, 8)
    _, cache = jinterp.run(model, source, capture=[alignment.site])
    edits = [a.interchange(cache[alignment.site]) for a in (alignment, loaded)]
    outputs = [np.asarray(jinterp.run(model, base, edits=e)[0]) for e in edits]
    np.testing.assert_array_equal(outputs[0], outputs[1])  # bit-identical interventions

    other, _ = planted_model(seed=1)
    with pytest.raises(ValueError, match="learned on other weights"):
        das.load(tmp_path / "das", other)
    assert das.load(tmp_path / "das", other, check_model=False).k == 1
    wider = jinterp.Transformer.init(dataclasses.replace(PLANTED, d_model=20, d_head=5), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'rotation' must be float32\[20, 1\]"):
        das.load(tmp_path / "das", wider, check_model=False)
    with pytest.raises(FileNotFoundError, match="das.json is missing"):
        das.load(tmp_path / "nothing", model)


def test_bad_inputs_are_refused(planted):
    model, _, _ = planted
    key = jax.random.key(0)
    for k in (0, D + 1, 1.5):
        with pytest.raises(ValueError, match=rf"k={k!r} is out of range: .* 1\.\.{D}"):
            das.Alignment.init(model, "blocks.0.resid_post", k, [0], key)
    with pytest.raises(ValueError, match=r"Unknown site 'blocks.0.resid_pots'.*blocks.0.resid_post"):
        das.Alignment.init(model, "blocks.0.resid_pots", 1, [0], key)
    with pytest.raises(ValueError, match="layer 3 is out of range; this model has 1 layers"):
        das.Alignment.init(model, "blocks.3.resid_post", 1, [0], key)
    with pytest.raises(ValueError, match="names every layer"):
        das.Alignment.init(model, "blocks.*.resid_post", 1, [0], key)
    with pytest.raises(ValueError, match=r"axes \('batch', 'pos', 'head', 'd_head'\); .*resid_post"):
        das.Alignment.init(model, "blocks.0.attn.z", 1, [0], key)
    with pytest.raises(ValueError, match="position 2 is out of range for a context of n_ctx=2"):
        das.Alignment.init(model, "blocks.0.resid_post", 1, [2], key)
    base, source, labels = parity_pairs(5, 8)
    with pytest.raises(ValueError, match=r"labels must be token ids in 0\.\.49, got 53\.\.54"):
        das.accuracy(das.Alignment.init(model, "embed", 1, [0], key), model, base, source, labels + 5)
    with pytest.raises(ValueError, match="one shape"):
        das.fit(model, "embed", 1, [0], base, source[:4], labels, steps=1)


def test_the_experiments_causal_model():
    """The two-equality task of experiments/das.py: counterfactual answers and which sites can carry
    which variable, checked on hand-made examples."""
    from experiments import das as experiment

    n = 16  # answers are tokens 16 + 2 (a == b) + (c == d)
    base = jnp.array([[3, 3, 5, 6], [1, 2, 7, 7]])
    source = jnp.array([[4, 9, 8, 8], [0, 0, 2, 3]])
    np.testing.assert_array_equal(experiment.counterfactual_labels(base, source, "left", n), [16, 19])
    np.testing.assert_array_equal(experiment.counterfactual_labels(base, source, "right", n), [19, 16])
    inputs = np.asarray(experiment.equality_inputs(jax.random.key(0), 4000, n))
    assert inputs.min() >= 0 and inputs.max() < n
    for first in (0, 2):
        assert abs((inputs[:, first] == inputs[:, first + 1]).mean() - 0.5) < 0.03  # 3.8 s.e.; measured 0.008
    roles = {(v, s, p): experiment.role(v, s, p, window=2) for v in ("left", "right")
             for s in ("blocks.0.resid_pre", "blocks.0.resid_post", "blocks.1.resid_mid") for p in (1, 3)}
    can = {key for key, role in roles.items() if role == experiment.CAN}
    assert can == {("left", "blocks.0.resid_post", 1), ("right", "blocks.0.resid_post", 3),
                   ("left", "blocks.1.resid_mid", 3), ("right", "blocks.1.resid_mid", 3)}
    assert roles["left", "blocks.1.resid_mid", 1] == experiment.TOO_LATE
    assert roles["left", "blocks.0.resid_post", 3] == experiment.UNSEEN

