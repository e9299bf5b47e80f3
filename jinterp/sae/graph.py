"""Attribution graphs (circuit tracing, Ameisen et al. 2025; the circuit-tracer library): the direct
effects between transcoder features, token embeddings, error terms and the top logits of one
prompt, pruned to the nodes and edges that carry most of the influence on the logits.

    graph = attribution_graph(model, tokens, transcoders)   # one transcoder per layer
    kept = prune_graph(graph)                                 # node_mask, edge_mask, influence
    graph.labels()[i]                                         # "feature L1 p4 #17", ...

The *local replacement model*: every MLP replaced by its transcoder plus the error term (the true
``mlp_out`` minus the transcoder's prediction, a constant), attention patterns and every norm's
scale frozen at their values on the prompt. Between one node's write and another node's read the
model is then linear (the residual stream, attention's values and output through the frozen
patterns, the norms divided by frozen scales): that is what "direct" means, no path through
another feature's activation or an MLP. In jinterp the freezing is a set of ``Replace`` edits with
the prompt's own values, so no gradient passes through them, and each MLP's output is replaced by
its own value plus a zero ``Add`` that marks where sources write.

Nodes, in this order: active features ``(layer, position, latent)``, error nodes ``(layer,
position)``, embeddings (the residual stream entering layer 0 at each position: token and
positional embeddings), logits (the most probable next tokens at the last position, up to
``max_logits`` or until ``logit_probability`` of the mass). Edge ``adjacency[target, source]`` is
the source's activation times the gradient of the target's pre-activation (a feature's encoder
pre-activation; for a logit, the logit minus the mean logit, as circuit-tracer) with respect to
it through the replacement model: for a feature source, ``activation * W_dec[latent] . grad``
at its ``mlp_out``; an error, ``error . grad``; an embedding, ``embedding . grad``. So each
target's incoming edges sum to its value minus the bias terms no node carries (encoder and
decoder biases, model biases).

Pruning as circuit-tracer: normalise each target's incoming |edges| to sum to 1; a node's
influence is its total (all paths) effect on the logits weighted by their probabilities; keep the
nodes carrying ``node_threshold`` of the influence (logits and embeddings always), then the edges
carrying ``edge_threshold`` of it in the graph of those nodes, and drop features and errors left
without an outgoing edge (features also without an incoming one).
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jinterp import names as S
from jinterp._compile import jit
from jinterp.core import apply, run
from jinterp.interventions import Add, Capture, Replace
from jinterp.models.declaration import kinds
from jinterp.sae.autoencoder import SAE


@dataclasses.dataclass(frozen=True)
class AttributionGraph:
    """The direct-effect graph of one prompt; see the module docstring for the node order.

    Fields: ``tokens [seq]``; ``adjacency [n_nodes, n_nodes]`` (rows: targets, columns: sources);
    ``features [n_features, 3]`` (layer, position, latent) and their ``activations``;
    ``n_layers``; ``logit_tokens`` and ``logit_probabilities`` (``[n_logits]``).
    """

    tokens: np.ndarray
    adjacency: np.ndarray
    features: np.ndarray
    activations: np.ndarray
    n_layers: int
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    def error_index(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.n_pos + position

    def embedding_index(self, position: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + position

    def logit_index(self, i: int) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + i

    def labels(self, decode=None) -> list[str]:
        """A name per node; ``decode(token_id) -> str`` (e.g. a tokenizer's) shows tokens as text."""
        show = decode or (lambda t: f"#{int(t)}")
        names = [f"feature L{layer} p{position} #{latent}" for layer, position, latent in self.features]
        names += [f"error L{layer} p{position}" for layer in range(self.n_layers) for position in range(self.n_pos)]
        names += [f"embedding p{position} {show(t)!r}" for position, t in enumerate(self.tokens)]
        names += [f"logit {show(t)!r} (p={p:.3f})" for t, p in zip(self.logit_tokens, self.logit_probabilities)]
        return names


def attribution_graph(model: eqx.Module, tokens, transcoders: list[SAE], *, max_logits: int = 10,
                      logit_probability: float = 0.95, batch_size: int = 64) -> AttributionGraph:
    """The direct-effect graph of ``model`` on one prompt with ``transcoders[l]`` standing in for
    layer l's MLP.

    Args:
        model: a ``jinterp.Transformer`` with MLPs.
        tokens: int ids ``[seq]`` (or ``[1, seq]``).
        transcoders: one per layer, each reading a site of its layer before ``mlp_out`` (e.g. as
            ``jinterp.sae.transcoder.mlp_sites`` names) and predicting ``blocks.l.mlp_out``.
        max_logits, logit_probability: the logit nodes: the most probable next tokens, until
            their probabilities sum to ``logit_probability`` or there are ``max_logits``.
        batch_size: targets whose gradients are computed together (one vmapped backward pass).
    """
    cfg = model.cfg
    tokens = np.asarray(tokens)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"attribution_graph takes one prompt: tokens [seq] or [1, seq], got shape {tokens.shape}")
    reads = _check_transcoders(cfg, transcoders)
    seq = tokens.shape[1]

    # The prompt's own values: what is frozen, what nodes write, what features read.
    freeze_kinds = [k for k in kinds(cfg).block if k == "attn.pattern" or k.endswith(".scale")]
    top_scales = [k for k in kinds(cfg).top if k.endswith(".scale")]
    capture = [f"blocks.*.{k}" for k in (*freeze_kinds, "mlp_out", reads)] + top_scales + ["blocks.0.resid_pre"]
    logits, cache = run(model, tokens, capture=capture)
    frozen = {k: cache.stack(k) for k in freeze_kinds} | {k: cache[k] for k in top_scales}
    mlp_out, inputs = cache.stack("mlp_out")[:, 0], cache.stack(reads)[:, 0]  # [L, seq, d]
    embeddings = cache["blocks.0.resid_pre"][0]

    # Nodes: active features, errors, embeddings, top logits.
    activations = [np.asarray(tc.encode(x)) for tc, x in zip(transcoders, inputs)]  # [seq, d_sae] per layer
    features = np.concatenate([np.stack([np.full(len(p), layer), p, i], axis=1)
                               for layer, (p, i) in enumerate(np.nonzero(a) for a in activations)])
    feature_values = np.asarray([activations[layer][p, i] for layer, p, i in features], np.float32)
    errors = jnp.stack([out - tc(x) for tc, out, x in zip(transcoders, mlp_out, inputs)])  # [L, seq, d]
    probabilities = np.asarray(jax.nn.softmax(logits[0, -1].astype(jnp.float32)))
    order = np.argsort(-probabilities)
    n_logits = min(max_logits, int(np.searchsorted(np.cumsum(probabilities[order]), logit_probability)) + 1)
    logit_tokens = order[:n_logits]

    # Targets: each feature's encoder direction at the site it reads, each logit's (demeaned) unembedding.
    n_f, d_in = len(features), inputs.shape[-1]
    W_enc, W_dec = ([np.asarray(getattr(tc, name)) for tc in transcoders] for name in ("W_enc", "W_dec"))
    targets = [(layer, p, W_enc[layer][:, i]) for layer, p, i in features]
    gradients = _gradients(model, jnp.asarray(tokens), frozen, mlp_out, reads, targets, logit_tokens, d_in,
                           batch_size)  # (embedding [T, seq, d], mlp_out [T, L, seq, d])

    # Edges: a source's write times the gradient where it writes.
    n_nodes = n_f + (cfg.n_layers + 1) * seq + n_logits
    adjacency = np.zeros((n_nodes, n_nodes), np.float32)
    rows = np.r_[np.arange(n_f), n_nodes - n_logits + np.arange(n_logits)]
    at_embedding, at_mlp = gradients
    if n_f:
        decoder_rows = np.stack([W_dec[layer][i] for layer, _, i in features])
        at_feature = at_mlp[:, features[:, 0], features[:, 1]]  # [T, n_f, d]
        adjacency[np.ix_(rows, np.arange(n_f))] = np.einsum("tnd,nd->tn", at_feature, decoder_rows) * feature_values
    error_edges = np.einsum("tlpd,lpd->tlp", at_mlp, np.asarray(errors)).reshape(len(rows), -1)
    adjacency[np.ix_(rows, n_f + np.arange(cfg.n_layers * seq))] = error_edges
    adjacency[np.ix_(rows, n_f + cfg.n_layers * seq + np.arange(seq))] = np.einsum(
        "tpd,pd->tp", at_embedding, np.asarray(embeddings))
    return AttributionGraph(tokens[0], adjacency, features, feature_values, cfg.n_layers, logit_tokens,
                            probabilities[logit_tokens])


def _check_transcoders(cfg, transcoders) -> str:
    """The site kind the transcoders read (one per layer, each in its own block, writing mlp_out)."""
    if not cfg.has_mlp:
        raise ValueError("attribution_graph needs a model with MLPs to replace by transcoders")
    if len(transcoders) != cfg.n_layers:
        raise ValueError(f"attribution_graph needs one transcoder per layer ({cfg.n_layers}), got {len(transcoders)}")
    read_kinds = set()
    for layer, tc in enumerate(transcoders):
        if not isinstance(tc, SAE):
            raise TypeError(f"transcoders[{layer}] must be a jinterp.sae.SAE, got {type(tc).__name__}")
        read = S.parse(tc.site) if tc.site is not None else None
        write = S.parse(tc.target_site) if tc.target_site is not None else None
        if read is None or write != S.Site("mlp_out", layer) or read.layer != layer:
            raise ValueError(f"transcoders[{layer}] must read a site of block {layer} and predict "
                             f"'blocks.{layer}.mlp_out'; it reads {tc.site!r} and predicts {tc.target_site!r}")
        block = kinds(cfg).block
        before = read.kind in block and block.index(read.kind) < block.index("mlp_out")
        if not before or S.SITE_AXES[read.kind] != S.RESID:
            raise ValueError(f"transcoders[{layer}] reads {tc.site!r}; it must read a residual-stream-shaped site "
                             f"before mlp_out in a block of this model (e.g. ln2.normalized or mlp_in)")
        read_kinds.add(read.kind)
    if len(read_kinds) != 1:
        raise ValueError(f"the transcoders read different site kinds {sorted(read_kinds)}; one kind for every layer")
    return read_kinds.pop()


def _gradients(model, tokens, frozen, mlp_out, reads, targets, logit_tokens, d_in, batch_size):
    """Gradients of every target through the replacement model with respect to what the sources
    write: ``(at the embeddings [T, seq, d_model], at each mlp_out [T, L, seq, d_model])``, the
    feature targets first, then the logits."""
    L, seq, d = mlp_out.shape
    n_f = len(targets)
    cotangents = np.zeros((n_f + len(logit_tokens), L, seq, d_in), np.float32)
    for t, (layer, p, direction) in enumerate(targets):
        cotangents[t, layer, p] = direction
    logit_cotangents = np.zeros((len(cotangents), model.cfg.d_vocab), np.float32)
    logit_cotangents[n_f:] = np.eye(model.cfg.d_vocab, dtype=np.float32)[logit_tokens] - 1.0 / model.cfg.d_vocab
    chunks = []
    for start in range(0, len(cotangents), batch_size):
        chunk = slice(start, start + batch_size)
        pad = batch_size - len(cotangents[chunk])  # a fixed batch shape compiles once
        padded = [np.pad(c[chunk], [(0, pad)] + [(0, 0)] * (c.ndim - 1)) for c in (cotangents, logit_cotangents)]
        grads = _pullback(model, tokens, frozen, mlp_out, reads, *padded)
        chunks.append([np.asarray(g)[:batch_size - pad] for g in grads])
    return tuple(np.concatenate(parts) for parts in zip(*chunks))


@jit
def _pullback(model, tokens, frozen, mlp_out, reads, cotangents, logit_cotangents):
    L, seq, d = mlp_out.shape
    freeze = tuple(Replace(f"blocks.*.{kind}", value, per_layer=True) if S.parse(kind).kind in S.BLOCK_KINDS
                   else Replace(kind, value) for kind, value in frozen.items())

    def replacement_model(writes):
        at_embedding, at_mlp = writes
        edits = freeze + (Replace("blocks.*.mlp_out", mlp_out[:, None], per_layer=True),  # no path through MLPs
                          Add("blocks.*.mlp_out", at_mlp[:, None], per_layer=True),
                          Add("blocks.0.resid_pre", at_embedding[None]), Capture(f"blocks.*.{reads}"))
        logits, cache = apply(model, tokens, edits, logit_positions=jnp.array([seq - 1]))
        return cache.stack(reads)[:, 0].astype(jnp.float32), logits[0, 0].astype(jnp.float32)

    zeros = (jnp.zeros((seq, d), mlp_out.dtype), jnp.zeros_like(mlp_out))
    _, pullback = jax.vjp(replacement_model, zeros)
    return jax.vmap(lambda c, lc: pullback((c, lc))[0])(cotangents, logit_cotangents)


# --- pruning -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pruned:
    """``node_mask [n_nodes]``, ``edge_mask [n_nodes, n_nodes]`` (as ``adjacency``: target, source)
    and each node's ``influence`` on the logits (before pruning)."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    influence: np.ndarray


def normalized(adjacency: np.ndarray) -> np.ndarray:
    """|edges|, each target's incoming ones scaled to sum to 1 (rows without edges stay 0)."""
    magnitudes = np.abs(adjacency)
    return magnitudes / np.maximum(magnitudes.sum(axis=1, keepdims=True), 1e-10)


def influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights @ (A + A^2 + A^3 + ...)`` for the normalised adjacency A: each node's effect on the
    weighted targets through paths of every length (A is nilpotent: the graph is acyclic)."""
    A = normalized(adjacency)
    step = weights @ A
    total = step.copy()
    for _ in range(len(A)):
        if not step.any():
            return total
        step = step @ A
        total += step
    raise ValueError("the adjacency matrix has a cycle; an attribution graph is acyclic")


def _threshold(scores: np.ndarray, fraction: float) -> float:
    """The smallest score among the largest ones that together carry ``fraction`` of the total."""
    ordered = np.sort(scores.ravel())[::-1]
    cumulative = np.cumsum(ordered) / max(ordered.sum(), 1e-30)
    return float(ordered[min(int(np.searchsorted(cumulative, fraction)), len(ordered) - 1)])


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """The nodes and edges carrying ``node_threshold`` and ``edge_threshold`` of the influence on
    the logits (see the module docstring)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    n, n_f, n_logits = len(graph.adjacency), graph.n_features, len(graph.logit_tokens)
    always = np.arange(n) >= n - n_logits - graph.n_pos  # embeddings and logits
    weights = np.zeros(n)
    weights[n - n_logits:] = graph.logit_probabilities
    node_influence = influence(graph.adjacency, weights)
    nodes = (node_influence >= _threshold(node_influence, node_threshold)) | always

    pruned = np.where(nodes[:, None] & nodes[None, :], graph.adjacency, 0.0)
    A = normalized(pruned)
    edge_scores = A * (influence(pruned, weights) + weights)[:, None]  # an edge's share of its target's influence
    edges = edge_scores >= _threshold(edge_scores, edge_threshold)
    while True:  # features and errors need an outgoing edge, features an incoming one
        keep = nodes & (always | (edges & nodes[:, None]).any(axis=0))
        keep[:n_f] &= (edges[:n_f] & keep[None, :]).any(axis=1)
        if (keep == nodes).all():
            break
        nodes = keep
    return Pruned(nodes, edges & nodes[:, None] & nodes[None, :], node_influence)
