"""The sparse autoencoder: one ``SAE`` module for the four architectures of the literature.

    latents = sae.encode(x)        # [..., d_sae]
    x_hat = sae.decode(latents)    # [..., d_out]; sae(x) does both

A *transcoder* (Dunefsky et al. 2024) is the same module whose decoder predicts another site than
the one it reads (an MLP's output from its input): ``target_site`` names it and ``d_out`` (the
decoder's width) may differ from ``d_in``. Its ``b_dec`` lives in the output space, so it is
never subtracted from the input (``apply_b_dec_to_input=False``, as SAELens requires too).

Every architecture shares the affine encoder and decoder (the SAELens convention, so weights
load either way)::

    pre = (x - b_dec) @ W_enc + b_enc       # b_dec subtracted only if apply_b_dec_to_input
    x_hat = latents @ W_dec + b_dec

and differs in the activation that turns ``pre`` into sparse ``latents``:

- ``relu``: ``relu(pre)``, trained with an L1 penalty (Bricken et al. 2023; the penalty is weighted
  by decoder row norms as in Anthropic's April 2024 update). SAELens calls it "standard".
- ``topk``: the k largest pre-activations of each token, ReLU'd (Gao et al. 2024).
- ``batchtopk``: in training the k * batch largest over the whole batch (Bussmann et al. 2024); at
  inference a JumpReLU with one global threshold estimated during training (``threshold``
  holds it for every latent, which is how SAELens saves it).
- ``jumprelu``: ``relu(pre) * (pre > threshold)`` with a learned threshold per latent
  (Rajamanoharan et al. 2024), trained through straight-through estimators (``jumprelu``,
  ``step``: ``jax.custom_vjp`` with a rectangle kernel of width ``bandwidth``).
"""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jinterp._compile import jit
from jinterp.models.config import choose

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
THRESHOLDED = ("batchtopk", "jumprelu")  # the architectures with a threshold per latent


class SAE(eqx.Module):
    """A sparse autoencoder ``d_in -> d_sae -> d_out`` (``d_out = d_in`` unless it is a transcoder);
    ``SAE.init`` builds one as the literature.

    Fields: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
    ``threshold [d_sae]`` (batchtopk and jumprelu; None otherwise), and static ``architecture``,
    ``k`` (topk and batchtopk: latents per token), ``apply_b_dec_to_input`` (subtract ``b_dec``
    before encoding: SAELens' default; Gemma Scope does not), ``site`` (the jinterp site it
    reads, e.g. ``"blocks.3.resid_post"``, or None) and ``target_site`` (a transcoder's: the site
    it predicts, e.g. ``"blocks.3.mlp_out"``; None for an autoencoder, which predicts ``site``).
    """

    W_enc: Float[Array, "d_in d_sae"]
    b_enc: Float[Array, " d_sae"]
    W_dec: Float[Array, "d_sae d_out"]
    b_dec: Float[Array, " d_out"]
    threshold: Float[Array, " d_sae"] | None
    architecture: str = eqx.field(static=True)
    k: int | None = eqx.field(static=True, default=None)
    apply_b_dec_to_input: bool = eqx.field(static=True, default=True)
    site: str | None = eqx.field(static=True, default=None)
    target_site: str | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        choose(self.architecture, ARCHITECTURES, "SAE architecture")
        d_in, d_sae = self.W_enc.shape
        d_out = self.W_dec.shape[-1]
        shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
        if self.architecture in THRESHOLDED:
            shapes["threshold"] = (d_sae,)
        elif self.threshold is not None:
            raise ValueError(f"A {self.architecture} SAE has no threshold; got one of shape {self.threshold.shape}")
        for name, shape in shapes.items():
            value = getattr(self, name)
            if value is None or value.shape != shape:
                got = None if value is None else value.shape
                raise ValueError(f"SAE.{name} must have shape {shape} (d_in={d_in}, d_sae={d_sae}, d_out={d_out}), "
                                 f"got {got}")
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise ValueError(f"A transcoder (d_in={d_in}, d_out={d_out}, target_site={self.target_site!r}) "
                             f"cannot subtract its output-space b_dec from its input: use apply_b_dec_to_input=False")
        if self.architecture in ("topk", "batchtopk"):
            if not isinstance(self.k, int) or not 0 < self.k <= d_sae:
                raise ValueError(f"A {self.architecture} SAE needs an int k in [1, d_sae={d_sae}], got {self.k!r}")
        elif self.k is not None:
            raise ValueError(f"k applies to topk and batchtopk SAEs only, not {self.architecture!r}")

    @classmethod
    def init(cls, d_in: int, d_sae: int, architecture: str = "topk", *, key, k: int | None = None,
             b_dec=None, threshold: float = 0.0, apply_b_dec_to_input: bool | None = None, site: str | None = None,
             d_out: int | None = None, target_site: str | None = None, dtype=jnp.float32) -> SAE:
        """A fresh SAE: decoder rows random unit vectors, ``W_enc = W_dec.T`` (tied init, Gao et al.
        2024; Conerly et al. 2024), ``b_enc = 0``, ``b_dec`` as given (a ``[d_out]`` vector such as
        the geometric median of a data sample, Bricken et al. 2023; default zeros), ``threshold``
        filled with ``threshold`` for batchtopk/jumprelu.

        A transcoder (``d_out`` or ``target_site`` given) has input and output in different spaces,
        so nothing ties them: its encoder columns are random unit vectors of their own, and
        ``apply_b_dec_to_input`` defaults to False (True for an autoencoder)."""
        choose(architecture, ARCHITECTURES, "SAE architecture")
        transcoder = d_out is not None or target_site is not None
        d_out = d_in if d_out is None else d_out
        keys = jax.random.split(key)
        W_dec = _unit_rows(jax.random.normal(key, (d_sae, d_out), jnp.float32))
        W_enc = _unit_rows(jax.random.normal(keys[1], (d_sae, d_in), jnp.float32)).T if transcoder else W_dec.T
        b_dec = jnp.zeros(d_out) if b_dec is None else jnp.asarray(b_dec)
        thresholds = jnp.full(d_sae, threshold) if architecture in THRESHOLDED else None
        arrays = [None if a is None else a.astype(dtype) for a in (W_enc, jnp.zeros(d_sae), W_dec, b_dec, thresholds)]
        if apply_b_dec_to_input is None:
            apply_b_dec_to_input = not transcoder
        return cls(*arrays, architecture=architecture, k=k, apply_b_dec_to_input=apply_b_dec_to_input, site=site,
                   target_site=target_site)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def is_transcoder(self) -> bool:
        """Whether it predicts another site than the one it reads."""
        return self.target_site is not None or self.d_out != self.d_in

    def pre_activations(self, x: Float[Array, "... d_in"]) -> Float[Array, "... d_sae"]:
        """The encoder's affine map, before the sparsifying activation."""
        if x.shape[-1:] != (self.d_in,):
            raise ValueError(f"SAE input has shape {x.shape}; its last axis must be d_in={self.d_in}")
        x = x.astype(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Array, "... d_sae"]) -> Float[Array, "... d_sae"]:
        """The inference activation (batchtopk: the JumpReLU of its global threshold)."""
        if self.architecture == "relu":
            return jax.nn.relu(pre)
        if self.architecture == "topk":
            return topk(pre, self.k)
        return jumprelu(pre, self.threshold)

    def encode(self, x: Float[Array, "... d_in"]) -> Float[Array, "... d_sae"]:
        """Sparse latents of activations ``x`` (any leading axes)."""
        return self.activate(self.pre_activations(x))

    def decode(self, latents: Float[Array, "... d_sae"]) -> Float[Array, "... d_out"]:
        """The reconstruction ``latents @ W_dec + b_dec``."""
        return latents @ self.W_dec + self.b_dec

    def __call__(self, x: Float[Array, "... d_in"]) -> Float[Array, "... d_out"]:
        """The reconstruction of ``x`` (a transcoder: its prediction of the target site)."""
        return self.decode(self.encode(x))

    def with_input_scale(self, scale, output_scale=None) -> SAE:
        """The SAE that, given ``x``, does what this one does given ``scale * x`` (then divides the
        reconstruction by ``output_scale``, default ``scale``): folds an input (and a transcoder's
        target) normalisation into the weights."""
        if output_scale is None:
            output_scale = scale
        elif self.apply_b_dec_to_input:
            raise ValueError("An SAE that subtracts b_dec from its input has one scale for input and output; "
                             "pass scale only")
        return eqx.tree_at(lambda s: (s.W_enc, s.W_dec, s.b_dec), self,
                           (self.W_enc * scale, self.W_dec / output_scale, self.b_dec / output_scale))

    def without_input_b_dec(self) -> SAE:
        """The same function with ``apply_b_dec_to_input=False`` (Gemma Scope's convention): the
        subtraction of ``b_dec`` is folded into ``b_enc``."""
        if not self.apply_b_dec_to_input:
            return self
        return dataclasses.replace(self, b_enc=self.b_enc - self.b_dec @ self.W_enc, apply_b_dec_to_input=False)


def _unit_rows(W: Array) -> Array:
    return W / jnp.linalg.norm(W, axis=-1, keepdims=True)


def top_k(x: Float[Array, "... d"], k: int, block: int = 8) -> tuple[Array, Array]:
    """``jax.lax.top_k`` over the last axis, in two smaller top-k's when that is cheaper: the k
    largest entries lie in the k blocks (of ``block`` neighbours) with the largest maxima, so a
    top-k over the block maxima and one over those blocks' entries find them. XLA's CPU top-k sorts
    each row's indices, so at SAE sizes this saves a tenth of a TopK training step (1,024 x 4,608,
    k = 32: 181 -> 166 ms), mostly in the gradient. Exact: the same values; under ties the indices
    may be others of equal value."""
    *lead, d = x.shape
    if d % block or d // block < 2 * k:
        return jax.lax.top_k(x, k)
    blocks = jax.lax.stop_gradient(x).reshape(-1, d // block, block)
    _, best = jax.lax.top_k(blocks.max(axis=-1), k)  # [rows, k] block numbers
    candidates = jnp.take_along_axis(blocks, best[..., None], axis=1).reshape(-1, k * block)
    _, slots = jax.lax.top_k(candidates, k)
    indices = (jnp.take_along_axis(best, slots // block, axis=-1) * block + slots % block).reshape(*lead, k)
    return jnp.take_along_axis(x, indices, axis=-1), indices


def topk(pre: Float[Array, "... d_sae"], k: int) -> Float[Array, "... d_sae"]:
    """Keep the ``k`` largest entries of each row, ReLU'd; zeros elsewhere."""
    values, indices = top_k(pre, k)
    return jnp.put_along_axis(jnp.zeros_like(pre), indices, jax.nn.relu(values), axis=-1, inplace=False)


# A TopK SAE's training step touches k latents per token, so its decoder, and the backward of
# both encoder and decoder, gather or scatter k weight rows per token instead of running dense
# [n, d_sae] matmuls. The loops go over the k slots, one row per token at a time, so what they
# touch stays in cache: gathering all k rows at once materialises [n, k, d] (~6x slower on CPU),
# and XLA's CPU scatter of them all at once is as slow as the dense matmul.

def _gather_rows(weights: Float[Array, "n k"], indices, rows: Float[Array, "m d"]) -> Float[Array, "n d"]:
    """``sum_j weights[:, j] * rows[indices[:, j]]``."""
    out = jnp.zeros((weights.shape[0], rows.shape[1]), jnp.result_type(weights, rows))
    return jax.lax.fori_loop(0, weights.shape[1], lambda j, out: out + weights[:, j, None] * rows[indices[:, j]], out)


def _scatter_rows(weights: Float[Array, "n k"], indices, vectors: Float[Array, "n d"], m: int) -> Float[Array, "m d"]:
    """``out[indices[t, j]] += weights[t, j] * vectors[t]`` into ``m`` zero rows."""
    out = jnp.zeros((m, vectors.shape[1]), jnp.result_type(weights, vectors))
    return jax.lax.fori_loop(0, weights.shape[1],
                             lambda j, out: out.at[indices[:, j]].add(weights[:, j, None] * vectors), out)


def _row_dots(vectors: Float[Array, "n d"], indices, rows: Float[Array, "m d"]) -> Float[Array, "n k"]:
    """``vectors[t] . rows[indices[t, j]]``."""
    out = jnp.zeros(indices.shape, jnp.result_type(vectors, rows))
    return jax.lax.fori_loop(0, indices.shape[1],
                             lambda j, out: out.at[:, j].set(jnp.sum(vectors * rows[indices[:, j]], axis=-1)), out)


def _flat(a: Array) -> Array:
    return a.reshape(-1, a.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def topk_encode(x: Float[Array, "... d_in"], W_enc: Float[Array, "d_in d_sae"], b_enc: Float[Array, " d_sae"],
                k: int) -> tuple[Float[Array, "... k"], Array]:
    """The ``k`` largest pre-activations ``x @ W_enc + b_enc`` of each token (not ReLU'd) and their
    latents' indices. Backward: only those k latents have a gradient, so ``W_enc``'s is k column
    updates per token (a scatter-add), not a dense ``[d_in, n] @ [n, d_sae]`` matmul."""
    return top_k(x @ W_enc + b_enc, k)


def _topk_encode_forward(x, W_enc, b_enc, k):
    values, indices = topk_encode(x, W_enc, b_enc, k)
    return (values, indices), (x, W_enc, indices)


def _topk_encode_backward(k, saved, cotangents):
    x, W_enc, indices = saved
    d_values, flat_indices = _flat(cotangents[0]), _flat(indices)
    d_x = _gather_rows(d_values, flat_indices, W_enc.T).reshape(x.shape)  # dropped by XLA when x is data
    d_W_enc = _scatter_rows(d_values, flat_indices, _flat(x), W_enc.shape[1]).T
    d_b_enc = jnp.zeros(W_enc.shape[1], d_values.dtype).at[flat_indices.reshape(-1)].add(d_values.reshape(-1))
    return d_x, d_W_enc, d_b_enc


topk_encode.defvjp(_topk_encode_forward, _topk_encode_backward)


@jax.custom_vjp
def topk_decode(values: Float[Array, "... k"], indices,
                W_dec: Float[Array, "d_sae d_out"]) -> Float[Array, "... d_out"]:
    """``sum_j values[..., j] * W_dec[indices[..., j]]``: a TopK decoder that reads only the k active
    rows of each token (the bias not added), instead of a dense ``[n, d_sae] @ W_dec``; its
    backward likewise touches only those rows."""
    return _gather_rows(_flat(values), _flat(indices), W_dec).reshape(*values.shape[:-1], W_dec.shape[1])


def _topk_decode_forward(values, indices, W_dec):
    return topk_decode(values, indices, W_dec), (values, indices, W_dec)


def _topk_decode_backward(saved, cotangent):
    values, indices, W_dec = saved
    flat_values, flat_indices, flat_cotangent = _flat(values), _flat(indices), _flat(cotangent)
    d_values = _row_dots(flat_cotangent, flat_indices, W_dec).reshape(values.shape)
    return d_values, None, _scatter_rows(flat_values, flat_indices, flat_cotangent, W_dec.shape[0])


topk_decode.defvjp(_topk_decode_forward, _topk_decode_backward)


def batch_topk(pre: Float[Array, "n d_sae"], k: int) -> Float[Array, "n d_sae"]:
    """Keep the ``k * n`` largest ReLU'd entries of the whole batch (k latents per token on average)."""
    flat = jax.nn.relu(pre).reshape(-1)
    values, indices = jax.lax.top_k(flat, k * pre.shape[0])
    return jnp.zeros_like(flat).at[indices].set(values).reshape(pre.shape)


def rectangle(u: Array) -> Array:
    """The rectangle kernel: 1 on (-1/2, 1/2), 0 elsewhere."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(gradient: Array, shape: tuple) -> Array:
    """Sum a gradient over the axes that broadcasting added (a threshold ``[d_sae]`` read by ``[..., d_sae]``)."""
    gradient = gradient.sum(axis=tuple(range(gradient.ndim - len(shape))))
    return gradient.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True).reshape(shape)


def jumprelu(pre: Array, threshold: Array, bandwidth=0.001) -> Array:
    """``relu(pre) * (pre > threshold)``. Gradients (Rajamanoharan et al. 2024, eq. 11): the true one
    for ``pre``; for ``threshold`` the straight-through estimate
    ``-(threshold / bandwidth) * rectangle((pre - threshold) / bandwidth)``."""
    return _jumprelu(pre, threshold, jnp.asarray(bandwidth, pre.dtype))


def step(pre: Array, threshold: Array, bandwidth=0.001) -> Array:
    """The Heaviside step ``pre > threshold`` as 0/1 (summed over latents: the L0 norm). Gradients
    (Rajamanoharan et al. 2024, eq. 12): none for ``pre``; for ``threshold`` the straight-through
    estimate ``-(1 / bandwidth) * rectangle((pre - threshold) / bandwidth)``."""
    return _step(pre, threshold, jnp.asarray(bandwidth, pre.dtype))


# The bandwidth is an array argument (its cotangent is zero), so changing it does not recompile.
@jax.custom_vjp
def _jumprelu(pre, threshold, bandwidth):
    return jnp.where(pre > threshold, jax.nn.relu(pre), 0.0).astype(pre.dtype)


def _jumprelu_forward(pre, threshold, bandwidth):
    return _jumprelu(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _jumprelu_backward(saved, cotangent):
    pre, threshold, bandwidth = saved
    d_pre = jnp.where((pre > threshold) & (pre > 0), cotangent, 0.0)
    d_threshold = -(threshold / bandwidth) * rectangle((pre - threshold) / bandwidth) * cotangent
    return d_pre, _sum_to(d_threshold, threshold.shape), jnp.zeros_like(bandwidth)


_jumprelu.defvjp(_jumprelu_forward, _jumprelu_backward)


@jax.custom_vjp
def _step(pre, threshold, bandwidth):
    return (pre > threshold).astype(pre.dtype)


def _step_forward(pre, threshold, bandwidth):
    return _step(pre, threshold, bandwidth), (pre, threshold, bandwidth)


def _step_backward(saved, cotangent):
    pre, threshold, bandwidth = saved
    d_threshold = -(1.0 / bandwidth) * rectangle((pre - threshold) / bandwidth) * cotangent
    return jnp.zeros_like(pre), _sum_to(d_threshold, threshold.shape), jnp.zeros_like(bandwidth)


_step.defvjp(_step_forward, _step_backward)


@jit  # compiled once per shape (iterations is static), not on every call
def geometric_median(points: Float[Array, "n d"], iterations: int = 64, eps: float = 1e-8) -> Float[Array, " d"]:
    """The point minimising the summed distance to ``points`` (Weiszfeld's iterations from the mean):
    the initial decoder bias of Bricken et al. 2023, robust to outlying activations."""

    def improve(_, center):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - center, axis=-1), eps)
        return weights @ points / weights.sum()

    return jax.lax.fori_loop(0, iterations, improve, points.mean(axis=0))
