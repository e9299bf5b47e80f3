"""The real Fourier basis of functions on the integers mod p, and how much of a function (a
weight matrix over tokens, an activation over pairs of inputs) each frequency carries.

For odd ``p`` the basis has ``p`` orthonormal rows: row 0 is the constant ``1 / sqrt(p)``, rows
``2k - 1`` and ``2k`` are ``cos(2 pi k x / p)`` and ``sin(2 pi k x / p)`` scaled to unit norm, for the
frequencies ``k = 1 .. (p - 1) / 2``. ``basis(p) @ values`` gives a function's coefficients; the
transpose maps them back.

    W = model.W_E[:p]                          # [p, d_model], one row per residue
    norms = fourier.frequency_norms(W)         # [n_frequencies]: how much of W frequency k carries
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def n_frequencies(p: int) -> int:
    """The number of non-constant frequencies, ``(p - 1) // 2``."""
    _check(p)
    return (p - 1) // 2


def _check(p) -> None:
    if not isinstance(p, (int, np.integer)) or p < 3 or p % 2 == 0:
        raise ValueError(f"the Fourier basis here needs an odd p >= 3 (each frequency has a cos and a sin), got {p!r}")


def basis(p: int, dtype=jnp.float32) -> Float[Array, "p p"]:
    """The orthonormal Fourier basis ``[component, x]``: constant, then cos and sin of each frequency."""
    _check(p)
    x = np.arange(p)
    rows = [np.full(p, 1.0)]
    for k in range(1, n_frequencies(p) + 1):
        rows += [np.cos(2 * np.pi * k * x / p), np.sin(2 * np.pi * k * x / p)]
    rows = np.stack(rows)
    return jnp.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True), dtype)  # normalised in float64


def labels(p: int) -> list[str]:
    """Names of the basis rows: ``const``, ``cos 1``, ``sin 1``, ``cos 2``, ..."""
    return ["const"] + [f"{kind} {k}" for k in range(1, n_frequencies(p) + 1) for kind in ("cos", "sin")]


def component_norms(values: Float[Array, "p ..."]) -> Float[Array, " p"]:
    """The norm of each basis component of ``values`` (its first axis indexed by x mod p), taken
    over all remaining axes: ``[const, cos 1, sin 1, ...]``."""
    coefficients = jnp.einsum("kx,x...->k...", basis(values.shape[0], values.dtype), values)
    return jnp.sqrt((coefficients**2).reshape(values.shape[0], -1).sum(1))


def frequency_norms(values: Float[Array, "p ..."]) -> Float[Array, "n_frequencies"]:
    """The norm of frequency ``k = 1 .. (p - 1) / 2`` of ``values``, cos and sin together (the
    constant component is left out); ``k``'s entry is at index ``k - 1``."""
    squares = component_norms(values)[1:] ** 2
    return jnp.sqrt(squares[0::2] + squares[1::2])


def transform_2d(values: Float[Array, "p p ..."]) -> Float[Array, "p p ..."]:
    """The 2D Fourier coefficients ``[component_a, component_b, ...]`` of functions of two residues
    ``(a, b)`` (trailing axes: one function each, e.g. one per neuron)."""
    F = basis(values.shape[0], values.dtype)
    return jnp.einsum("ia,jb,ab...->ij...", F, F, values)


def frequency_fractions_2d(values: Float[Array, "p p ..."]) -> Float[Array, "n_frequencies ..."]:
    """The fraction of each function's variance over ``(a, b)`` that frequency ``k`` explains: the
    squared coefficients whose components, in a and in b, are each the constant or one of
    frequency k's cos and sin (all but constant x constant), over all but the constant's. A
    function of the form ``f(cos ka, sin ka, cos kb, sin kb)`` of degree one in each has fraction 1."""
    power = transform_2d(values) ** 2
    variance = power.sum((0, 1)) - power[0, 0]
    fractions = []
    for k in range(1, n_frequencies(values.shape[0]) + 1):
        rows = jnp.array([0, 2 * k - 1, 2 * k])
        fractions.append(power[rows][:, rows].sum((0, 1)) - power[0, 0])
    return jnp.stack(fractions) / variance
