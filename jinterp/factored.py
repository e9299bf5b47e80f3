"""A low-rank matrix kept as its two factors: ``FactoredMatrix(A, B)`` stands for ``A @ B``.

Circuits read off the weights are such products: a head's QK circuit ``W_Q W_K^T`` and OV circuit
``W_V W_O`` are ``d_model x d_model`` matrices of rank at most ``d_head``. Every operation here
works on the factors and the small ``r x r`` core, never on the ``m x n`` product unless asked
(``dense``):

- products with arrays or other factored matrices stay factored (the smaller inner size kept);
- ``svd``: the thin SVD from QR of ``A`` and ``B^T`` and the SVD of the ``r x r`` core
  ``R_A R_B^T`` (``A B = Q_A R_A R_B^T Q_B^T``);
- ``norm``: the Frobenius norm, ``|A B|_F = |R_A R_B^T|_F`` (``Q_A``, ``Q_B`` have orthonormal columns);
- ``eigenvalues``: the non-zero eigenvalues of a square ``A B`` are those of ``B A`` (``r x r``).

Leading axes are batch axes (``[layers, heads, m, r]``): every operation broadcasts over them, and
indexing (``f[1, 2]``) indexes them.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


class FactoredMatrix(eqx.Module):
    """``A @ B`` with ``A [..., m, r]`` and ``B [..., r, n]`` (batch axes broadcast)."""

    A: Float[Array, "... m r"]
    B: Float[Array, "... r n"]
    __array_ufunc__ = None  # so that numpy_array @ factored defers to __rmatmul__

    def __init__(self, A, B):
        A, B = jnp.asarray(A), jnp.asarray(B)
        if A.ndim < 2 or B.ndim < 2 or A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix(A, B) needs A [..., m, r] and B [..., r, n]; got A {A.shape}, "
                             f"B {B.shape}")
        try:
            np.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except ValueError:
            raise ValueError(f"FactoredMatrix: batch axes of A {A.shape[:-2]} and B {B.shape[:-2]} do not "
                             f"broadcast") from None
        self.A, self.B = A, B

    @property
    def shape(self) -> tuple[int, ...]:
        return (*np.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2]), self.A.shape[-2], self.B.shape[-1])

    @property
    def rank(self) -> int:
        """The inner size: an upper bound on the rank."""
        return self.A.shape[-1]

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(jnp.swapaxes(self.B, -1, -2), jnp.swapaxes(self.A, -1, -2))

    def dense(self) -> Float[Array, "... m n"]:
        """The product itself (``m x n``: materialised only here)."""
        return self.A @ self.B

    def core(self) -> Float[Array, "... r r"]:
        """``B @ A``: for a square product, the ``r x r`` matrix with the same non-zero eigenvalues."""
        if self.A.shape[-2] != self.B.shape[-1]:
            raise ValueError(f"The core B A needs a square product; this one is {self.shape[-2:]}")
        return self.B @ self.A

    def __getitem__(self, index) -> FactoredMatrix:
        """Index the batch axes (``f[layer, head]``); the matrix axes stay whole."""
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            raise IndexError("FactoredMatrix indexes its batch axes only; no Ellipsis")
        batch = self.shape[:-2]
        if len(index) > len(batch):
            raise IndexError(f"{len(index)} indices for {len(batch)} batch axes (shape {self.shape})")
        A, B = (jnp.broadcast_to(m, (*batch, *m.shape[-2:]))[index] for m in (self.A, self.B))
        return FactoredMatrix(A, B)

    def __matmul__(self, other) -> FactoredMatrix:
        if isinstance(other, FactoredMatrix):
            if self.shape[-1] != other.shape[-2]:
                raise ValueError(f"Shapes {self.shape} and {other.shape} do not multiply")
            inner = self.B @ other.A  # [r1, r2]
            if self.rank <= other.rank:
                return FactoredMatrix(self.A, inner @ other.B)
            return FactoredMatrix(self.A @ inner, other.B)
        other = jnp.asarray(other)
        if other.ndim == 1:
            return (self.A @ (self.B @ other)[..., None])[..., 0]
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other):
        other = jnp.asarray(other)
        if other.ndim == 1:
            return ((other @ self.A)[..., None, :] @ self.B)[..., 0, :]
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar) -> FactoredMatrix:
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def _qr_core(self) -> tuple[Array, Array, Array]:
        """``(Q_A, core, Q_B)`` with ``A B = Q_A core Q_B^T`` and orthonormal columns in ``Q_A``, ``Q_B``."""
        batch = self.shape[:-2]
        A, B = (jnp.broadcast_to(m, (*batch, *m.shape[-2:])) for m in (self.A, self.B))
        qa, ra = jnp.linalg.qr(A)
        qb, rb = jnp.linalg.qr(jnp.swapaxes(B, -1, -2))
        return qa, ra @ jnp.swapaxes(rb, -1, -2), qb

    def svd(self) -> tuple[Float[Array, "... m k"], Float[Array, "... k"], Float[Array, "... k n"]]:
        """The thin SVD ``(U, S, Vh)``, ``A B = U diag(S) Vh``, ``k = min(m, n, r)``, singular values descending."""
        qa, core, qb = self._qr_core()
        u, s, vh = jnp.linalg.svd(core, full_matrices=False)
        return qa @ u, s, vh @ jnp.swapaxes(qb, -1, -2)

    def singular_values(self) -> Float[Array, "... k"]:
        return jnp.linalg.svd(self._qr_core()[1], compute_uv=False)

    def norm(self) -> Float[Array, "..."]:
        """The Frobenius norm, from the ``r x r`` core."""
        core = self._qr_core()[1]
        return jnp.sqrt(jnp.sum(core * core, axis=(-2, -1)))

    def eigenvalues(self) -> np.ndarray:
        """The eigenvalues of the ``r x r`` core ``B A`` (complex; on the host, NumPy's ``eigvals``): the
        non-zero eigenvalues of the square product ``A B``, which has ``m - r`` more zeros."""
        return np.linalg.eigvals(np.asarray(jax.device_get(self.core()), np.float64))

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={self.shape}, rank<={self.rank}, dtype={self.A.dtype})"


__all__ = ["FactoredMatrix"]
