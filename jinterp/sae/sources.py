"""Where an SAE's training activations come from: anything with ``d_in``, ``batch_size``,
``__call__(step) -> [batch_size, d_in]`` (traced inside the training loop, so the data order is a
function of the step alone) and ``sample(n) -> [n, d_in]`` (eager: initialisation and evaluation).

``ArrayActivations`` serves an array held in memory. ``ModelActivations`` computes activations
from a jinterp model inside the compiled training step, a few sequences at a time, so the full set
of activations is never held.

Transcoder data: a source with ``targets`` (``ArrayActivations``) or a ``target_site``
(``ModelActivations``) serves pairs ``(inputs [batch, d_in], targets [batch, d_out])`` from the
same rows, from ``__call__`` and ``sample`` alike, and has ``d_out``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jinterp import memory
from jinterp import names as S
from jinterp._compile import jit
from jinterp.core import run
from jinterp.models.declaration import site_specs
from jinterp.specs import canonical, lookup


class ArrayActivations(eqx.Module):
    """Activations ``[n, d_in]`` in memory, served in batches of rows drawn uniformly (with
    replacement) from a key of ``seed`` and the step. Not epochs of permutations
    (``jinterp.train.shuffled_batches``): those redraw a permutation of all ``n`` rows every step,
    which costs O(n log n) per step (19 ms for n = 8192 on a CPU, twenty times the step itself)."""

    activations: Float[Array, "n d_in"]
    batch_size: int = eqx.field(static=True)
    seed: int = eqx.field(static=True, default=0)
    targets: Float[Array, "n d_out"] | None = None  # a transcoder's: served paired with the activations

    def __check_init__(self):
        if self.activations.ndim != 2:
            raise ValueError(f"activations must be [n, d_in], got shape {self.activations.shape}")
        if self.targets is not None and (self.targets.ndim != 2 or len(self.targets) != len(self.activations)):
            raise ValueError(f"targets must be [n={len(self.activations)}, d_out] (one per activation row), "
                             f"got shape {self.targets.shape}")
        if not 0 < self.batch_size <= self.activations.shape[0]:
            raise ValueError(f"batch_size must be in [1, n={self.activations.shape[0]}], got {self.batch_size}")

    @property
    def d_in(self) -> int:
        return self.activations.shape[1]

    @property
    def d_out(self) -> int:
        return self.d_in if self.targets is None else self.targets.shape[1]

    def _rows(self, rows):
        return self.activations[rows] if self.targets is None else (self.activations[rows], self.targets[rows])

    def __call__(self, step) -> Float[Array, "batch d_in"]:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        return self._rows(jax.random.randint(key, (self.batch_size,), 0, self.activations.shape[0]))

    def sample(self, n: int) -> Float[Array, "n d_in"]:
        """``n`` rows drawn without replacement (all of them if there are fewer)."""
        order = jax.random.permutation(jax.random.key(self.seed + 1), self.activations.shape[0])
        return self._rows(order[:n])


class ModelActivations(eqx.Module):
    """Activations of ``model`` at ``site`` on token sequences ``[n_seq, seq]``, computed on the fly:
    each step runs the model on ``sequences_per_batch`` sequences drawn uniformly (with replacement,
    as ``ArrayActivations``) and serves all their
    positions (``batch_size = sequences_per_batch * seq``), positions before ``skip`` (e.g. the BOS
    token, whose activations are outliers) left out. With ``target_site`` it serves pairs (a
    transcoder's input and target, from the same forward). The model is a field, so the training
    step receives its weights as arguments rather than compiling them in.

    ``memory_budget`` (bytes, default None: no limit) bounds the activations of one forward
    (``jinterp.memory``): a training step's ``sequences_per_batch`` then run as sub-batches that fit it,
    one after another inside the compiled step, and ``all()`` / ``sample()`` run as many sequences
    per forward as fit it (without a budget: ``max(sequences_per_batch, 8)``). The rows served are
    the same either way."""

    model: eqx.Module
    tokens: Int[Array, "n_seq seq"]
    site: str = eqx.field(static=True)
    sequences_per_batch: int = eqx.field(static=True)
    skip: int = eqx.field(static=True, default=0)
    seed: int = eqx.field(static=True, default=0)
    target_site: str | None = eqx.field(static=True, default=None)
    memory_budget: float | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        for name in (self.site, self.target_site):
            if name is not None and (S.site_key(name).layer == "*" or S.site_key(name).layer is None
                                     and S.site_key(name).kind in S.BLOCK_KINDS):
                raise ValueError(f"ModelActivations reads one site; name its layer, got {name!r}")
            if name is not None:
                lookup(self.model.site_specs(), name)
        if self.tokens.ndim != 2 or not 0 <= self.skip < self.tokens.shape[1]:
            raise ValueError(f"tokens must be [n_seq, seq] with seq > skip={self.skip}, got {self.tokens.shape}")
        if not 0 < self.sequences_per_batch <= self.tokens.shape[0]:
            raise ValueError(f"sequences_per_batch must be in [1, n_seq={self.tokens.shape[0]}], "
                             f"got {self.sequences_per_batch}")
        if self.memory_budget is not None:
            self.sequences_per_forward(1)  # a budget too small for one sequence says so now

    @property
    def d_in(self) -> int:
        return math.prod(lookup(self.model.site_specs(), self.site).shape[2:])

    @property
    def d_out(self) -> int:
        site = self.site if self.target_site is None else self.target_site
        return math.prod(lookup(self.model.site_specs(), site).shape[2:])

    @property
    def batch_size(self) -> int:
        return self.sequences_per_batch * (self.tokens.shape[1] - self.skip)

    def _sites(self) -> list[str]:
        return [self.site] + ([self.target_site] if self.target_site is not None else [])

    def _layers_run(self) -> int:
        """Only the blocks up to the deepest site read run (every block if a site is outside them)."""
        layers = [S.site_key(site).layer for site in self._sites()]
        return max(layers) + 1 if all(isinstance(layer, int) for layer in layers) else self.model.cfg.n_layers

    def _cut(self) -> ModelActivations:
        """This source with its model cut after the deepest site read (``first_layers``): a copy of
        those layers' weights, made once for many forwards rather than once in each."""
        n = self._layers_run()
        return self if n == self.model.cfg.n_layers else eqx.tree_at(lambda s: s.model, self,
                                                                     self.model.first_layers(n))

    def sequences_per_forward(self, wanted: int) -> int:
        """How many of ``wanted`` sequences one forward runs: all of them without a ``memory_budget``,
        otherwise at most as many as fit it (``jinterp.memory``). The budget also holds the copy of
        the weights of the layers run, when the model is cut (``first_layers``)."""
        if self.memory_budget is None:
            return wanted
        n, full, seq = self._layers_run(), self.model.cfg.n_layers, self.tokens.shape[1]
        cfg = self.model.cfg.replace(n_layers=n, layer_types=self.model.cfg.layer_types[:n])
        names = [canonical(site) for site in self._sites()]
        each = memory.run_bytes(site_specs(cfg, 1, seq, seq if "logits" in names else 0), names)
        weights = 0 if n == full else sum(a.nbytes for a in jax.tree.leaves(self.model.blocks)) * n // full
        fits = memory.how_many_fit(self.memory_budget, each, unit=f"sequence of {seq} tokens",
                                   hint="use shorter sequences", reserved=weights,
                                   reserved_for=f"the copy of the {n} layers' weights run")
        return min(wanted, fits)

    def _activations(self, tokens) -> Float[Array, "n d_in"]:
        sites, model = self._sites(), self._cut().model
        unembed = any(S.site_key(site).kind == "logits" for site in sites)  # nothing unembedded unless logits are read
        _, cache = run(model, tokens, capture=sites,  # traceable: its checks skip traced values
                       logit_positions=None if unembed else np.zeros(0, np.int32))
        values = [cache[site][:, self.skip:].reshape(-1, width) for site, width in zip(sites, (self.d_in, self.d_out))]
        return values[0] if self.target_site is None else tuple(values)

    def _activations_in_parts(self, tokens) -> Float[Array, "n d_in"]:
        """``_activations`` of ``[n, seq]`` tokens inside a compiled step, as sub-batches that fit the
        memory budget run one after another (``lax.map``): the same rows, never more than one
        sub-batch's activations at once."""
        n = tokens.shape[0]
        parts = math.ceil(n / self.sequences_per_forward(n))
        if parts == 1:
            return self._activations(tokens)
        size = math.ceil(n / parts)  # balanced: the last part is padded with copies of the last sequence
        padded = tokens[np.minimum(np.arange(parts * size), n - 1)].reshape(parts, size, -1)
        rows = n * (self.tokens.shape[1] - self.skip)
        values = jax.lax.map(self._cut()._activations, padded)  # the model cut once, outside the loop
        return jax.tree.map(lambda a: a.reshape(-1, a.shape[-1])[:rows], values)

    @property
    def n_tokens(self) -> int:
        """Activations in all the sequences (positions before ``skip`` left out)."""
        return self.tokens.shape[0] * (self.tokens.shape[1] - self.skip)

    def _in_chunks(self, order) -> Float[Array, "n d_in"]:
        # Sequences per forward: fewer, larger calls, as many as fit the memory budget.
        chunk = self.sequences_per_forward(max(self.sequences_per_batch, 8) if self.memory_budget is None
                                           else max(len(order), 1))
        cut = self._cut()
        parts = [_compiled_activations(cut, self.tokens[order[i:i + chunk]]) for i in range(0, len(order), chunk)]
        return jax.tree.map(lambda *pieces: jnp.concatenate(pieces), *parts)

    def all(self) -> Float[Array, "n_tokens d_in"]:
        """Every sequence's activations, sequence by sequence (row ``i * (seq - skip) + j`` is
        sequence ``i``'s position ``skip + j``), computed in chunks."""
        return self._in_chunks(np.arange(self.tokens.shape[0]))

    def __call__(self, step) -> Float[Array, "batch d_in"]:
        return _compiled_step(self, step)  # compiled on its own when called outside a training step

    def _step(self, step) -> Float[Array, "batch d_in"]:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        rows = jax.random.randint(key, (self.sequences_per_batch,), 0, self.tokens.shape[0])
        return self._activations_in_parts(self.tokens[rows])

    def sample(self, n: int) -> Float[Array, "n d_in"]:
        """Activations of the first ``n`` tokens of a seeded order of sequences, computed in chunks."""
        per_sequence = self.tokens.shape[1] - self.skip
        order = np.asarray(jax.random.permutation(jax.random.key(self.seed + 1), self.tokens.shape[0]))
        return jax.tree.map(lambda a: a[:n], self._in_chunks(order[:math.ceil(n / per_sequence)]))


@jit
def _compiled_activations(source: ModelActivations, tokens):
    return source._activations(tokens)  # one compiled program per chunk shape


@jit
def _compiled_step(source: ModelActivations, step):
    return source._step(step)


class Refill(NamedTuple):
    """A shuffle-buffer step's batch: ``fresh`` activations from the source (an array or an
    (input, target) pair) and the buffer ``slots`` to train on; the first ``len(fresh)`` of them
    then take the fresh activations."""

    fresh: Any
    slots: Int[Array, " batch"]


class ShuffleBuffer(eqx.Module):
    """Serves a source's activations through a buffer of ``size`` rows (held in the training
    state, see ``train_sae(shuffle_buffer=)``): each step trains on ``batch_size`` rows drawn from
    the buffer without replacement, and the source's fresh batch replaces the first of them. So a
    batch mixes activations from many steps' sequences rather than a few sequences' correlated
    tokens, and each activation is served ``batch_size / source.batch_size`` times on average (once
    when they are equal), in a random order."""

    source: Any
    size: int = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        fresh = self.source.batch_size
        if not fresh <= self.batch_size <= self.size:
            raise ValueError(f"A shuffle buffer needs source.batch_size={fresh} <= batch_size={self.batch_size} <= "
                             f"shuffle_buffer={self.size}")

    @property
    def d_in(self) -> int:
        return self.source.d_in

    @property
    def d_out(self) -> int:
        return getattr(self.source, "d_out", self.source.d_in)

    @property
    def site(self) -> str | None:
        return getattr(self.source, "site", None)

    @property
    def target_site(self) -> str | None:
        return getattr(self.source, "target_site", None)

    def __call__(self, step) -> Refill:
        key = jax.random.fold_in(jax.random.key(self.seed + 2), step)
        return Refill(self.source(step), jax.random.choice(key, self.size, (self.batch_size,), replace=False))

    def sample(self, n: int):
        return self.source.sample(n)
