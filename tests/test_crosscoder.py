"""Crosscoders: trained on two models' activations where some directions exist in one model only,
they recover those as model-specific and the rest as shared (BatchTopK and L1 variants); latent
scaling computes what its closed form says; activations stream from two models in one compiled
step, training resumes to the same bits, and files round-trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from conftest import TOY, random_tokens

import jinterp
from jinterp.loading.tokenizer import Specials, Tokenizer
from jinterp.runs import Run
from jinterp.sae import SAE
from jinterp.sae import training as sae_training
from jinterp.sae.crosscoder import (
    Crosscoder,
    CrosscoderActivations,
    latent_scaling,
    load_crosscoder,
    relative_norm_classes,
    relative_norm_histogram,
    save_crosscoder,
    train_crosscoder,
)

D, N_SHARED, N_ONLY, D_SAE = 32, 16, 8, 64
STEPS, BATCH, LR = 400, 256, 1e-2


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def two_models(n=8192, seed=0):
    """Activations [n, 2, D] of a "base" and a "fine_tune" model: N_SHARED features both models
    write (each along its own direction in each model), N_ONLY base-only features and N_ONLY
    fine-tune-only ones; each feature on with probability 1/16. Returns the activations and the
    planted directions: shared (in base, in fine_tune), base-only, fine-tune-only."""
    fixed = np.random.default_rng(0)
    shared_base, shared_ft = unit(fixed.normal(size=(N_SHARED, D))), unit(fixed.normal(size=(N_SHARED, D)))
    base_only, ft_only = unit(fixed.normal(size=(N_ONLY, D))), unit(fixed.normal(size=(N_ONLY, D)))
    rng = np.random.default_rng(seed)

    def codes(m):
        return (rng.random((n, m)) < 1 / 16) * rng.uniform(0.5, 1.5, (n, m))

    shared, b, f = codes(N_SHARED), codes(N_ONLY), codes(N_ONLY)
    base = shared @ shared_base + b @ base_only + 0.2
    ft = shared @ shared_ft + f @ ft_only - 0.1
    return np.stack([base, ft], axis=1).astype(np.float32), (shared_base, shared_ft, base_only, ft_only)


ACTIVATIONS, PLANTED = two_models()


def best_latents(directions, W_dec_model):
    """For each planted direction, the latent whose decoder direction in that model matches it best, and the cosine."""
    cosines = directions @ unit(np.asarray(W_dec_model) + 1e-30).T
    return cosines.argmax(axis=1), cosines.max(axis=1)


@pytest.fixture(scope="module")
def batchtopk():
    return train_crosscoder(ACTIVATIONS, "batchtopk", D_SAE, k=2, steps=STEPS, batch_size=BATCH, lr=LR,
                            progress=False)


def check_recovery(cc: Crosscoder):
    """Every planted direction has a latent that matches it in its model, with the relative norm of its kind."""
    shared_base, shared_ft, base_only, ft_only = PLANTED
    r = np.asarray(cc.relative_norms("base", "fine_tune"))
    found = {}
    for kind, directions, model in [("base_only", base_only, 0), ("fine_tune_only", ft_only, 1),
                                    ("shared", shared_base, 0)]:
        latents, cosines = best_latents(directions, cc.W_dec[:, model])
        found[kind] = (latents, cosines, r[latents])
    return found


def test_a_batchtopk_crosscoder_finds_the_directions_only_one_model_has(batchtopk):
    cc = batchtopk.crosscoder
    assert (cc.n_models, cc.d_model, cc.d_sae, cc.models) == (2, D, D_SAE, ("base", "fine_tune"))
    # k = 2: the planted codes' mean L0 (k = 3 or 4 split some features between latents).
    assert float(batchtopk.history["explained_variance"][-1]) > 0.95  # measured 0.99996
    found = check_recovery(cc)
    for kind in found:
        assert found[kind][1].min() > 0.95, kind  # measured 0.9999 for each kind
    assert found["fine_tune_only"][2].min() > 0.9  # measured 0.993 (1: fine-tune only)
    assert found["base_only"][2].max() < 0.1  # measured 0.005
    assert np.abs(found["shared"][2] - 0.5).max() < 0.05  # measured 0.0004
    # A shared latent writes its planted direction into the fine-tune too.
    shared_latents = found["shared"][0]
    ft_cosines = np.sum(PLANTED[1] * unit(np.asarray(cc.W_dec[shared_latents, 1])), axis=1)
    assert ft_cosines.min() > 0.95  # measured 0.9999
    classes = relative_norm_classes(cc)
    assert set(classes) == {"base_only", "fine_tune_only", "shared", "other"}
    assert set(found["fine_tune_only"][0]) <= set(classes["fine_tune_only"])
    assert set(found["base_only"][0]) <= set(classes["base_only"])
    counts, edges = relative_norm_histogram(cc, bins=10)
    assert counts.sum() == D_SAE and edges[0] == 0 and edges[-1] == 1
    assert counts[-1] >= N_ONLY and counts[0] >= N_ONLY
    # Decoder rows are unit norm over both models together in training (the input scale folded in after).
    np.testing.assert_allclose(np.linalg.norm(cc.sae.W_dec, axis=1) * batchtopk.input_scale, 1.0,
                               atol=1e-6)  # measured 1.2e-7


def test_an_l1_crosscoder_penalises_the_sum_of_per_model_decoder_norms():
    result = train_crosscoder(ACTIVATIONS, "relu", D_SAE, l1_coefficient=1.0, steps=STEPS, batch_size=BATCH, lr=LR,
                              progress=False)
    cc = result.crosscoder
    found = check_recovery(cc)
    assert float(result.history["explained_variance"][-1]) > 0.9  # measured 0.981
    assert found["fine_tune_only"][1].min() > 0.95 and found["base_only"][1].min() > 0.95  # measured 0.9999 both
    assert found["fine_tune_only"][2].min() > 0.9  # measured 0.999
    assert found["base_only"][2].max() < 0.1  # measured 0.0003
    assert np.abs(found["shared"][2] - 0.5).max() < 0.25  # measured 0.071
    # The penalty is the sum of per-model norms, not the norm of the concatenated row.
    W = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2 * D)), jnp.float32)
    per_model = sae_training.decoder_norms(W, 2)
    np.testing.assert_allclose(per_model, np.stack([np.linalg.norm(W[:, :D], axis=1),
                                                    np.linalg.norm(W[:, D:], axis=1)], 1), rtol=1e-6)  # fp32 rounding
    np.testing.assert_array_equal(sae_training.decoder_norms(W)[:, 0], jnp.linalg.norm(W, axis=-1))


def test_latent_scaling_is_the_closed_form_least_squares_fit():
    """A hand-built crosscoder: latent 0 writes d only into the fine-tune, but the base's activations
    hold 0.5 d wherever it fires (complete shrinkage: nu_error = 0.5); latent 1 is fine-tune-only
    and the base's reconstruction carries 0.25 of its direction through latent 2 (decoupling)."""
    d, rng = 4, np.random.default_rng(0)
    e = np.eye(d, dtype=np.float32)
    W_dec = np.zeros((3, 2, d), np.float32)
    W_dec[0, 1] = e[0]
    W_dec[1, 1] = e[1]
    W_dec[2, 0] = 0.25 * e[1]
    W_enc = np.zeros((2, d, 3), np.float32)
    W_enc[1, :, 0] = e[0]
    W_enc[1, :, 1] = e[1]
    W_enc[1, :, 2] = e[1]
    sae = SAE(jnp.asarray(W_enc.reshape(2 * d, 3)), jnp.zeros(3), jnp.asarray(W_dec.reshape(3, 2 * d)),
              jnp.zeros(2 * d), None, architecture="relu")
    cc = Crosscoder(sae, ("base", "fine_tune"))
    f = rng.uniform(0, 2, (100, 2)).astype(np.float32)
    x = np.zeros((100, 2, d), np.float32)
    x[:, 1, 0], x[:, 1, 1] = f[:, 0], f[:, 1]
    x[:, 0, 0] = 0.5 * f[:, 0]
    x[:, 0, 1] = 0.25 * f[:, 1]
    scaling = latent_scaling(cc, x, [0, 1], batch=32)
    np.testing.assert_allclose(scaling.nu_error, [0.5, 0.0], atol=1e-6)  # measured 6e-8
    np.testing.assert_allclose(scaling.nu_reconstruction, [0.0, 0.25], atol=1e-6)  # measured 3e-8
    np.testing.assert_allclose(scaling.beta_error[:, 1], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        latent_scaling(cc, x, [3])


def test_the_trained_fine_tune_only_latents_scale_to_nothing_in_the_base(batchtopk):
    cc = batchtopk.crosscoder
    latents = best_latents(PLANTED[3], cc.W_dec[:, 1])[0]
    scaling = latent_scaling(cc, ACTIVATIONS, latents)
    # In the fine-tune each fit is about 1; the base's activations and reconstruction hold next to nothing
    # along those directions (what a latent that only looked fine-tune-only would show: about 1).
    assert np.abs(scaling.beta_error[:, 1] - 1).max() < 0.05  # measured 0.003
    assert np.abs(scaling.nu_error).max() < 0.01  # measured 0.0009
    assert np.abs(scaling.nu_reconstruction).max() < 0.5  # measured 0.087


def test_files_round_trip_with_the_model_axis(batchtopk, tmp_path):
    cc = batchtopk.crosscoder
    path = save_crosscoder(eqx_site(cc, "blocks.1.resid_post"), tmp_path / "cc", model_names=("toy", "toy-ft"))
    config = json.loads((path / "cfg.json").read_text())
    assert (config["d_in"], config["n_models"], config["architecture"]) == (D, 2, "jumprelu")
    assert config["crosscoder"]["models"] == ["base", "fine_tune"]
    assert config["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    from safetensors.numpy import load_file
    weights = load_file(str(path / "sae_weights.safetensors"))
    assert weights["W_dec"].shape == (D_SAE, 2, D) and weights["W_enc"].shape == (2, D, D_SAE)
    np.testing.assert_array_equal(weights["W_dec"][:, 1], np.asarray(cc.W_dec[:, 1]))
    loaded = load_crosscoder(path)
    assert loaded.site == "blocks.1.resid_post" and loaded.models == cc.models
    x = jnp.asarray(ACTIVATIONS[:64])
    np.testing.assert_array_equal(loaded(x), cc(x))  # the same arrays, the same function
    with pytest.raises(ValueError, match="plain SAE"):
        from jinterp.sae import save_saelens
        load_crosscoder(save_saelens(cc.sae, tmp_path / "plain"))


def eqx_site(cc, site):
    import dataclasses
    return Crosscoder(dataclasses.replace(cc.sae, site=site), cc.models)


# Streaming from two models -----------------------------------------------------------------------

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def fine_tuned(toy):
    """The toy model with its embeddings moved: a stand-in fine-tune of the same architecture."""
    import equinox as eqx
    noise = jax.random.normal(jax.random.key(7), toy.W_E.shape) * 0.1
    return eqx.tree_at(lambda m: m.W_E, toy, toy.W_E + noise)


def test_two_models_stream_in_one_compiled_step_and_resume_to_the_same_bits(toy, fine_tuned, tmp_path,
                                                                            monkeypatch):
    tokens = random_tokens(TOY.d_vocab, (40, 9), seed=3)
    source = CrosscoderActivations((toy, fine_tuned), tokens, SITE, sequences_per_batch=4, skip=1)
    assert (source.d_in, source.batch_size, source.names) == (2 * TOY.d_model, 32, ("base", "fine_tune"))
    # What a step serves: both models' activations on the same sequences, side by side.
    batch = jax.jit(lambda step: source(step))(jnp.int32(5))
    rows = jax.random.randint(jax.random.fold_in(jax.random.key(0), 5), (4,), 0, 40)
    expected = [jinterp.run(m, tokens[np.asarray(rows)], capture=[SITE])[1][SITE][:, 1:].reshape(-1, TOY.d_model)
                for m in (toy, fine_tuned)]
    expected = np.concatenate(expected, -1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(batch, expected, atol=2e-5 * scale, rtol=0)  # measured 2.5e-5 = 1.1e-6 x scale
    # Exactly what each model's own ModelActivations serves at that step, side by side.
    own = jax.jit(lambda step: jnp.concatenate([s(step) for s in source.sources], -1))(jnp.int32(5))
    np.testing.assert_array_equal(batch, own)
    expected = np.split(expected, 2, axis=-1)
    assert np.abs(np.asarray(expected[0]) - np.asarray(expected[1])).max() > 0.01  # the models differ
    all_tokens = source.all()
    assert all_tokens.shape == (40 * 8, 2, TOY.d_model)

    kwargs = dict(k=4, steps=30, lr=1e-3, eval_every=10, sample_size=256, progress=False)
    metrics, calls = sae_training._metrics, []

    def crash_at_step_20(*args):
        calls.append(None)
        if len(calls) == 3:  # evaluations at steps 0, 10, then 20: the checkpoint of 10 is on disk
            raise RuntimeError("interrupted")
        return metrics(*args)

    monkeypatch.setattr(sae_training, "_metrics", crash_at_step_20)
    with pytest.raises(RuntimeError, match="interrupted"):
        train_crosscoder(source, "batchtopk", 48, run=Run(tmp_path, None, quiet=True), **kwargs)
    monkeypatch.setattr(sae_training, "_metrics", metrics)
    assert [p.name for p in (tmp_path / "checkpoints" / "crosscoder").glob("*.json")] == ["000000010.json"]
    resumed = train_crosscoder(source, "batchtopk", 48, run=Run(tmp_path, None, quiet=True), **kwargs)
    uninterrupted = train_crosscoder(source, "batchtopk", 48, **kwargs)
    assert resumed.crosscoder.site == SITE
    for a, b in zip(jax.tree.leaves((resumed.crosscoder, resumed.history)),
                    jax.tree.leaves((uninterrupted.crosscoder, uninterrupted.history)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_models_that_do_not_fit_one_crosscoder_are_named(toy):
    other = jinterp.Transformer.init(TOY.replace(d_model=40, n_heads=5, d_head=8, n_kv_heads=5),
                                     jax.random.key(1), std=0.3)
    tokens = random_tokens(TOY.d_vocab, (4, 6))
    with pytest.raises(ValueError, match=r"'base' has \(36,\).*'chat' has \(40,\)"):
        CrosscoderActivations((toy, other), tokens, SITE, 2, names=("base", "chat"))
    vocab = jinterp.Transformer.init(TOY.replace(d_vocab=60), jax.random.key(1), std=0.3)
    with pytest.raises(ValueError, match=r"'base' has a vocabulary of 53 and 'fine_tune' of 60"):
        CrosscoderActivations((toy, vocab), tokens, SITE, 2)
    with pytest.raises(ValueError, match="two or more"):
        CrosscoderActivations((toy,), tokens, SITE, 2)
    def word_level(words):
        vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(TOY.d_vocab - len(words))])}
        return Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")), Specials())

    same = word_level(["<unk>", "a", "b"])
    CrosscoderActivations((toy, toy), tokens, SITE, 2, tokenizers=(same, word_level(["<unk>", "a", "b"])))
    with pytest.raises(ValueError, match=r"tokenizers of 'base' \(53 tokens\) and 'fine_tune' \(53 tokens\) differ"):
        CrosscoderActivations((toy, toy), tokens, SITE, 2, tokenizers=(same, word_level(["<unk>", "a", "c"])))
    with pytest.raises(ValueError, match="n_models"):
        train_crosscoder(ACTIVATIONS[:, 0], "batchtopk", 8, k=2)


def test_one_models_view_is_the_crosscoder_with_the_other_model_at_its_b_dec(batchtopk):
    cc = batchtopk.crosscoder
    x = jnp.asarray(ACTIVATIONS[:256])
    alone = jnp.stack([jnp.broadcast_to(cc.b_dec[0], x[:, 0].shape), x[:, 1]], axis=1)
    view = cc.model_sae("fine_tune")
    assert (view.d_in, view.d_sae, view.site) == (D, D_SAE, cc.site)
    # The same terms summed in another order: float32 rounding of the values' scale (tests/README.md); measured 0.
    scale = float(jnp.abs(cc.encode(alone)).max())
    np.testing.assert_allclose(view.encode(x[:, 1]), cc.encode(alone), atol=8 * np.finfo(np.float32).eps * scale,
                               rtol=0)
    latents = cc.encode(alone)
    scale = float(jnp.abs(cc.decode(latents)).max())  # another matmul shape: measured 1.2e-7, bound 1.0e-6
    np.testing.assert_allclose(view.decode(latents), cc.decode(latents)[:, 1],
                               atol=8 * np.finfo(np.float32).eps * scale, rtol=0)
    with pytest.raises(ValueError, match="base, fine_tune"):
        cc.model_sae("chat")
