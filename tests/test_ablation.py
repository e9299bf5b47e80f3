"""The intervention library: patching from caches, mean and resample ablation, projections, DAS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY, random_tokens

import jinterp
from jinterp import ablation

CLEAN = random_tokens(TOY.d_vocab, (3, 6), seed=4)
CORRUPT = random_tokens(TOY.d_vocab, (3, 6), seed=5)


def test_patching_every_layer_from_a_cache_reproduces_that_run(toy):
    clean_logits, clean = jinterp.run(toy, CLEAN, capture="blocks.*.resid_post")
    patched, _ = jinterp.run(toy, CORRUPT, edits=ablation.patch(clean, "blocks.*.resid_post", layers=[2]))
    # Bit-equal here (measured 0), but another program than the clean run's: 8 eps32 x the logits' scale (5.8).
    np.testing.assert_allclose(np.asarray(patched), np.asarray(clean_logits), atol=5e-6, rtol=0)
    one_layer = ablation.patch(clean, "blocks.1.resid_post", positions=[3])
    assert not one_layer.per_layer


def test_patching_heads_under_gqa(toy):
    _, clean = jinterp.run(toy, CLEAN, capture=["blocks.*.attn.v"])
    _, cache = jinterp.run(toy, CORRUPT, capture=["blocks.1.attn.v", "blocks.1.attn.z"],
                           edits=ablation.patch(clean, "blocks.*.attn.v", layers=[1], heads=[1]))
    v = np.asarray(cache["blocks.1.attn.v"])
    assert np.array_equal(v[:, :, 1], np.asarray(clean["blocks.1.attn.v"])[:, :, 1])
    _, corrupt = jinterp.run(toy, CORRUPT, capture=["blocks.1.attn.v"])
    assert np.array_equal(v[:, :, 0], np.asarray(corrupt["blocks.1.attn.v"])[:, :, 0])


def test_incomplete_source_caches_are_refused(toy):
    _, partial = jinterp.run(toy, CLEAN, capture=["blocks.1.resid_pre", "blocks.2.resid_pre"])
    with pytest.raises(KeyError, match="needs every layer in the source cache"):
        ablation.patch(partial, "blocks.*.resid_pre")
    _, nothing = jinterp.run(toy, CLEAN, capture=["embed"])
    with pytest.raises(KeyError, match="holds no layer of 'attn.z'"):
        ablation.patch(nothing, "blocks.*.attn.z")


def test_mean_and_resample_ablation(toy):
    _, reference = jinterp.run(toy, CORRUPT, capture="blocks.*.mlp_out")
    _, cache = jinterp.run(toy, CLEAN, capture="blocks.1.mlp_out",
                           edits=ablation.mean_ablate(reference, "blocks.*.mlp_out", layers=[1]))
    expected = np.asarray(reference["blocks.1.mlp_out"]).mean(0)
    np.testing.assert_allclose(np.asarray(cache["blocks.1.mlp_out"]), np.broadcast_to(expected, (3, 6, TOY.d_model)),
                               atol=3e-6, rtol=0)  # measured 4.8e-7
    _, over_pos = jinterp.run(toy, CLEAN, capture="blocks.1.mlp_out",
                              edits=ablation.mean_ablate(reference, "blocks.1.mlp_out", over_positions=True))
    np.testing.assert_allclose(np.asarray(over_pos["blocks.1.mlp_out"])[0, 0], expected.mean(0), atol=2e-6,
                               rtol=0)  # measured 2.4e-7
    _, resampled = jinterp.run(toy, CLEAN, capture="blocks.1.mlp_out",
                               edits=ablation.resample_ablate(reference, "blocks.1.mlp_out", jax.random.key(0)))
    got, source = np.asarray(resampled["blocks.1.mlp_out"]), np.asarray(reference["blocks.1.mlp_out"])
    matches = [[np.array_equal(got[i], source[j]) for j in range(3)] for i in range(3)]
    assert all(sum(row) == 1 for row in matches) and not any(matches[i][i] for i in range(3))


def test_project_out_and_keep(toy):
    basis = jax.random.normal(jax.random.key(1), (TOY.d_model, 3))
    _, kept = jinterp.run(toy, CLEAN, capture="blocks.1.resid_pre",
                          edits=jinterp.Project("blocks.1.resid_pre", basis, keep=True))
    _, removed = jinterp.run(toy, CLEAN, capture="blocks.1.resid_pre",
                             edits=jinterp.Project("blocks.1.resid_pre", basis))
    _, plain = jinterp.run(toy, CLEAN, capture="blocks.1.resid_pre")
    k, r, x = (np.asarray(c["blocks.1.resid_pre"]) for c in (kept, removed, plain))
    np.testing.assert_allclose(k + r, x, atol=1e-5, rtol=0)  # measured 9.5e-7
    q = np.linalg.qr(np.asarray(basis))[0]
    np.testing.assert_allclose(r @ q, 0, atol=2e-5)  # nothing left in the subspace; measured 2.2e-6
    np.testing.assert_allclose(k, (x @ q) @ q.T, atol=1e-5, rtol=0)  # measured 1.2e-6
    with pytest.raises(ValueError, match=r"Project basis at 'resid_pre' has shape \(35, 3\)"):
        jinterp.run(toy, CLEAN, edits=jinterp.Project("blocks.1.resid_pre", jnp.ones((35, 3))))


def test_interchange_in_a_rotated_subspace_is_learnable(toy):
    """DAS: swapping a 2-d subspace of the clean residual into the corrupted run; the full space
    (k = d_model) is plain patching; gradients reach the rotation."""
    _, clean = jinterp.run(toy, CLEAN, capture="blocks.*.resid_pre")
    full = jnp.eye(TOY.d_model)
    swapped = jinterp.Interchange("blocks.*.resid_pre", clean.stack("resid_pre"), full, per_layer=True, layers=[1])
    patched = jinterp.run(toy, CORRUPT, edits=swapped)[0]
    direct = jinterp.run(toy, CORRUPT, edits=ablation.patch(clean, "blocks.1.resid_pre"))[0]
    np.testing.assert_allclose(np.asarray(patched), np.asarray(direct), atol=2e-5, rtol=0)  # measured 2.4e-6

    def loss(rotation):
        edit = jinterp.Interchange("blocks.1.resid_pre", clean["blocks.1.resid_pre"], rotation)
        return jinterp.run(toy, CORRUPT, edits=edit)[0][:, -1, 3].mean()

    rotation = jax.random.normal(jax.random.key(2), (TOY.d_model, 2))
    grad = jax.grad(loss)(rotation)
    direction = jax.random.normal(jax.random.key(3), rotation.shape)
    eps = 1e-3
    finite = (loss(rotation + eps * direction) - loss(rotation - eps * direction)) / (2 * eps)
    # Central differences (eps 1e-3) in float32: measured 2.1e-3 relative.
    np.testing.assert_allclose(float((grad * direction).sum()), float(finite), rtol=2e-2)


def test_per_layer_values_must_cover_every_layer(toy):
    with pytest.raises(ValueError, match="per-layer with leading axis \\(2,\\); this model has 3 layers"):
        jinterp.run(toy, CLEAN, edits=jinterp.Replace("blocks.*.resid_pre", jnp.zeros((2, 3, 6, TOY.d_model)),
                                                      per_layer=True))
