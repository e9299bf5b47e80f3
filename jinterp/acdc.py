"""ACDC (Conmy et al. 2023): automatic circuit discovery by pruning edges of the computational graph.

On the edge graph of ``jinterp.circuits`` (writers: the input, every head, every MLP; readers: each
head's query/key/value input, MLP inputs, the logits), ACDC walks the readers from the logits backwards.
For each reader (*receiver*) it tries removing each edge still coming into it — the edge is fed its
value from the corrupted run (edge patching, ``circuits.EdgePatch``), everything else as in the
current circuit — and removes the edge for good when the metric changes by less than ``tau``. The
default metric is the KL divergence of the circuit's next-token distribution from the full model's
on the clean input (lower is better), so an edge stays when removing it moves the output by ``tau``
nats or more.

jinterp's twist: the trials of a receiver are one ``vmap`` over edge masks inside one compiled program
(chunked by the memory budget), not a Python loop of forwards. The reference implementation tries the
edges one after another, each trial against the circuit with the removals before it. Here every edge
is first tried alone against the circuit as the receiver finds it (one vmapped batch: its effect);
the edges whose effect is below ``tau`` are then removed one after another in order of effect, each
only if the metric moves by less than ``tau`` from the circuit with the removals before it, which is
ACDC's rule in that order: the removals of every prefix of the candidates are one more vmapped batch,
and after an edge fails the rest are retried from there. So edges that stand in for each other are
not all removed together. ``batched=False`` runs exactly the same trials one forward each (the
baseline the benchmark compares with).

Since the readers are walked from the output backwards, nothing before a receiver's layer has lost an
edge when its trials run: every trial resumes from the clean run's residual stream at that layer
(``start=``), with the writers before it carrying their clean differences (``EdgePatch.written``).
The trials of a receiver vary only its own column of drops (``EdgePatch.dropping(drop, receiver=v)``,
vmapped over ``column``); everything else is the current circuit, shared.

A receiver whose writer no longer reaches the output (a head none of whose outgoing edges is left)
is skipped: its incoming edges cannot matter, and are removed without trials.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jinterp import memory
from jinterp._compile import jit
from jinterp.circuits import Graph, edge_patch, writer_sites
from jinterp.core import apply, run
from jinterp.models.transformer import Transformer
from jinterp.patching import pair


@dataclass
class ACDCResult:
    """What ``acdc`` found.

    ``circuit``: the kept edges, ``[n_upstream, n_downstream]`` bool; ``graph``: the ``Graph``;
    ``effects``: the metric change each trial measured (NaN for edges never tried);
    ``metric``: the circuit's metric (KL to the full model by default); ``metric_full`` and
    ``metric_empty``: the metric with every edge kept and with none; ``trials``: the edge trials
    run; ``forwards``: every forward pass, trials included; ``seconds``: the time taken.
    """

    circuit: np.ndarray
    graph: Graph
    effects: np.ndarray
    metric: float
    metric_full: float
    metric_empty: float
    tau: float
    trials: int
    forwards: int
    seconds: float
    edges: list[tuple[str, str]] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        """The writers and readers the kept edges join, writers first."""
        up = [self.graph.upstream[u] for u in np.flatnonzero(self.circuit.any(1))]
        down = [self.graph.downstream[d] for d in np.flatnonzero(self.circuit.any(0))]
        return up + down

    @property
    def n_edges(self) -> int:
        return int(self.circuit.sum())


@jit
def _trials(model, tokens, patch, columns, metric, reference, attention_mask, logit_positions, start):
    """The metric with ``patch`` (made ``dropping(drop, receiver)``) feeding its receiver each of ``columns``."""
    def one(column):
        edited = eqx.tree_at(lambda p: p.column, patch, column)
        logits = apply(model, tokens, (edited,), attention_mask=attention_mask, logit_positions=logit_positions,
                       start=start)[0]
        return metric(logits, reference)

    return jax.vmap(one)(columns)


def _writers(graph: Graph, cfg) -> list[np.ndarray]:
    """For each reader, the writer rows whose output it feeds (its head, the query heads of its kv head,
    its MLP); empty for the logits."""
    group = cfg.group_size
    index = {name: i for i, name in enumerate(graph.upstream)}
    out = []
    for name in graph.downstream:
        found = re.fullmatch(r"L(\d+)(?:(H|KV)(\d+)\.([qkv])|MLP)", name)
        if found is None:  # the logits
            out.append(np.zeros(0, int))
            continue
        layer, kind, j, part = found.groups()
        if kind is None:
            out.append(np.asarray([index[f"L{layer}MLP"]]))
        elif kind == "H" and (part == "q" or group == 1):
            out.append(np.asarray([index[f"L{layer}H{j}"]]))
        else:  # L{l}KV{j}.k / .v: the query heads reading kv head j
            j = int(j)
            out.append(np.asarray([index[f"L{layer}H{h}"] for h in range(j * group, (j + 1) * group)]))
    return out


def _layers(graph: Graph, n_layers: int) -> np.ndarray:
    """Each reader's layer (the last one for the logits)."""
    return np.asarray([int(re.match(r"L(\d+)", name).group(1)) if name != "logits" else n_layers - 1
                       for name in graph.downstream])


def acdc(model: Transformer, clean, corrupted, tau: float, *, metric: Callable | None = None,
         absolute: bool = False, attention_mask=None, logit_positions=None, batched: bool = True,
         memory_budget: float = 2e9, progress: bool = True, step: Callable | None = None) -> ACDCResult:
    """Find a circuit with ACDC on the edge graph of ``model`` (see the module docstring).

    Args:
        clean, corrupted: token ids ``[batch, seq]``; the circuit runs the clean tokens, removed edges
            carry their value from the corrupted run.
        tau: an edge is removed when removing it changes the metric by less than this.
        metric: ``metric(logits) -> scalar``, lower meaning closer to the full model (for a logit
            difference pass its negation); default the KL divergence of the full model's next-token
            distribution on the clean tokens from the circuit's (at ``logit_positions``).
        absolute: compare ``|change|`` with ``tau`` (for metrics where both directions matter).
        batched: the trials of a receiver as one vmapped program (default); False: one forward per trial.
        memory_budget: bytes the vmapped trials of one chunk may use.
        step: ``step(name, compute)`` returns ``compute()`` or a saved result of it: each receiver's
            trials and decision are one step (``jinterp.runs.Run.step`` makes a run resumable after
            any interruption, receiver by receiver). Default: just ``compute()``.
    """
    start = time.perf_counter()
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.number)) or not (math.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    tau = float(tau)
    graph = Graph.of(model.cfg)
    pair(model, clean, corrupted, "denoise", attention_mask=attention_mask)  # checks the two fit together
    clean, corrupted = jnp.asarray(clean), jnp.asarray(corrupted)
    options = dict(attention_mask=attention_mask, logit_positions=logit_positions)
    clean_logits, clean_cache = run(model, clean, capture=writer_sites(model.cfg), **options)
    if metric is None:
        reference, measure = jax.nn.log_softmax(clean_logits.astype(jnp.float32), -1), _kl
    else:
        reference, measure = jnp.zeros(()), _user(metric)
    _, patch = edge_patch(model, graph.valid, corrupted, **options)  # drop filled in per trial
    patch = patch.resumed_from(clean_cache)
    resid, layers = clean_cache.stack("resid_pre"), _layers(graph, model.cfg.n_layers)
    dtype = patch.drop.dtype
    drop = np.zeros(graph.valid.shape, np.float32)

    def evaluate(columns: np.ndarray, v: int) -> np.ndarray:
        """The metric with reader ``v`` fed each of ``columns`` (its drops), the rest as ``drop``, each trial
        resumed at ``v``'s layer."""
        trial = patch.dropping(jnp.asarray(drop, dtype), receiver=v)
        start = (jnp.int32(layers[v]), resid[layers[v]])
        trials = lambda c: _trials(model, clean, trial, jnp.asarray(c, dtype), measure, reference,  # noqa: E731
                                   attention_mask, logit_positions, start)
        if not batched:
            return np.asarray([float(trials(c[None])[0]) for c in columns])
        out, chunk = [], fitting(trial.rows)
        for first in range(0, len(columns), chunk):
            part = columns[first:first + chunk]
            # Powers of two from 8: a few compiled sizes (compiling dominates small models' trials).
            size = min(chunk, max(8, 1 << (len(part) - 1).bit_length()))
            padded = np.concatenate([part, np.repeat(part[-1:], size - len(part), 0)])
            out.append(np.asarray(trials(padded))[:len(part)])
        return np.concatenate(out)

    def ends() -> np.ndarray:
        """The metric with every edge and with none (whole forwards)."""
        patches = [patch.dropping(jnp.asarray(d, dtype)) for d in (drop, graph.valid)]
        return np.asarray([float(measure(run(model, clean, edits=p, **options)[0], reference)) for p in patches])

    run_bytes, most = memory.run_bytes(model.site_specs(clean, **options)), int(graph.valid.sum(0).max())

    def fitting(rows: int) -> int:
        """Trials in a chunk (a power of two): each a run's activations and ``rows`` recorded differences."""
        per_trial = run_bytes + rows * clean.size * model.cfg.d_model * 4 * 2
        fit = min(most, memory.how_many_fit(memory_budget, per_trial, unit="edge trial",
                                            hint="use fewer or shorter inputs, or logit_positions"))
        return 1 << (fit.bit_length() - 1)

    step = step or (lambda name, compute: compute())
    full, empty = (float(x) for x in np.asarray(step("acdc/ends", ends)))
    forwards, trials, current = 2, 0, full
    effects = np.full(graph.valid.shape, np.nan, np.float32)
    writers = _writers(graph, model.cfg)
    from tqdm.auto import tqdm

    for v in tqdm(list(reversed(range(len(graph.downstream)))), desc="ACDC receivers", disable=not progress):
        parents = np.flatnonzero(graph.valid[:, v] & (drop[:, v] == 0))
        if not len(parents):
            continue
        if len(writers[v]) and not (graph.valid[writers[v]] & (drop[writers[v]] == 0)).any():
            drop[parents, v] = 1.0  # this reader's output reaches nothing kept: its inputs cannot matter
            continue

        def decide(v=v, parents=parents, current=current):
            columns = np.repeat(drop[None, :, v], len(parents), 0)
            columns[np.arange(len(parents)), parents] = 1.0
            change = evaluate(columns, v) - current
            small = lambda x: (np.abs(x) if absolute else x) < tau  # noqa: E731
            # Removed one after another, smallest effect first, each only if the metric then moves by less
            # than tau from the circuit with the removals before it (ACDC's rule): the removals of every
            # prefix of the candidates are one vmapped batch; a rejected edge stays and the rest retry.
            remaining = list(np.argsort(change, kind="stable")[small(np.sort(change, kind="stable"))])
            removed = np.zeros(len(parents), bool)
            after, new, forwards = drop[:, v].copy(), current, len(parents)
            while remaining:
                forwards += len(remaining)
                prefixes = np.repeat(after[None], len(remaining), 0)
                for k, i in enumerate(remaining):
                    prefixes[k:, parents[i]] = 1.0
                metrics = evaluate(prefixes, v)
                good = small(np.diff(np.concatenate([[new], metrics])))
                n = int(np.argmin(good)) if not good.all() else len(remaining)
                for i in remaining[:n]:
                    removed[i] = True
                    after[parents[i]] = 1.0
                new = float(metrics[n - 1]) if n else new
                remaining = remaining[n + 1:]
            return {"change": change.astype(np.float32), "removed": removed.astype(np.int8), "metric": np.float64(new),
                    "forwards": np.int64(forwards)}

        outcome = step(f"acdc/{v:05d}", decide)
        removed = np.asarray(outcome["removed"]).astype(bool)
        effects[parents, v] = np.asarray(outcome["change"])
        drop[parents[removed], v] = 1.0
        current = float(outcome["metric"])
        trials += len(parents)
        forwards += int(outcome["forwards"])
    circuit = graph.valid & (drop == 0)
    result = ACDCResult(circuit, graph, effects, current, full, empty, tau, trials, forwards,
                        time.perf_counter() - start,
                        [(graph.upstream[u], graph.downstream[d]) for u, d in zip(*np.nonzero(circuit))])
    if result.n_edges in (0, graph.n_edges):
        which = "no edge" if result.n_edges == 0 else f"every edge ({graph.n_edges})"
        warnings.warn(f"ACDC with tau={tau} keeps {which}: the metric is {result.metric_full:.6g} with every edge "
                      f"and {result.metric_empty:.6g} with none; choose tau between the effects of single edges "
                      f"(ACDCResult.effects)", stacklevel=2)
    return result


def _kl(logits, reference):
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return jnp.sum(jnp.exp(reference) * (reference - log_q), -1).mean()


class _user(eqx.Module):
    """A user's metric of the logits in the trials' signature ``(logits, reference)``."""

    metric: Callable = eqx.field(static=True)

    def __call__(self, logits, reference):
        return self.metric(logits)


__all__ = ["ACDCResult", "acdc"]
