"""FactoredMatrix against the dense product it stands for (float64 NumPy as the referee)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinterp.factored import FactoredMatrix

RNG = np.random.default_rng(0)
A = RNG.normal(size=(2, 3, 10, 4)).astype(np.float32)
B = RNG.normal(size=(2, 3, 4, 8)).astype(np.float32)
F = FactoredMatrix(A, B)
DENSE = A.astype(np.float64) @ B.astype(np.float64)


def close(ours, dense, measured_rel):
    """Within 5-50x the measured relative error of float32 against float64, scaled by the values' size."""
    scale = np.abs(dense).max()
    np.testing.assert_allclose(np.asarray(ours, np.float64), dense, atol=measured_rel * scale, rtol=0)


def test_shape_dense_transpose_and_indexing():
    assert F.shape == (2, 3, 10, 8) and F.rank == 4
    close(F.dense(), DENSE, 1e-6)  # measured 5.1e-8 (float32 matmul of 4 terms)
    close(F.T.dense(), np.swapaxes(DENSE, -1, -2), 1e-6)
    np.testing.assert_array_equal(F[1, 2].dense(), F.dense()[1, 2])  # the same matmul on the same rows
    assert F[1].shape == (3, 10, 8)
    shared = FactoredMatrix(A[0, 0], B)  # batch axes broadcast
    assert shared.shape == (2, 3, 10, 8) and shared[1, 2].shape == (10, 8)
    with pytest.raises(ValueError, match=r"needs A \[..., m, r\] and B \[..., r, n\]"):
        FactoredMatrix(A, B[..., :3, :])
    with pytest.raises(IndexError, match="3 indices for 2 batch axes"):
        F[0, 0, 0]


def test_products_stay_factored_and_equal_the_dense_products():
    C = RNG.normal(size=(8, 6)).astype(np.float32)
    G = FactoredMatrix(RNG.normal(size=(8, 2)).astype(np.float32), RNG.normal(size=(2, 5)).astype(np.float32))
    for ours, dense in ((F @ C, DENSE @ C), (F @ G, DENSE @ np.asarray(G.dense(), np.float64)),
                        (C.T @ F.T, C.T @ np.swapaxes(DENSE, -1, -2)), (2.5 * F, 2.5 * DENSE)):
        assert isinstance(ours, FactoredMatrix)
        close(ours.dense(), dense, 2e-6)  # measured 1.5e-7 at most
    assert (F @ G).rank == 2  # the smaller inner size is kept
    v = RNG.normal(size=8).astype(np.float32)
    close(F @ v, DENSE @ v, 2e-6)  # a vector gives an array, measured 7.0e-8
    w = RNG.normal(size=10).astype(np.float32)
    close(w @ F, w @ DENSE, 2e-6)  # measured 1.2e-7


def test_svd_norm_and_eigenvalues_come_from_the_small_core():
    U, S, Vh = F.svd()
    assert U.shape == (2, 3, 10, 4) and S.shape == (2, 3, 4) and Vh.shape == (2, 3, 4, 8)
    close(U @ (S[..., None] * Vh), DENSE, 5e-6)  # measured 7.2e-7
    close(jnp.swapaxes(U, -1, -2) @ U, np.broadcast_to(np.eye(4), (2, 3, 4, 4)), 5e-6)  # measured 7.2e-7
    dense_s = np.linalg.svd(DENSE, compute_uv=False)[..., :4]
    close(S, dense_s, 2e-6)  # measured 3.0e-7
    close(F.singular_values(), dense_s, 2e-6)
    close(F.norm(), np.linalg.norm(DENSE, axis=(-2, -1)), 2e-6)  # measured 7.1e-8
    square = FactoredMatrix(A, RNG.normal(size=(2, 3, 4, 10)).astype(np.float32))
    eig = square.eigenvalues()  # [2, 3, 4] complex
    dense_eig = np.linalg.eigvals(np.asarray(square.dense(), np.float64))
    for ours, theirs in zip(eig.reshape(-1, 4), dense_eig.reshape(-1, 10)):
        largest = theirs[np.argsort(-np.abs(theirs))[:4]]  # the other 6 are zeros of the rank-4 product
        assert np.abs(theirs[np.argsort(-np.abs(theirs))[4:]]).max() < 1e-5 * np.abs(theirs).max()  # measured 7.6e-7
        np.testing.assert_allclose(np.sort_complex(ours), np.sort_complex(largest),
                                   atol=1e-5 * np.abs(largest).max())  # measured 7.0e-7
    with pytest.raises(ValueError, match="needs a square product"):
        F.core()


def test_wide_inner_size_and_jit():
    wide = FactoredMatrix(RNG.normal(size=(3, 5)).astype(np.float32), RNG.normal(size=(5, 4)).astype(np.float32))
    dense = np.asarray(wide.A, np.float64) @ np.asarray(wide.B, np.float64)
    U, S, Vh = wide.svd()
    assert S.shape == (3,)
    close(U @ (S[:, None] * Vh), dense, 5e-6)  # measured 4.1e-7
    close(jax.jit(lambda f: f.norm())(wide), np.linalg.norm(dense), 2e-6)  # a pytree: jit takes it; 2.9e-8
