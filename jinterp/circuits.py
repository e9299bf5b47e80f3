"""Edge attribution (EAP, EAP-IG), circuit extraction and circuit faithfulness.

The graph: *upstream* nodes write into the residual stream — the input embedding, every
attention head (its ``z @ W_O``), every MLP; *downstream* nodes read it — each head's query,
key and value input (per kv head under grouped-query attention), each MLP's input, and the
logits. An edge joins a writer to a later reader.

EAP (Syed et al. 2023) scores an edge ``(u, v)`` as ``(source_u - base_u) . d metric / d input_v``
from one forward of each run and one backward; EAP-IG (Hanna et al. 2024) averages the gradient
over inputs interpolated between the two runs. Both take the patching conventions of
``jinterp.patching`` (``direction="denoise"``: gradients at the corrupted run).

A circuit keeps some edges; ``faithfulness`` runs the clean input with every other edge fed
its corrupted value (edge patching, through one stateful intervention) and compares metrics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from jinterp._compile import jit
from jinterp.core import apply, run
from jinterp.interventions import Add, At, Intervention, Replace
from jinterp.models.config import Config
from jinterp.models.transformer import Transformer
from jinterp.patching import pair


@dataclass(frozen=True)
class Graph:
    """Node names and the valid edges of a model's computational graph."""

    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    valid: np.ndarray  # [n_upstream, n_downstream] bool

    @classmethod
    def of(cls, cfg: Config) -> Graph:
        if cfg.norm_placement != "pre" or not cfg.unembed:
            raise ValueError(f"Edge attribution needs a pre-norm decoder whose components add into the residual "
                             f"stream; this {cfg.architecture} model has norm_placement={cfg.norm_placement!r}")
        H, K, mlp = cfg.n_heads, cfg.n_kv_heads, cfg.has_mlp
        kv = "H" if K == H else "KV"
        up, up_layer, up_mlp = ["input"], [-1], [False]
        down, down_layer, down_mlp = [], [], []
        for layer in range(cfg.n_layers):
            up += [f"L{layer}H{h}" for h in range(H)] + ([f"L{layer}MLP"] if mlp else [])
            up_layer += [layer] * (H + mlp)
            up_mlp += [False] * H + [True] * mlp
            down += ([f"L{layer}H{h}.q" for h in range(H)] + [f"L{layer}{kv}{j}.k" for j in range(K)]
                     + [f"L{layer}{kv}{j}.v" for j in range(K)] + ([f"L{layer}MLP"] if mlp else []))
            down_layer += [layer] * (H + 2 * K + mlp)
            down_mlp += [False] * (H + 2 * K) + [True] * mlp
        down.append("logits")
        down_layer.append(cfg.n_layers)
        down_mlp.append(False)
        ul, dl = np.asarray(up_layer)[:, None], np.asarray(down_layer)[None, :]
        um, dm = np.asarray(up_mlp)[:, None], np.asarray(down_mlp)[None, :]
        # A head writes before its own layer's MLP reads (unless attention and MLP run in parallel);
        # an MLP writes after everything in its layer.
        same_layer = (ul == dl) & ~um & dm & (not cfg.parallel)
        return cls(tuple(up), tuple(down), (ul < dl) | same_layer)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())


class EdgePatch(Intervention):
    """Feed the edges where ``drop`` is 1 their corrupted value: each reader's input loses
    ``sum_u drop[u, v] * (a_u - a_u_corrupt)`` over the writers u, where a_u is the writer's
    output in this run. One stateful intervention: writers record their difference as the
    forward passes them; readers subtract what they should not see. Where fewer edges into a reader
    are kept than dropped, the same input is made from the other end, with fewer terms: the corrupted
    run's value there plus the kept writers' differences. Only the writers some reader's terms need
    are recorded (``slot``: each writer's row of the state, the last row for the others; a ``drop``
    swapped in that needs another writer gives NaN, never a wrong value).

    ``written``: the differences to start from, for a run resumed at a layer (``start=``), which skips
    the writers before it (``resumed_from``); None: zeros. ``receiver``, ``column``: one reader fed
    ``column`` (its drops) instead of its column of ``drop``, against the ``written`` differences
    (ACDC's trials vary one reader's edges: ``column`` is what they vmap over)."""

    site: str = eqx.field(static=True)
    drop: Float[Array, "up down"]
    corrupt: dict  # the corrupted run's values (see __init__)
    W_O: Array
    written: Array | None  # [n_upstream, batch, pos, d_model]
    receiver: Array  # int32
    column: Array | None  # [n_upstream]
    slot: Array  # int32 [n_upstream]
    rows: int = eqx.field(static=True)
    cfg: Config = eqx.field(static=True)

    def __init__(self, cfg: Config, drop, corrupt: dict, W_O, written=None, receiver=-1, column=None):
        """``corrupt``: the corrupted run's ``resid_pre``, ``mlp_in``, ``z`` and ``mlp_out`` of every layer
        (stacked; the MLP's None without MLPs) and the last layer's ``resid_post`` as ``out``."""
        self.site, self.cfg, self.drop, self.corrupt, self.W_O = "resid_pre", cfg, drop, corrupt, W_O
        self.written, self.receiver, self.column = written, jnp.int32(receiver), column
        valid = _valid(cfg)
        if isinstance(drop, jax.core.Tracer):
            needed = np.ones(len(valid), bool)
        else:
            needed = np.asarray(_terms(jnp.asarray(drop), valid)[0] != 0).any(1)
        # Powers of two from 8 (a few compiled sizes), one row more than needed for the rest.
        self.rows = min(len(valid) + 1, max(8, 1 << int(needed.sum()).bit_length()))
        self.slot = jnp.asarray(np.where(needed, np.cumsum(needed) - 1, self.rows - 1), jnp.int32)

    def dropping(self, drop, receiver: int = -1) -> EdgePatch:
        """This patch with ``drop`` instead; a ``receiver`` >= 0 reads ``column`` (zeros until set) instead
        of its column of ``drop``, against the ``written`` differences: for runs resumed at the receiver's
        layer where no reader before it (in ``Graph.downstream`` order) drops an edge."""
        if receiver >= 0 and self.written is None:
            raise ValueError("a receiver's column is taken against the writers' differences of a resumed run: "
                             "make the patch with resumed_from(clean_cache) first")
        column = None if receiver < 0 else jnp.zeros(self.drop.shape[0], self.drop.dtype)
        return EdgePatch(self.cfg, drop, self.corrupt, self.W_O, self.written, receiver, column)

    def resumed_from(self, cache) -> EdgePatch:
        """This patch for runs resumed at a layer (``start=``) from ``cache``, a run of the same tokens
        with every edge kept that captured ``writer_sites`` (the clean run): the writers before that
        layer carry their difference from the corrupted run in ``written``."""
        corrupt = (self.corrupt["resid_pre"][0], self.corrupt["z"], self.corrupt["mlp_out"])
        written = _differences(self.W_O, *jax.tree.map(jnp.subtract, _writes(cache, self.cfg), corrupt))
        return eqx.tree_at(lambda p: p.written, self, written, is_leaf=lambda x: x is None)

    def kinds(self):
        kinds = ("resid_pre", "attn.q_input", "attn.k_input", "attn.v_input", "attn.z", "resid_post")
        return kinds + (("mlp_in", "mlp_out") if self.cfg.has_mlp else ())

    def initial_state(self, specs):
        """(the recorded writers' differences so far, by ``slot``; the receiver's input less its ``column``
        of the written ones)."""
        dtype = self.corrupt["resid_pre"].dtype
        recorded = jnp.zeros((self.rows, *specs["blocks.0.resid_pre"].shape), dtype)
        if self.written is None:
            return recorded, None
        written = self.written.astype(dtype)
        recorded = recorded.at[self.slot].set(written)
        return recorded, None if self.column is None else jnp.einsum("u,ubsd->bsd", self.column.astype(dtype), written)

    def __call__(self, value, at: At):
        cfg, H, K, mlp = self.cfg, self.cfg.n_heads, self.cfg.n_kv_heads, int(self.cfg.has_mlp)
        up = 1 + at.layer * (H + mlp)  # first upstream row of this layer
        down = at.layer * (H + 2 * K + mlp)  # first downstream column of this layer
        recorded, received = at.state
        if at.kind == "resid_pre":  # layer 0 reads the input node's write
            first = jnp.where(at.layer == 0, value - self.corrupt["resid_pre"][0], recorded[self.slot[0]])
            at.set_state((recorded.at[self.slot[0]].set(first), received))
        elif at.kind == "attn.z":
            delta = jnp.einsum("bshe,hed->hbsd", value - self.corrupt["z"][at.layer], self.W_O[at.layer])
            at.set_state((recorded.at[jax.lax.dynamic_slice_in_dim(self.slot, up, H)].set(delta), received))
        elif at.kind == "mlp_out":
            delta = value - self.corrupt["mlp_out"][at.layer]
            at.set_state((recorded.at[self.slot[up + H]].set(delta), received))
        elif at.kind in ("attn.q_input", "attn.k_input", "attn.v_input"):
            offset, heads = {"attn.q_input": (0, H), "attn.k_input": (H, K), "attn.v_input": (H + K, K)}[at.kind]
            return self._fed(value, at.state, down + offset, heads, self.corrupt["resid_pre"][at.layer])
        elif at.kind == "mlp_in":
            fed = self._fed(value[:, :, None], at.state, down + H + 2 * K, 1, self.corrupt["mlp_in"][at.layer])
            return fed[:, :, 0]
        elif at.kind == "resid_post":  # the last layer's output is what the logits read
            fed = self._fed(value[:, :, None], at.state, self.drop.shape[1] - 1, 1, self.corrupt["out"])
            return jnp.where(at.layer == cfg.n_layers - 1, fed[:, :, 0], value)
        return value

    def _fed(self, value, state, first, count, corrupted):
        """The inputs of readers ``first .. first + count``, ``value`` being theirs in this run
        ``[batch, pos, count, d_model]`` and ``corrupted`` the corrupted run's ``[batch, pos, d_model]``."""
        recorded, received = state
        drop = jax.lax.dynamic_slice_in_dim(self.drop, first, count, 1)  # [up, count]
        weights, from_corrupted = _terms(drop, jax.lax.dynamic_slice_in_dim(_valid(self.cfg), first, count, 1))
        by_row = jnp.zeros((self.rows, count), recorded.dtype).at[self.slot].add(weights.astype(recorded.dtype))
        fed = jnp.where(from_corrupted[:, None], corrupted[:, :, None], value)
        fed = fed + jnp.einsum("rc,rbsd->bscd", by_row, recorded)
        if received is not None:
            fed = jnp.where((first + jnp.arange(count) == self.receiver)[:, None], value - received[:, :, None], fed)
        unrecorded = ((weights != 0) & (self.slot == self.rows - 1)[:, None]).any()
        return jnp.where(unrecorded, jnp.nan, fed)


def _terms(drop, valid):
    """Each reader's terms by writer ``[up, readers]``: its dropped writers' differences subtracted, or where
    fewer of its edges are kept than dropped, its kept writers' added to the corrupted value; and whether it
    starts from the corrupted value ``[readers]``."""
    keep = valid.astype(drop.dtype) - drop
    from_corrupted = jnp.count_nonzero(keep, 0) < jnp.count_nonzero(drop, 0)
    return jnp.where(from_corrupted, keep, -drop), from_corrupted


@functools.cache
def _valid(cfg: Config) -> np.ndarray:
    """``Graph.of(cfg).valid`` as 0/1 floats."""
    return Graph.of(cfg).valid.astype(np.float32)


# --- scores -------------------------------------------------------------------------------------

def writer_sites(cfg: Config) -> list[str]:
    """The sites every upstream node's output is made from: the input, each layer's z and MLP output."""
    return ["blocks.*.resid_pre", "blocks.*.attn.z"] + (["blocks.*.mlp_out"] if cfg.has_mlp else [])


def _writes(cache, cfg: Config) -> tuple:
    """(input, z of every layer, MLP output of every layer or None) from a run that captured ``writer_sites``."""
    return cache["blocks.0.resid_pre"], cache.stack("attn.z"), cache.stack("mlp_out") if cfg.has_mlp else None


def _differences(W_O, d_input, d_z, d_mlp) -> Float[Array, "up batch pos d_model"]:
    """Every upstream node's output difference, in ``Graph.upstream`` order, from the differences of its
    ingredients (``_writes``): a head's is its z difference through its W_O."""
    heads = jnp.einsum("lbshe,lhed->lhbsd", d_z, W_O)
    per_layer = [heads] if d_mlp is None else [heads, d_mlp[:, None]]
    layers = jnp.concatenate(per_layer, 1).reshape(-1, *heads.shape[2:])
    return jnp.concatenate([d_input[None], layers])


def _reader_gradients(model, tokens, metric, attention_mask, logit_positions, embed=None):
    """d metric / d every downstream node's input, in ``Graph.downstream`` order: ``[down, batch, pos, d_model]``."""
    cfg = model.cfg
    batch, seq = tokens.shape
    L, H, K, D = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model
    zeros = {"attn.q_input": jnp.zeros((L, batch, seq, H, D)), "attn.k_input": jnp.zeros((L, batch, seq, K, D)),
             "attn.v_input": jnp.zeros((L, batch, seq, K, D))}
    if cfg.has_mlp:
        zeros["mlp_in"] = jnp.zeros((L, batch, seq, D))
    zeros["final"] = jnp.zeros((batch, seq, D))

    def scored(deltas):
        edits = [Add(f"blocks.*.{kind}", deltas[kind], per_layer=True) for kind in zeros if kind != "final"]
        edits.append(Add(f"blocks.{L - 1}.resid_post", deltas["final"]))
        if embed is not None:
            edits.insert(0, Replace("embed", embed))
        logits, _ = apply(model, tokens, tuple(edits), attention_mask=attention_mask, logit_positions=logit_positions)
        return metric(logits)

    g = jax.grad(scored)(zeros)
    per_layer = [g["attn.q_input"], g["attn.k_input"], g["attn.v_input"]]
    if cfg.has_mlp:
        per_layer.append(g["mlp_in"][:, :, :, None])
    per_layer = jnp.concatenate(per_layer, 3).transpose(0, 3, 1, 2, 4).reshape(-1, batch, seq, D)
    return jnp.concatenate([per_layer, g["final"][None]])


def edge_attribution(model: Transformer, clean, corrupted, metric: Callable, *, ig_steps: int = 0,
                     direction: str = "denoise", attention_mask=None, logit_positions=None, progress: bool = True):
    """Edge scores ``[n_upstream, n_downstream]`` (0 where no edge) and the ``Graph``.

    ``ig_steps=0``: EAP, gradients at the base run. ``ig_steps=m``: EAP-IG, gradients averaged at
    m midpoints of the straight path between the base and source input embeddings.
    """
    if not isinstance(ig_steps, int) or ig_steps < 0:
        raise ValueError(f"ig_steps must be a non-negative int (0 = EAP), got {ig_steps!r}")
    graph = Graph.of(model.cfg)
    base, source = pair(model, clean, corrupted, direction, attention_mask=attention_mask)
    capture = writer_sites(model.cfg) + ["embed"]
    _, base_cache = run(model, base, capture=capture, attention_mask=attention_mask)
    _, source_cache = run(model, source, capture=capture, attention_mask=attention_mask)
    differences = _differences(model.blocks.attn.W_O, *jax.tree.map(
        jnp.subtract, _writes(source_cache, model.cfg), _writes(base_cache, model.cfg)))
    gradient = _reader_gradients_jit
    if ig_steps == 0:
        grads = gradient(model, base, metric, attention_mask, logit_positions, None)
    else:
        e_base, e_source = base_cache["embed"], source_cache["embed"]
        grads = 0.0
        for alpha in tqdm((np.arange(ig_steps) + 0.5) / ig_steps, desc="EAP-IG steps", disable=not progress):
            embed = e_base + jnp.float32(alpha) * (e_source - e_base)
            grads = grads + gradient(model, base, metric, attention_mask, logit_positions, embed)
        grads = grads / ig_steps
    scores = jnp.einsum("ubsd,vbsd->uv", differences, grads)
    return jnp.where(graph.valid, scores, 0.0), graph


_reader_gradients_jit = jit(_reader_gradients)


# --- circuits -----------------------------------------------------------------------------------

def prune(scores, graph: Graph, *, n_edges: int | None = None, threshold: float | None = None) -> np.ndarray:
    """The circuit's edges as a boolean ``[n_upstream, n_downstream]`` mask: the ``n_edges``
    edges with the largest absolute score, or every edge whose absolute score reaches ``threshold``."""
    if (n_edges is None) == (threshold is None):
        raise ValueError("prune takes exactly one of n_edges= or threshold=")
    magnitude = np.where(graph.valid, np.abs(np.asarray(scores)), -np.inf)
    if threshold is not None:
        return magnitude >= threshold
    if not 0 <= n_edges <= graph.n_edges:
        raise ValueError(f"n_edges={n_edges} is outside 0..{graph.n_edges} (the graph's edges)")
    keep = np.zeros(magnitude.size, bool)
    keep[np.argsort(-magnitude, axis=None)[:n_edges]] = True
    return keep.reshape(magnitude.shape)


def faithfulness(model: Transformer, circuit: np.ndarray, clean, corrupted, metric: Callable, *,
                 attention_mask=None, logit_positions=None) -> dict[str, float]:
    """Run the clean tokens with every edge outside ``circuit`` fed its corrupted value.

    Returns the metric of the clean, corrupted and circuit runs, ``faithfulness`` (circuit / clean)
    and ``normalized`` ((circuit - corrupted) / (clean - corrupted): 1 = the circuit recovers the
    whole effect, 0 = none of it).
    """
    pair(model, clean, corrupted, "denoise", attention_mask=attention_mask)
    corrupt_logits, patch = edge_patch(model, circuit, corrupted, attention_mask=attention_mask,
                                       logit_positions=logit_positions)  # checks the circuit's shape
    clean_logits, _ = run(model, clean, attention_mask=attention_mask, logit_positions=logit_positions)
    circuit_logits, _ = run(model, clean, edits=patch, attention_mask=attention_mask,
                            logit_positions=logit_positions)
    clean, corrupted, kept = (float(metric(x)) for x in (clean_logits, corrupt_logits, circuit_logits))
    return dict(clean=clean, corrupted=corrupted, circuit=kept, faithfulness=kept / clean,
                normalized=(kept - corrupted) / (clean - corrupted), edges=int(np.count_nonzero(circuit)),
                of=Graph.of(model.cfg).n_edges)


def edge_patch(model: Transformer, circuit: np.ndarray, corrupted, *, attention_mask=None, logit_positions=None):
    """The edge patch that feeds every edge outside ``circuit`` its value from the ``corrupted`` run:
    ``(corrupted logits, EdgePatch)``; run the clean tokens with it (``jinterp.run(..., edits=patch)``)."""
    cfg, graph = model.cfg, Graph.of(model.cfg)
    circuit = np.asarray(circuit, bool)
    if circuit.shape != graph.valid.shape:
        raise ValueError(f"circuit has shape {circuit.shape}; this model's graph is {graph.valid.shape}")
    reads = [f"blocks.{cfg.n_layers - 1}.resid_post"] + (["blocks.*.mlp_in"] if cfg.has_mlp else [])
    logits, corrupt = run(model, corrupted, capture=writer_sites(cfg) + reads, attention_mask=attention_mask,
                          logit_positions=logit_positions)
    mlp = lambda kind: corrupt.stack(kind) if cfg.has_mlp else None
    values = dict(resid_pre=corrupt.stack("resid_pre"), mlp_in=mlp("mlp_in"), out=corrupt[reads[0]],
                  z=corrupt.stack("attn.z"), mlp_out=mlp("mlp_out"))
    patch = EdgePatch(cfg, jnp.asarray(graph.valid & ~circuit, values["out"].dtype), values, model.blocks.attn.W_O)
    return logits, patch
