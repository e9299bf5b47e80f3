"""Circuits read off the weights (Elhage et al. 2021): QK and OV circuits, composition scores, the OV
copying score and direct paths, for every head, grouped-query attention included.

In the row-vector convention of the residual stream (``x @ W``), head ``h`` of layer ``l`` reads
key/value head ``g = h // (n_heads // n_kv_heads)`` and has

- the **QK circuit** ``W_QK = W_Q[l, h] W_K[l, g]^T`` (``d_model x d_model``, rank ``<= d_head``): the
  attention score of a query residual ``x`` and a key residual ``y`` is ``attn_scale * x W_QK y^T``;
- the **OV circuit** ``W_OV = W_V[l, g] W_O[l, h]``: attending to ``y`` writes ``y W_OV``.

Both are ``FactoredMatrix`` objects (``jinterp.factored``) of shape ``[n_layers, n_heads, d_model,
d_model]``: never materialised unless asked. By default the weights are first processed
(``jinterp.process_weights``: norm weights folded into the matrices that read them, writing weights
and the unembedding centred where a LayerNorm makes that exact, value biases folded), so that the
matrices act on the residual stream as the heads see it (normalised); ``process=False`` reads the
weights as stored.

What the formulas leave out, said plainly: biases (``b_Q``, ``b_K`` add terms linear in ``x`` or
``y``; initialised models have none), the norms' per-token scale (a pre-norm head reads ``x / rms(x)``),
attention softcapping, and, with per-head q/k norms (Gemma 3, Qwen 3), the RMS normalisation of each
query and key vector: there ``W_QK`` has the q/k norm weights folded in and gives scores only up
to a positive per-(query, key) factor ``1 / (rms(q) rms(k))``.

**Rotary models.** A rotary model rotates queries and keys by their positions, so the score of a
query at ``i`` and a key at ``j`` is ``x W_Q R(i - j) W_K^T y^T``: the bilinear form depends on the
offset ``i - j``. ``W_Q W_K^T`` (``offset=None``, the default) is the form at offset 0 — a token
attending to itself — and in the dimensions past ``rotary_dim`` (partial rotary) the part that is
the same at every offset; it is *not* what the head computes between different positions.
``qk_circuit(model, offset=d)`` gives the exact form at offset ``d`` (``W_Q R(d) W_K^T``, with the
layer's own rotary base: Gemma's local layers have theirs), and ``composition_scores(...,
offset=d)`` the Q/K-composition at that offset. Models with learned or no positional embeddings
have one QK circuit for every offset (the positional embeddings are part of the residual).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jinterp.factored import FactoredMatrix
from jinterp.models.layers import rope_frequencies, rope_tables, rotate
from jinterp.models.processing import process_weights
from jinterp.models.transformer import Transformer


def _weights(model: Transformer, process: bool) -> Transformer:
    if not isinstance(model, Transformer):
        raise TypeError(f"QK/OV circuits read a jinterp.Transformer's weights, got {type(model).__name__}")
    return process_weights(model) if process else model


def _kv_of(cfg) -> np.ndarray:
    """The key/value head each query head reads: ``h // group_size``."""
    return np.arange(cfg.n_heads) // cfg.group_size


def rotation(model: Transformer, offset: int, layer: int | None = None) -> Float[Array, "layers d_head d_head"]:
    """The rotary rotation ``R(offset)`` ``[d_head, d_head]`` per layer (or of one layer) such that a query
    ``q`` at position ``i`` and a key ``k`` at ``j = i - offset`` score ``q R(offset) k^T`` (row vectors);
    the identity past ``rotary_dim``."""
    cfg = model.cfg
    if cfg.positional != "rotary":
        raise ValueError(f"offset= applies to rotary models; this one has positional={cfg.positional!r}, so its QK "
                         f"circuit is the same at every offset")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise TypeError(f"offset must be an int (query position minus key position), got {offset!r}")
    eye = jnp.eye(cfg.d_head, dtype=model.blocks.attn.W_Q.dtype)[None, None]  # [1, 1, heads=d_head, d_head]

    def rotated(theta, scaling, position):
        cos, sin = rope_tables(rope_frequencies(cfg, theta, scaling), jnp.asarray([[position]]))
        return rotate(eye, cos, sin)[0, 0]  # row r: e_r rotated, i.e. the matrix of x -> rotate(x)

    local = cfg.rope_theta if cfg.rope_theta_local is None else cfg.rope_theta_local
    per_layer = []
    for kind in cfg.layer_types:
        theta, scaling = (cfg.rope_theta, cfg.rope_scaling) if kind == "global" else (local, None)
        # R(i) R(j)^T = R(i - j): rotations about the same planes commute.
        per_layer.append(rotated(theta, scaling, int(offset)) @ rotated(theta, scaling, 0).T)
    stacked = jnp.stack(per_layer)
    return stacked if layer is None else stacked[layer]


def qk_circuit(model: Transformer, *, offset: int | None = None, process: bool = True) -> FactoredMatrix:
    """Every head's QK circuit ``W_Q[l, h] W_K[l, h // group]^T``: ``[n_layers, n_heads, d_model, d_model]``
    (index it: ``qk_circuit(model)[layer, head]``). ``offset``: rotary models' form at that query - key
    offset (see the module docstring); ``process``: fold norms and centre first (``process_weights``)."""
    model = _weights(model, process)
    attn = model.blocks.attn
    W_Q, W_K = attn.W_Q, attn.W_K[:, _kv_of(model.cfg)]  # [L, H, D, E]
    if attn.q_norm is not None:  # per-head RMS norms: their weights scale the head's coordinates
        W_Q = W_Q * attn.q_norm.w[:, None, None, :]
        W_K = W_K * attn.k_norm.w[:, None, None, :]
    if offset is not None:
        W_Q = W_Q @ rotation(model, offset)[:, None]
    return FactoredMatrix(W_Q, jnp.swapaxes(W_K, -1, -2))


def ov_circuit(model: Transformer, *, process: bool = True) -> FactoredMatrix:
    """Every head's OV circuit ``W_V[l, h // group] W_O[l, h]``: ``[n_layers, n_heads, d_model, d_model]``."""
    model = _weights(model, process)
    attn = model.blocks.attn
    return FactoredMatrix(attn.W_V[:, _kv_of(model.cfg)], attn.W_O)


Kind = Literal["q", "k", "v"]


def composition_scores(model: Transformer, kind: Kind, *, offset: int | None = None,
                       process: bool = True) -> Float[Array, "layer head layer2 head2"]:
    """Composition scores (Elhage et al. 2021) of every pair of heads: ``[sender layer, sender head,
    receiver layer, receiver head]``, NaN where the sender's layer is not before the receiver's.

    How much of what the sender writes (its OV circuit) the receiver reads through its queries
    (``"q"``), keys (``"k"``) or values (``"v"``): ``|M|_F / (|W_OV^s|_F |W^r|_F)`` with
    ``M = W_OV^s W_QK^r`` (Q), ``W_OV^s (W_QK^r)^T`` (K), ``W_OV^s W_OV^r`` (V), row-vector convention (as
    TransformerLens). Computed from the factors (the ``d_head x d_head`` cores), layer by layer.
    """
    if kind not in ("q", "k", "v"):
        raise ValueError(f"Unknown composition kind {kind!r}; valid choices: 'q', 'k', 'v'")
    ov = ov_circuit(model, process=process)
    receiver = ov if kind == "v" else qk_circuit(model, offset=offset, process=process)
    receiver = receiver.T if kind == "k" else receiver
    return _scores(ov, receiver, model.cfg.n_layers, model.cfg.n_heads)


@jax.jit
def _pair_norms(B1, Ra1, A2, Rb2):
    """``|A1 B1 A2 B2|_F`` for every sender (A1 = Q_a1 Ra1) and receiver (B2^T = Q_b2 Rb2): ``[senders, receivers]``."""
    inner = jnp.einsum("sed,rdf->sref", B1, A2)  # B1 A2: [senders, receivers, r, r]
    core = jnp.einsum("sae,sref,rbf->srab", Ra1, inner, Rb2)  # Ra1 (B1 A2) Rb2^T
    return jnp.sqrt(jnp.sum(core * core, axis=(-2, -1)))


def _scores(sender: FactoredMatrix, receiver: FactoredMatrix, n_layers: int, n_heads: int) -> Array:
    flat = lambda m: m.reshape(n_layers * n_heads, *m.shape[2:])  # noqa: E731
    A1, B1 = flat(sender.A), flat(sender.B)
    A2, B2 = flat(receiver.A), flat(receiver.B)
    Ra1 = jnp.linalg.qr(A1)[1]
    Rb2 = jnp.linalg.qr(jnp.swapaxes(B2, -1, -2))[1]
    sender_norm, receiver_norm = sender.norm().reshape(-1), receiver.norm().reshape(-1)
    out = np.full((n_layers, n_heads, n_layers, n_heads), np.nan, np.float32)
    for layer in range(1, n_layers):  # receivers of one layer at a time: memory [senders, heads, r, r]
        senders = slice(0, layer * n_heads)
        receivers = slice(layer * n_heads, (layer + 1) * n_heads)
        norms = _pair_norms(B1[senders], Ra1[senders], A2[receivers], Rb2[receivers])
        scores = norms / (sender_norm[senders, None] * receiver_norm[None, receivers])
        out[:layer, :, layer, :] = np.asarray(scores).reshape(layer, n_heads, n_heads)
    return jnp.asarray(out)


def copying_score(model: Transformer, *, process: bool = True) -> Float[Array, "layer head"]:
    """The OV copying score of every head (Elhage et al. 2021): ``Re(sum λ) / sum |λ|`` over the eigenvalues
    of ``W_E W_OV W_U`` (token -> logits through the head alone), from the ``d_head x d_head`` core
    ``W_O W_U W_E W_V``: 1 when every eigenvalue is positive (the head raises the logit of the token
    it attends to), -1 when every one is negative (it suppresses it)."""
    model = _weights(model, process)
    ov = ov_circuit(model, process=False)
    # The non-zero eigenvalues of W_E (W_V W_O) W_U are those of its cyclic shift W_V W_O (W_U W_E): the
    # vocab x vocab product is never formed.
    eig = FactoredMatrix(ov.A, ov.B @ (model.W_unembed @ model.W_E)).eigenvalues()
    return jnp.asarray((eig.sum(-1).real / np.abs(eig).sum(-1)).astype(np.float32))


def direct_path(model: Transformer, tokens: Int[Array, " n"], *, layer: int | None = None,
                head: int | None = None, k: int = 10, process: bool = True) -> tuple[Array, Array]:
    """The top ``k`` output tokens of a direct path for each input token: ``(logits [n, k], token ids [n, k])``.

    Without ``layer``/``head``: the zero-layer path ``W_E[t] W_U`` (bigram statistics); with both: the path
    through one head's OV circuit, ``W_E[t] W_OV W_U`` (what the head writes when it attends to ``t``).
    Rows of the ``vocab x vocab`` matrix are computed for the given tokens only.
    """
    if (layer is None) != (head is None):
        raise ValueError("direct_path takes both layer= and head= (a head's path) or neither (the direct path)")
    model = _weights(model, process)
    tokens = jnp.atleast_1d(jnp.asarray(tokens))
    rows = model.W_E[tokens]
    if layer is not None:
        cfg = model.cfg
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"Head L{layer}H{head} is out of range: {cfg.n_layers} layers of {cfg.n_heads} heads")
        ov = ov_circuit(model, process=False)[layer, head]
        rows = (rows @ ov.A) @ ov.B
    return jax.lax.top_k(rows @ model.W_unembed, k)


__all__ = ["FactoredMatrix", "composition_scores", "copying_score", "direct_path", "ov_circuit", "qk_circuit",
           "rotation"]
