"""Where an SAE's training activations come from: anything with ``d_in``, ``batch_size``,
``__call__(step) -> [batch_size, d_in]`` (traced inside the training loop, so the data order is a
function of the step alone) and ``sample(n) -> [n, d_in]`` (eager: initialisation and evaluation).

``ArrayActivations`` serves an array held in memory. ``ModelActivations`` computes activations
from a jinterp model inside the compiled training step, a few sequences at a time, so the full set
of activations is never held.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jinterp import names as S
from jinterp.cache import run


class ArrayActivations(eqx.Module):
    """Activations ``[n, d_in]`` in memory, served in batches of rows drawn uniformly (with
    replacement) from a key of ``seed`` and the step. Not epochs of permutations
    (``jinterp.train.shuffled_batches``): those redraw a permutation of all ``n`` rows every step,
    which costs O(n log n) per step (19 ms for n = 8192 on a CPU, twenty times the step itself)."""

    activations: Float[Array, "n d_in"]
    batch_size: int = eqx.field(static=True)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        if self.activations.ndim != 2:
            raise ValueError(f"activations must be [n, d_in], got shape {self.activations.shape}")
        if not 0 < self.batch_size <= self.activations.shape[0]:
            raise ValueError(f"batch_size must be in [1, n={self.activations.shape[0]}], got {self.batch_size}")

    @property
    def d_in(self) -> int:
        return self.activations.shape[1]

    def __call__(self, step) -> Float[Array, "batch d_in"]:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        return self.activations[jax.random.randint(key, (self.batch_size,), 0, self.activations.shape[0])]

    def sample(self, n: int) -> Float[Array, "n d_in"]:
        """``n`` rows drawn without replacement (all of them if there are fewer)."""
        order = jax.random.permutation(jax.random.key(self.seed + 1), self.activations.shape[0])
        return self.activations[order[:n]]


class ModelActivations(eqx.Module):
    """Activations of ``model`` at ``site`` on token sequences ``[n_seq, seq]``, computed on the fly:
    each step runs the model on ``sequences_per_batch`` sequences drawn uniformly (with replacement,
    as ``ArrayActivations``) and serves all their
    positions (``batch_size = sequences_per_batch * seq``), positions before ``skip`` (e.g. the BOS
    token, whose activations are outliers) left out. The model is a field, so the training step
    receives its weights as arguments rather than compiling them in."""

    model: eqx.Module
    tokens: Int[Array, "n_seq seq"]
    site: str = eqx.field(static=True)
    sequences_per_batch: int = eqx.field(static=True)
    skip: int = eqx.field(static=True, default=0)
    seed: int = eqx.field(static=True, default=0)

    def __check_init__(self):
        site = S.resolve(self.model.cfg, self.site)
        if not isinstance(site.layer, int) and site.kind in S.BLOCK_KINDS:
            raise ValueError(f"ModelActivations reads one site; name its layer, got {self.site!r}")
        if self.tokens.ndim != 2 or not 0 <= self.skip < self.tokens.shape[1]:
            raise ValueError(f"tokens must be [n_seq, seq] with seq > skip={self.skip}, got {self.tokens.shape}")
        if not 0 < self.sequences_per_batch <= self.tokens.shape[0]:
            raise ValueError(f"sequences_per_batch must be in [1, n_seq={self.tokens.shape[0]}], "
                             f"got {self.sequences_per_batch}")

    @property
    def d_in(self) -> int:
        return math.prod(S.site_shape(self.model.cfg, S.parse(self.site).kind)[2:])

    @property
    def batch_size(self) -> int:
        return self.sequences_per_batch * (self.tokens.shape[1] - self.skip)

    def _activations(self, tokens) -> Float[Array, "n d_in"]:
        _, cache = run(self.model, tokens, capture=[self.site])  # traceable: its checks skip traced values
        value = cache[self.site][:, self.skip:]
        return value.reshape(-1, self.d_in)

    def __call__(self, step) -> Float[Array, "batch d_in"]:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        rows = jax.random.randint(key, (self.sequences_per_batch,), 0, self.tokens.shape[0])
        return self._activations(self.tokens[rows])

    def sample(self, n: int) -> Float[Array, "n d_in"]:
        """Activations of the first ``n`` tokens of a seeded order of sequences, computed in chunks."""
        per_sequence = self.tokens.shape[1] - self.skip
        order = np.asarray(jax.random.permutation(jax.random.key(self.seed + 1), self.tokens.shape[0]))
        order = order[:math.ceil(n / per_sequence)]
        chunks = [self._activations(self.tokens[order[i:i + self.sequences_per_batch]])
                  for i in range(0, len(order), self.sequences_per_batch)]
        return jnp.concatenate(chunks)[:n]
