"""Sparse autoencoders: each architecture recovers planted sparse features with the sparsity it is
asked for; the JumpReLU straight-through gradients are the paper's; dead latents are counted and
revived; files round-trip and agree with SAELens; splicing into a model changes exactly what it
should."""

import json

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TOY, random_tokens
from test_runs import assert_identical

import jinterp
from experiments import sae as sae_experiment
from jinterp import runs
from jinterp.runs import Run
from jinterp.sae import (
    SAE,
    ModelActivations,
    SAESplice,
    feature_attribution,
    jumprelu,
    load_gemma_scope,
    load_saelens,
    save_gemma_scope,
    save_saelens,
    splice_losses,
    step,
    train_sae,
    training,
)
from jinterp.sae.autoencoder import top_k, topk_decode, topk_encode
from jinterp.sae.sources import Refill

D_IN, N_FEATURES, D_SAE = 32, 64, 128
STEPS, BATCH, LR = 400, 256, 1e-2  # shared, so each architecture compiles its training step once


def planted(n=8192, seed=0):
    """Activations that are sparse codes (each feature on with probability 1/16, magnitude in
    [0.5, 1.5]) times a random unit dictionary, plus an offset; and that dictionary."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(N_FEATURES, D_IN))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = (rng.random((n, N_FEATURES)) < 1 / 16) * rng.uniform(0.5, 1.5, (n, N_FEATURES))
    return (codes @ dictionary + 0.3).astype(np.float32), dictionary


ACTIVATIONS, DICTIONARY = planted()
TRAINED = {}


def trained(architecture, d_sae=D_SAE, **options):
    key = (architecture, d_sae, tuple(sorted(options.items())))
    if key not in TRAINED:
        TRAINED[key] = train_sae(ACTIVATIONS, architecture, d_sae, steps=STEPS, batch_size=BATCH, lr=LR,
                                 progress=False, **options)
    return TRAINED[key]


def recovered(sae) -> float:
    """Mean over planted features of the best |cosine| with a decoder row."""
    rows = np.asarray(sae.W_dec) / np.linalg.norm(np.asarray(sae.W_dec), axis=1, keepdims=True)
    return float(np.abs(DICTIONARY @ rows.T).max(axis=1).mean())


def final(result, metric):
    return float(result.history[metric][-1])


@pytest.mark.parametrize("architecture, k", [("topk", 6), ("batchtopk", 4)])
def test_topk_architectures_reach_their_l0_and_recover_the_features(architecture, k):
    # topk with as many latents as planted features, as the dead-latent test (one compilation for both).
    result = trained(architecture, k=k, d_sae=N_FEATURES if architecture == "topk" else D_SAE)
    # Learned outcomes (fixed seeds), measured topk / batchtopk: 0.89 / 0.88, l0 5.85 / 3.89, 0.97 / 0.97.
    assert final(result, "explained_variance") > 0.85
    assert k - 0.5 < final(result, "l0") <= k + (0.5 if architecture == "batchtopk" else 0)
    assert recovered(result.sae) > 0.95
    # Unit decoder rows in training; the input scale folded in afterwards divides them by it.
    np.testing.assert_allclose(np.linalg.norm(result.sae.W_dec, axis=1) * result.input_scale, 1.0,
                               atol=2e-6)  # measured 1.8e-7
    assert result.history["loss"].shape == (STEPS,) and result.history["eval_step"].tolist() == [0, 100, 200, 300, 400]


def test_relu_l1_and_jumprelu_l0_trade_sparsity_for_reconstruction():
    # Learned outcomes (fixed seeds), measured at the strong ends: l0 13.0 (relu) and 3.0 (jumprelu), explained
    # variance 0.81 and 0.87; relu[0]'s explained variance 0.95, jump[1]'s recovery 0.96.
    relu = [trained("relu", l1_coefficient=c) for c in (0.3, 1.0)]
    jump = [trained("jumprelu", l0_coefficient=c) for c in (0.3, 3.0)]
    for weak, strong in (relu, jump):
        assert np.all(np.isfinite(weak.history["l0"]))
        assert final(weak, "l0") > final(strong, "l0") > 1
        assert final(weak, "explained_variance") > final(strong, "explained_variance") > 0.75
    assert final(relu[0], "explained_variance") > 0.9 and recovered(jump[1].sae) > 0.9
    assert final(jump[1], "l0") < 6  # near the planted 4 per token
    np.testing.assert_allclose(np.linalg.norm(jump[1].sae.W_dec, axis=1) * jump[1].input_scale, 1.0,
                               atol=2e-6)  # measured 1.8e-7
    assert np.all(np.asarray(jump[1].sae.threshold) >= 0)


def test_the_returned_sae_reads_raw_activations():
    result = trained("topk", k=6, d_sae=N_FEATURES)
    x = jnp.asarray(ACTIVATIONS[:512])
    error = np.sum((np.asarray(result.sae(x)) - ACTIVATIONS[:512]) ** 2)
    variance = np.sum((ACTIVATIONS[:512] - ACTIVATIONS[:512].mean(0)) ** 2)
    assert 1 - error / variance > 0.85  # measured 0.89


def test_jumprelu_straight_through_gradients_match_the_rectangle_kernel_by_hand():
    pre = jnp.array([[1.02, 2.5, 0.46], [0.2, 1.96, 0.5]])
    threshold = jnp.array([1.0, 2.0, 0.5])
    weights = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # With bandwidth 0.1 the kernel is 1 where |pre - threshold| < 0.05: entries (0,0), (0,2), (1,1), (1,2).
    # float32 against float64 literals: one rounding, at most 6e-8 relative (measured 1.9e-8).
    np.testing.assert_allclose(jumprelu(pre, threshold, 0.1), [[1.02, 2.5, 0], [0, 0, 0]], rtol=3e-7)
    d_pre, d_threshold = jax.grad(lambda p, t: jnp.sum(jumprelu(p, t, 0.1) * weights), argnums=(0, 1))(pre, threshold)
    np.testing.assert_array_equal(d_pre, [[1, 2, 0], [0, 0, 0]])  # the true gradient: where the gate is open
    # -(threshold / bandwidth) * weight, summed over the window's entries of each latent.
    np.testing.assert_allclose(d_threshold, [-(1.0 / 0.1) * 1, -(2.0 / 0.1) * 5, -(0.5 / 0.1) * (3 + 6)],
                               rtol=1e-6)  # measured 0
    d_pre, d_threshold = jax.grad(lambda p, t: jnp.sum(step(p, t, 0.1) * weights), argnums=(0, 1))(pre, threshold)
    np.testing.assert_array_equal(d_pre, np.zeros((2, 3)))
    np.testing.assert_allclose(d_threshold, [-10 * 1, -10 * 5, -10 * (3 + 6)], rtol=1e-6)  # measured 0
    np.testing.assert_array_equal(step(pre, threshold, 0.1), [[1, 1, 0], [0, 0, 0]])


def planted_dead(d_sae, n_dead):
    """A topk SAE (normalised units) whose first ``n_dead`` latents read nothing and sit at -1."""
    sae = SAE.init(D_IN, d_sae, "topk", key=jax.random.key(3), k=6)
    return eqx.tree_at(lambda s: (s.W_enc, s.b_enc), sae,
                       (sae.W_enc.at[:, :n_dead].set(0.0), sae.b_enc.at[:n_dead].set(-1.0)))


def test_planted_dead_latents_are_counted_and_aux_k_revives_them():
    # As many latents as planted features: every latent is needed, so a dead one costs reconstruction.
    window, d_sae = 5 * BATCH, N_FEATURES
    kwargs = dict(k=6, steps=STEPS, batch_size=BATCH, lr=LR, dead_window=window, init=planted_dead(d_sae, 8),
                  progress=False)
    without = train_sae(ACTIVATIONS, "topk", d_sae, aux_coefficient=0.0, **kwargs)
    dead = without.since_fired >= window
    assert dead[:8].all()  # never fired: counted dead once a window of tokens has passed
    assert without.history["dead_fraction"][0] == 0 and final(without, "dead_fraction") == dead.mean() >= 8 / d_sae
    revived = train_sae(ACTIVATIONS, "topk", d_sae, aux_coefficient=1 / 32, **kwargs)
    assert final(revived, "dead_fraction") < final(without, "dead_fraction") / 2
    assert (revived.since_fired[:8] < window).sum() >= 6
    assert final(revived, "explained_variance") > final(without, "explained_variance")


class Interrupted(RuntimeError):
    pass


def test_an_interrupted_training_resumes_to_the_same_bits(tmp_path, monkeypatch):
    kwargs = dict(k=6, steps=STEPS, batch_size=BATCH, lr=LR, progress=False)
    metrics, calls = training._metrics, []

    def crash_at_step_300(*args):
        calls.append(None)
        if len(calls) == 4:  # evaluations at steps 0, 100, 200, then 300: the checkpoint of 200 is on disk
            raise Interrupted
        return metrics(*args)

    monkeypatch.setattr(training, "_metrics", crash_at_step_300)
    with pytest.raises(Interrupted):
        train_sae(ACTIVATIONS, "topk", N_FEATURES, run=Run(tmp_path, None, quiet=True), **kwargs)
    monkeypatch.setattr(training, "_metrics", metrics)
    assert [p.name for p in (tmp_path / "checkpoints" / "sae").glob("*.json")] == ["000000200.json"]
    resumed = train_sae(ACTIVATIONS, "topk", N_FEATURES, run=Run(tmp_path, None, quiet=True), **kwargs)
    uninterrupted = trained("topk", k=6, d_sae=N_FEATURES)
    for a, b in zip(jax.tree.leaves((resumed.sae, resumed.history, resumed.since_fired)),
                    jax.tree.leaves((uninterrupted.sae, uninterrupted.history, uninterrupted.since_fired)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def random_sae(architecture, d_in=D_IN, d_sae=48, seed=0, apply_b_dec_to_input=True, site="blocks.1.resid_post"):
    """An untrained SAE with every array nonzero, so file layouts and conventions show."""
    keys = jax.random.split(jax.random.key(seed), 4)
    sae = SAE.init(d_in, d_sae, architecture, key=keys[0], k=5 if "topk" in architecture else None,
                   threshold=0.2, apply_b_dec_to_input=apply_b_dec_to_input, site=site)
    sae = eqx.tree_at(lambda s: (s.b_enc, s.b_dec), sae, (0.1 * jax.random.normal(keys[1], (d_sae,)),
                                                           0.1 * jax.random.normal(keys[2], (d_in,))))
    if sae.threshold is not None:
        sae = eqx.tree_at(lambda s: s.threshold, sae, jax.random.uniform(keys[3], (d_sae,), maxval=0.4))
    return sae


X = jnp.asarray(planted(64, seed=1)[0])


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_layout_round_trips(tmp_path, architecture):
    sae = random_sae(architecture)
    save_saelens(sae, tmp_path, model_name="toy")
    config = json.loads((tmp_path / "cfg.json").read_text())
    assert config["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(architecture, architecture)
    assert config["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and config["d_sae"] == 48
    loaded = load_saelens(tmp_path)
    assert loaded.site == "blocks.1.resid_post" and loaded.k == (5 if architecture == "topk" else None)
    np.testing.assert_array_equal(loaded.W_enc, sae.W_enc)
    np.testing.assert_array_equal(loaded.encode(X), sae.encode(X))
    np.testing.assert_array_equal(loaded(X), sae(X))


@pytest.mark.parametrize("architecture", ["relu", "batchtopk", "jumprelu"])
def test_gemma_scope_layout_round_trips(tmp_path, architecture):
    sae = random_sae(architecture)
    path = save_gemma_scope(sae, tmp_path)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        # Gemma Scope's own encoder, written out: relu(x W_enc + b_enc) gated by the threshold.
        pre = np.asarray(X) @ data["W_enc"] + data["b_enc"]
        expected = np.where(pre > data["threshold"], np.maximum(pre, 0), 0)
    loaded = load_gemma_scope(tmp_path, site="blocks.1.resid_post")
    assert loaded.architecture == "jumprelu" and not loaded.apply_b_dec_to_input
    np.testing.assert_allclose(sae.encode(X), expected, atol=3e-6, rtol=0)  # numpy vs XLA: measured 3.6e-7
    np.testing.assert_allclose(loaded(X), sae(X), atol=3e-6, rtol=0)  # measured 3.6e-7
    with pytest.raises(ValueError, match="topk SAE has no Gemma Scope"):
        save_gemma_scope(random_sae("topk"), tmp_path)


def test_bad_inputs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown SAE architecture 'top_k'"):
        SAE.init(4, 8, "top_k", key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs an int k"):
        SAE.init(4, 8, "topk", key=jax.random.key(0))
    with pytest.raises(ValueError, match="last axis must be d_in=32"):
        random_sae("relu").encode(jnp.ones((2, 31)))
    with pytest.raises(ValueError, match="needs k"):
        train_sae(ACTIVATIONS, "batchtopk", 64, steps=10)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_saelens(tmp_path)


# SAELens interop ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saelens():
    return pytest.importorskip("sae_lens", reason="sae-lens (the reference library) is not installed")


def torch_encode_decode(sae, x):
    import torch

    with torch.no_grad():
        latents = sae.encode(torch.from_numpy(np.array(x)))
        return latents.numpy(), sae.decode(latents).numpy()


@pytest.mark.parametrize("architecture, apply_b_dec", [("relu", True), ("topk", True), ("batchtopk", True),
                                                       ("jumprelu", False)])
def test_saelens_loads_what_jinterp_saves(saelens, tmp_path, architecture, apply_b_dec):
    sae = random_sae(architecture, apply_b_dec_to_input=apply_b_dec)
    save_saelens(sae, tmp_path)
    theirs = saelens.SAE.load_from_disk(tmp_path)
    latents, reconstruction = torch_encode_decode(theirs, X)
    # One matmul and an activation in each library's float32: measured 3.6e-7 and 3.6e-7.
    np.testing.assert_allclose(latents, sae.encode(X), atol=3e-6, rtol=0)
    np.testing.assert_allclose(reconstruction, sae(X), atol=3e-6, rtol=0)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_jinterp_loads_what_saelens_saves(saelens, tmp_path, architecture):
    import torch
    from sae_lens.saes.sae import SAEMetadata

    configs = {"standard": (saelens.StandardSAE, saelens.StandardSAEConfig, {}),
               "topk": (saelens.TopKSAE, saelens.TopKSAEConfig, {"k": 5}),
               "jumprelu": (saelens.JumpReLUSAE, saelens.JumpReLUSAEConfig, {"apply_b_dec_to_input": False})}
    cls, config, extra = configs[architecture]
    theirs = cls(config(d_in=D_IN, d_sae=48, metadata=SAEMetadata(hook_name="blocks.2.attn.hook_z"), **extra))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        if architecture == "jumprelu":
            theirs.threshold.abs_()
    theirs.save_model(tmp_path)
    ours = load_saelens(tmp_path)
    assert ours.site == "blocks.2.attn.z" and ours.architecture == {"standard": "relu"}.get(architecture, architecture)
    latents, reconstruction = torch_encode_decode(theirs, X)
    np.testing.assert_allclose(ours.encode(X), latents, atol=1e-5, rtol=0)  # measured 7.2e-7
    np.testing.assert_allclose(ours.decode(ours.encode(X)), reconstruction, atol=1e-5, rtol=0)  # measured 1.4e-6


def test_gemma_scope_file_matches_saelens_jumprelu_without_input_b_dec(saelens, tmp_path):
    import torch

    sae = random_sae("jumprelu")
    save_gemma_scope(sae, tmp_path)
    with np.load(tmp_path / "params.npz", allow_pickle=False) as data:  # as SAELens' Gemma Scope loader reads it
        state = {name: torch.from_numpy(data[name]) for name in data.files}
    theirs = saelens.JumpReLUSAE(saelens.JumpReLUSAEConfig(d_in=D_IN, d_sae=48, apply_b_dec_to_input=False))
    theirs.load_state_dict(state)
    latents, reconstruction = torch_encode_decode(theirs, X)
    np.testing.assert_allclose(load_gemma_scope(tmp_path).encode(X), latents, atol=3e-6, rtol=0)  # measured 3.6e-7
    np.testing.assert_allclose(sae(X), reconstruction, atol=3e-6, rtol=0)  # measured 3.6e-7


# Splicing ----------------------------------------------------------------------------------------

TOKENS = random_tokens(TOY.d_vocab, (2, 9))
SITE = "blocks.1.resid_post"


def toy_sae(architecture="topk", site=SITE, d_in=TOY.d_model):
    return random_sae(architecture, d_in=d_in, d_sae=40, seed=4, site=site)


def clean(toy, site=SITE):
    logits, cache = jinterp.run(toy, TOKENS, capture=[site])
    return logits, cache[site]


def test_splice_keeping_the_error_leaves_the_forward_unchanged(toy):
    logits, _ = clean(toy)
    spliced, _ = jinterp.run(toy, TOKENS, edits=[SAESplice(SITE, toy_sae())])
    np.testing.assert_allclose(spliced, logits, atol=1e-5, rtol=0)  # measured 1.2e-6
    z_sae = toy_sae("relu", site="blocks.0.attn.z", d_in=TOY.n_heads * TOY.d_head)  # heads flattened (hook_z)
    spliced, _ = jinterp.run(toy, TOKENS, edits=[SAESplice(None, z_sae)])
    np.testing.assert_allclose(spliced, logits, atol=5e-5, rtol=0)  # measured 5.8e-6


def test_splice_dropping_the_error_continues_with_the_reconstruction(toy):
    logits, x = clean(toy)
    sae = toy_sae()
    spliced, cache = jinterp.run(toy, TOKENS, capture=[SITE], edits=[SAESplice(SITE, sae, keep_error=False)])
    # Other programs: measured 0 and 0; 8 eps32 x the values' scale (18, 5.3) allowed.
    np.testing.assert_allclose(cache[SITE], sae(x), atol=2e-5, rtol=0)  # the site lost its reconstruction error
    replaced, _ = jinterp.run(toy, TOKENS, edits=[jinterp.Replace(SITE, sae(x))])
    np.testing.assert_allclose(spliced, replaced, atol=5e-6, rtol=0)
    assert np.abs(np.asarray(spliced - logits)).max() > 1e-2  # measured 6.6


def test_clamping_a_latent_moves_the_site_by_its_decoder_row(toy):
    _, x = clean(toy)
    sae = toy_sae()
    latents = sae.encode(x)
    splice = SAESplice(SITE, sae).clamp([7], 2.5)
    _, cache = jinterp.run(toy, TOKENS, capture=[SITE], edits=[splice])
    expected = (2.5 - latents[..., 7:8]) * sae.W_dec[7]
    np.testing.assert_allclose(cache[SITE] - x, expected, atol=2e-5, rtol=0)  # measured 1.9e-6
    first, second = np.argsort(-np.asarray(latents[0, 3]))[:2]  # latents active at position 3
    ablated = SAESplice(SITE, sae, positions=[3]).ablate([first, second])
    _, cache = jinterp.run(toy, TOKENS, capture=[SITE], edits=[ablated])
    change = np.asarray(cache[SITE] - x)
    removed = latents[:, 3, first, None] * sae.W_dec[first] + latents[:, 3, second, None] * sae.W_dec[second]
    assert np.abs(np.asarray(removed)).max() > 1e-2  # measured 9.2
    np.testing.assert_allclose(change[:, 3], -removed, atol=2e-5, rtol=0)  # measured 1.9e-6
    assert not np.abs(np.delete(change, 3, axis=1)).max() > 1e-5  # measured 0
    steered = SAESplice(SITE, sae).steer([7], 1.5)
    _, cache = jinterp.run(toy, TOKENS, capture=[SITE], edits=[steered])
    np.testing.assert_allclose(cache[SITE] - x, jnp.broadcast_to(1.5 * sae.W_dec[7], x.shape), atol=2e-5,
                               rtol=0)  # measured 1.7e-6


def test_latent_gradients_are_decoder_rows_times_the_site_gradient(toy):
    sae = toy_sae()

    def metric(edit):
        logits, _ = jinterp.run(toy, TOKENS, edits=[edit])
        return logits[:, -1, 3].sum()

    by_latent = eqx.filter_grad(metric)(SAESplice(SITE, sae)).shift
    by_direction = eqx.filter_grad(metric)(jinterp.Add(SITE, jnp.zeros(TOY.d_model))).vector
    np.testing.assert_allclose(by_latent, sae.W_dec @ by_direction, rtol=1e-5, atol=1e-6)  # measured 6e-8
    assert np.abs(np.asarray(by_latent)).max() > 1e-3  # measured 0.25


def test_splice_errors_name_the_mismatch(toy):
    with pytest.raises(ValueError, match="d_in=32"):
        jinterp.run(toy, TOKENS, edits=[SAESplice(SITE, random_sae("relu"))])
    with pytest.raises(ValueError, match="latent 40 is out of range"):
        SAESplice(SITE, toy_sae()).ablate([40])
    with pytest.raises(ValueError, match="needs a site"):
        SAESplice(None, toy_sae(site=None))


def test_model_activations_stream_from_the_forward(toy):
    tokens = random_tokens(TOY.d_vocab, (16, 6))
    source = ModelActivations(toy, tokens, SITE, sequences_per_batch=4, skip=1)
    assert source.d_in == TOY.d_model and source.batch_size == 4 * 5
    _, cache = jinterp.run(toy, tokens, capture=[SITE])
    every = np.asarray(cache[SITE][:, 1:]).reshape(-1, TOY.d_model)
    batch = np.asarray(source(jnp.int32(3)))
    assert batch.shape == (20, TOY.d_model)
    distances = np.abs(batch[:, None] - every[None]).max(-1).min(-1)  # each row is some token's activation
    # Streamed by another program than the capture's: measured 0 and 0; 8 eps32 x the scale (28) allowed.
    assert distances.max() < 3e-5
    np.testing.assert_allclose(source.all(), every, atol=3e-5, rtol=0)  # sequence by sequence
    assert source.n_tokens == len(every) == 16 * 5
    # Through a shuffle buffer of 100 activations, 40 trained on per step, 20 of them then fresh.
    result = train_sae(source, "topk", 64, k=4, steps=20, lr=LR, eval_every=10, sample_size=80, batch_size=40,
                       shuffle_buffer=100, progress=False)
    assert result.sae.site == SITE and np.isfinite(result.history["loss"]).all()
    with pytest.raises(ValueError, match="source.batch_size=20 <= batch_size=10 <= shuffle_buffer=100"):
        train_sae(source, "topk", 64, k=4, batch_size=10, shuffle_buffer=100)


def test_a_shuffle_buffer_trains_on_its_rows_and_refills_the_first_of_them():
    sae = random_sae("topk")
    buffer, fresh = (jnp.asarray(planted(n, seed=n)[0]) for n in (64, 8))
    slots = jnp.asarray([5, 60, 0, 17, 33, 2, 40, 9, 11, 50, 8, 1])  # 12 trained on, the first 8 refilled
    loss = training.SAELoss(**{name: jnp.float32(value) for name, value in dict(
        input_scale=1.0, target_scale=1.0, l1_coefficient=0.0, l0_coefficient=0.0, bandwidth=0.001,
        aux_coefficient=0.0, dead_window=1e6, threshold_rate=0.01).items()}, aux_k=4)
    state = training.SAEState(sae, jnp.zeros(sae.d_sae), buffer)
    np.testing.assert_allclose(loss(state, Refill(fresh, slots)),
                               loss(training.SAEState(sae, jnp.zeros(sae.d_sae)), buffer[slots]), rtol=1e-6)  # 0
    optimizer = training.sae_optimizer("topk", 1e-3, 10)
    updates, _ = optimizer.update(jax.grad(loss)(state, Refill(fresh, slots)), optimizer.init(state), state)
    after = np.asarray(optax.apply_updates(state, updates).buffer)
    np.testing.assert_allclose(after[slots[:8]], fresh, rtol=1e-6, atol=1e-6)
    untouched = np.setdiff1d(np.arange(64), slots[:8])
    np.testing.assert_array_equal(after[untouched], np.asarray(buffer)[untouched])


def mean_loss(logits, tokens, first=0):
    """Mean next-token cross-entropy (optax) of the predictions made from positions >= first."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return float(losses[:, first:].mean())


def test_splice_losses_equal_the_losses_of_replaced_sites(toy):
    tokens = random_tokens(TOY.d_vocab, (5, 9), seed=3)
    sae = toy_sae("relu")
    _, cache = jinterp.run(toy, tokens, capture=[SITE])
    x = cache[SITE]
    skip = 2  # positions 0 and 1 untouched and their predictions not counted (all positions: the padding test)
    losses = splice_losses(toy, sae, tokens, batch_size=2, skip=skip, progress=False)
    positions = np.arange(skip, 9)
    runs = {"clean": [], "spliced": [jinterp.Replace(SITE, sae(x), positions=positions)],
            "zero_ablated": [jinterp.Replace(SITE, jnp.zeros_like(x), positions=positions)]}
    for name, edits in runs.items():
        logits, _ = jinterp.run(toy, tokens, edits=edits)
        assert getattr(losses, name) == pytest.approx(mean_loss(logits, tokens, skip), rel=1e-6), name  # 8e-8
    assert losses.tokens == 5 * (8 - skip)
    expected = (losses.zero_ablated - losses.spliced) / (losses.zero_ablated - losses.clean)
    assert losses.as_dict()["ce_loss_recovered"] == pytest.approx(expected)
    assert losses.spliced > losses.clean + 1e-3  # an untrained SAE is a poor stand-in


def test_splice_losses_skip_padding(toy):
    lengths = (9, 5)
    tokens = random_tokens(TOY.d_vocab, (2, 9), seed=5)
    padded, mask = tokens.copy(), np.arange(9)[None] < np.asarray(lengths)[:, None]
    padded[~mask] = 0
    sae = toy_sae("topk")
    together = splice_losses(toy, sae, padded, attention_mask=mask.astype(np.int32), progress=False)
    alone = [splice_losses(toy, sae, tokens[i:i + 1, :n], progress=False) for i, n in enumerate(lengths)]
    assert together.tokens == sum(n - 1 for n in lengths)
    for name in ("clean", "spliced", "zero_ablated"):
        expected = sum(getattr(a, name) * a.tokens for a in alone) / together.tokens
        assert getattr(together, name) == pytest.approx(expected, rel=1e-6), name  # measured 5e-8


def test_feature_attribution_is_latents_times_their_gradients(toy):
    sae = toy_sae()

    def metric(logits):
        return logits[:, -1, 3].sum()

    scores = feature_attribution(toy, TOKENS, sae, metric)
    _, x = clean(toy)

    def by_site(vector):
        logits, _ = jinterp.run(toy, TOKENS, edits=[jinterp.Add(SITE, vector)])
        return metric(logits)

    site_gradient = jax.grad(by_site)(jnp.zeros_like(x))  # d metric / d site at every position
    expected = sae.encode(x) * (site_gradient @ sae.W_dec.T)
    assert scores.shape == (*TOKENS.shape, sae.d_sae)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)  # measured 1.4e-6
    assert np.abs(np.asarray(scores)).max() > 1e-3  # measured 1.2
    with pytest.raises(ValueError, match="needs a site"):
        feature_attribution(toy, TOKENS, toy_sae(site=None), metric)


SHORT_SAE = ["site=blocks.2.resid_post", "d_sae=64", "k=4", "steps=4", "batch_size=60", "sequences_per_step=2",
             "shuffle_buffer=120", "seq_len=16", "eval_every=2", "held_out=4", "latents_shown=2"]


def test_shortened_sae_experiment_on_real_text(tiny_model, tmp_path):
    cfg = runs.make_config(sae_experiment.Config, overrides=[f"model={tiny_model}", *SHORT_SAE])
    results = runs.execute(sae_experiment.EXPERIMENT, cfg, tmp_path, quiet=True)
    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert metrics["tokens"] == {"fresh": 4 * 2 * 15, "served": 4 * 60, "held_out": 4 * 15,
                                 "train_available": metrics["tokens"]["train_available"]}
    assert metrics["l0"] <= 4 and 0 < metrics["explained_variance"] < 1
    losses = [metrics[f"loss_{k}"] for k in ("clean", "spliced", "zero_ablated")]
    assert metrics["ce_loss_recovered"] == pytest.approx((losses[2] - losses[1]) / (losses[2] - losses[0]))
    contexts = results["contexts"]
    assert set(np.asarray(contexts["latent"]).tolist()) <= set(np.asarray(results["evaluation"]["chosen"]).tolist())
    assert all(token and "\n" not in before for before, token in zip(contexts["before"], contexts["token"]))
    saved = load_saelens(tmp_path / "sae")
    assert (saved.site, saved.d_sae, saved.k) == ("blocks.2.resid_post", 64, 4)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "of the cross-entropy loss recovered" in page
    assert_identical(results, runs.execute(sae_experiment.EXPERIMENT, cfg, tmp_path, quiet=True))  # restored


def test_sparse_topk_encoder_and_decoder_equal_the_dense_sae_with_their_gradients():
    sae = random_sae("topk", d_sae=128)  # 16 blocks of 8 for k=5: top_k takes its two-stage path
    x = jnp.asarray(planted(24, seed=7)[0]).reshape(2, 12, D_IN)  # leading axes are kept
    bias = sae.b_enc - sae.b_dec @ sae.W_enc

    def sparse(W_enc, b_enc, W_dec, x):
        values, indices = topk_encode(x, W_enc, b_enc, sae.k)
        return jnp.sum(jnp.sin(topk_decode(jax.nn.relu(values), indices, W_dec)))

    def dense(W_enc, b_enc, W_dec, x):  # the plain TopK latents through the plain decoder
        pre = x @ W_enc + b_enc
        kth = jnp.sort(pre, axis=-1)[..., -sae.k, None]
        return jnp.sum(jnp.sin(jnp.where(pre >= kth, jax.nn.relu(pre), 0.0) @ W_dec))

    arguments = (sae.W_enc, bias, sae.W_dec, x)
    # The sparse decoder sums in another order than the dense matmul: measured 0 (value), 1.9e-6 (gradients).
    np.testing.assert_allclose(sparse(*arguments), dense(*arguments), rtol=1e-6)
    for got, expected in zip(jax.grad(sparse, range(4))(*arguments), jax.grad(dense, range(4))(*arguments)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape, k", [((64, 4608), 32), ((3, 5, 256), 4), ((7, 100), 3), ((4, 64), 8)])
def test_top_k_equals_lax_top_k(shape, k):  # two-stage where it pays (the first two), lax.top_k otherwise
    x = jax.random.normal(jax.random.key(0), shape)
    values, indices = top_k(x, k)
    expected_values, expected_indices = jax.lax.top_k(x, k)
    chex.assert_trees_all_equal((values, indices), (expected_values, expected_indices))
    weights = jax.random.normal(jax.random.key(1), (*shape[:-1], k))
    grad = jax.grad(lambda x: jnp.sum(weights * top_k(x, k)[0]))(x)
    chex.assert_trees_all_equal(grad, jax.grad(lambda x: jnp.sum(weights * jax.lax.top_k(x, k)[0]))(x))


@pytest.mark.parametrize("n_dead", [0, 3, 8, 9, 20, 40, 64])
def test_aux_k_loss_equals_the_dense_formula_at_every_gathered_width(n_dead):
    k_aux, d_sae = 8, 64  # widths 8, 16, 32, 64
    keys = jax.random.split(jax.random.key(n_dead), 6)
    residual, x = jax.random.normal(keys[0], (32, D_IN)), jax.random.normal(keys[1], (32, D_IN))
    W_enc, b_enc = jax.random.normal(keys[2], (D_IN, d_sae)), jax.random.normal(keys[3], (d_sae,))
    W_dec = jax.random.normal(keys[4], (d_sae, D_IN))
    dead = jax.random.permutation(keys[5], d_sae) < n_dead

    def dense(residual, x, W_enc, b_enc, W_dec):  # every latent's pre-activation, the dead ones' top k_aux kept
        pre = jnp.where(dead, x @ W_enc + b_enc, -jnp.inf)
        kth = jnp.sort(pre, axis=-1)[:, -k_aux, None]
        latents = jnp.where(dead & (pre >= kth), pre, 0.0)
        return min(n_dead / k_aux, 1.0) * jnp.mean(jnp.sum((latents @ W_dec - residual) ** 2, axis=-1))

    arguments = (residual, x, W_enc, b_enc, W_dec)
    loss = jax.jit(lambda *a: training.aux_k_loss(*a, dead, k_aux))
    np.testing.assert_allclose(loss(*arguments), dense(*arguments), rtol=1e-5)  # measured 7.7e-7 relative
    gradients = jax.grad(loss, range(5))(*arguments)
    for got, expected in zip(gradients, jax.grad(dense, range(5))(*arguments)):  # measured 7.6e-5 at 512
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
    assert n_dead or not any(np.any(g) for g in gradients)
    with pytest.raises(ValueError, match=r"k_aux must be an int in \[1, d_sae=64\], got 65"):
        training.aux_k_loss(*arguments, dead, d_sae + 1)
