"""Training SAEs through the one training loop (``jinterp.train.train``).

    trained = train_sae(activations, "topk", d_sae=4096, k=32, steps=20_000, lr=4e-4)
    trained.sae, trained.history["explained_variance"]

Losses (the reconstruction error is ``|x - x_hat|^2`` summed over ``d_in``, averaged over tokens):

- relu: ``+ l1_coefficient * sum_i latent_i * |W_dec[i]|`` (Anthropic's April 2024 update: the L1
  penalty weighted by decoder row norms, which makes it invariant to rescaling a latent; decoder rows
  then need no constraint, as in SAELens' "standard" training).
- topk, batchtopk: reconstruction only; the sparsity is the activation's.
- jumprelu: ``+ l0_coefficient * L0`` through the straight-through ``step`` (Rajamanoharan et al. 2024).

Dead latents: a latent is dead when it has not fired within the last ``dead_window`` training
tokens (Gao et al. 2024). The auxiliary-k loss (Gao et al., appendix A.2) has the top ``aux_k``
dead latents reconstruct the main reconstruction's residual, which gives them a gradient back;
it is on by default for relu, topk and batchtopk (coefficient 1/32). Resampling (Bricken et al.
2023) is not offered: it rewrites parameters and optimizer state between steps, which the one
loop does not do, whereas aux-k is an ordinary loss term.

Decoder rows of topk, batchtopk and jumprelu SAEs stay unit norm (Gao et al.; Rajamanoharan et
al.) through two optax transformations around Adam: the gradient along each row is removed before
it, and the rows are projected back onto the unit sphere after it (jumprelu thresholds are kept
non-negative there too). The SAE stays a plain module with a plain ``W_dec``, and ``train`` is
unchanged.

Per-latent buffers that are not learned (tokens since each latent fired; batchtopk's running
threshold) ride in the trained state: the loss adds a term whose value is 0 and whose gradient is
``current - target``, and the optimizer's "assign" group (SGD, rate 1) lands them on ``target``.
So they are checkpointed and resumed bit for bit with everything else.

Inputs are rescaled so that the mean norm is ``sqrt(d_in)`` (``normalize=True``, SAELens'
``expected_average_only_in``), which makes coefficients and learning rates transfer between sites;
the scale is folded into the returned SAE's weights, which therefore read raw activations (its
decoder rows then have norm ``1 / input_scale``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from jinterp.models.config import choose
from jinterp.sae.autoencoder import ARCHITECTURES, SAE, batch_topk, geometric_median, jumprelu, step
from jinterp.sae.sources import ArrayActivations
from jinterp.train import train


class SAEState(eqx.Module):
    """What the loop trains: the SAE and, per latent, the training tokens seen since it last fired
    (capped at the dead window)."""

    sae: SAE
    since_fired: Float[Array, " d_sae"]


@dataclasses.dataclass(frozen=True)
class TrainedSAE:
    """``sae`` (reading raw activations: the input scale is folded in), the loop's ``history``
    (``loss`` per step; per evaluation ``eval_step``, ``l0``, ``explained_variance``, ``mse``,
    ``dead_fraction``), the ``input_scale`` used in training and ``since_fired [d_sae]``."""

    sae: SAE
    history: dict[str, np.ndarray]
    input_scale: float
    since_fired: np.ndarray


def _assign(current: Array, target: Array) -> Array:
    """A loss term of value 0 whose gradient is ``current - target``: one SGD step of rate 1 (the
    optimizer's "assign" group) moves ``current`` onto ``target``."""
    return jnp.sum((current - jax.lax.stop_gradient(current)) * jax.lax.stop_gradient(current - target))


def aux_k_loss(residual: Float[Array, "n d_in"], pre: Float[Array, "n d_sae"], dead: Array, k_aux: int,
               W_dec: Float[Array, "d_sae d_in"]) -> Array:
    """Gao et al. 2024's auxiliary loss: the ``k_aux`` largest pre-activations of dead latents (taken
    as they are, as SAELens does, so a latent that never fires still gets a gradient) decode the
    ``residual`` of the main reconstruction. Scaled down by ``n_dead / k_aux`` when fewer latents
    are dead; 0 when none is."""
    values, indices = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), k_aux)
    values = jnp.where(jnp.isfinite(values), values, 0.0)  # fewer than k_aux dead latents
    latents = jnp.put_along_axis(jnp.zeros_like(pre), indices, values, axis=-1, inplace=False)
    error = jnp.mean(jnp.sum((latents @ W_dec - residual) ** 2, axis=-1))
    return jnp.minimum(dead.sum() / k_aux, 1.0) * error


class SAELoss(eqx.Module):
    """``loss(state, x [n, d_in])``: reconstruction + the architecture's sparsity penalty + aux-k,
    plus the zero-valued terms that update the dead-latent counter and batchtopk's threshold."""

    # Arrays, not Python numbers, so that other values do not compile the training step again.
    input_scale: Float[Array, ""]
    l1_coefficient: Float[Array, ""]
    l0_coefficient: Float[Array, ""]
    bandwidth: Float[Array, ""]
    aux_coefficient: Float[Array, ""]
    dead_window: Float[Array, ""]
    threshold_rate: Float[Array, ""]
    aux_k: int = eqx.field(static=True)

    def __call__(self, state: SAEState, x: Float[Array, "n d_in"]) -> Array:
        sae = state.sae
        x = x.astype(sae.W_enc.dtype) * self.input_scale
        pre = sae.pre_activations(x)
        if sae.architecture == "batchtopk":
            latents = batch_topk(pre, sae.k)
        elif sae.architecture == "jumprelu":
            latents = jumprelu(pre, sae.threshold, self.bandwidth)
        else:
            latents = sae.activate(pre)
        reconstruction = sae.decode(latents)
        loss = jnp.mean(jnp.sum((reconstruction - x) ** 2, axis=-1))
        if sae.architecture == "relu":
            loss += self.l1_coefficient * jnp.mean(latents @ jnp.linalg.norm(sae.W_dec, axis=-1))
        if sae.architecture == "jumprelu":
            loss += self.l0_coefficient * jnp.mean(jnp.sum(step(pre, sae.threshold, self.bandwidth), axis=-1))
        dead = state.since_fired >= self.dead_window
        residual = jax.lax.stop_gradient(x - reconstruction)
        loss += self.aux_coefficient * aux_k_loss(residual, pre, dead, self.aux_k, sae.W_dec)
        fired = jnp.any(latents > 0, axis=0)
        since = jnp.where(fired, 0.0, jnp.minimum(state.since_fired + x.shape[0], self.dead_window))
        loss += _assign(state.since_fired, since)
        if sae.architecture == "batchtopk":
            loss += _assign(sae.threshold, self._running_threshold(sae.threshold, latents))
        return loss

    def _running_threshold(self, threshold, latents):
        """Bussmann et al.'s inference threshold: a running mean of the smallest kept activation
        (started at the first batch's)."""
        smallest = jnp.min(jnp.where(latents > 0, latents, jnp.inf))
        smallest = jnp.where(jnp.isfinite(smallest), smallest, threshold)
        return jnp.where(threshold > 0, (1 - self.threshold_rate) * threshold + self.threshold_rate * smallest,
                         smallest)


def _unit_rows(W: Array) -> Array:
    return W / jnp.linalg.norm(W, axis=-1, keepdims=True)


def without_parallel_gradient() -> optax.GradientTransformation:
    """Remove from each decoder row's gradient its component along the row, so that a step moves
    the row around the unit sphere rather than off it (Gao et al. 2024, section 2.4)."""

    def update(grads, state, params):
        W, g = params.sae.W_dec, grads.sae.W_dec
        g = g - jnp.sum(g * W, axis=-1, keepdims=True) * W
        return eqx.tree_at(lambda s: s.sae.W_dec, grads, g), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def projected(nonnegative_threshold: bool) -> optax.GradientTransformation:
    """Change the updates so that after them each decoder row has unit norm (and, for jumprelu, the
    thresholds are non-negative: a negative threshold would let the gate pass negative values)."""

    def update(updates, state, params):
        W = params.sae.W_dec
        updates = eqx.tree_at(lambda s: s.sae.W_dec, updates, _unit_rows(W + updates.sae.W_dec) - W)
        if nonnegative_threshold:
            t = params.sae.threshold
            updates = eqx.tree_at(lambda s: s.sae.threshold, updates, jnp.maximum(t + updates.sae.threshold, 0) - t)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


@functools.lru_cache(maxsize=64)
def sae_optimizer(architecture: str, lr: float, steps: int) -> optax.GradientTransformation:
    """Adam at ``lr``, decayed linearly to 0 over the last 20% of ``steps``, for the learned arrays of
    an ``SAEState``; the "assign" group (SGD, rate 1) for its buffers; the decoder-norm constraint
    for the architectures that need it. Memoised: the loop compiles once per optimizer object."""
    decay = max(1, steps // 5)
    lr = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, decay)], [steps - decay])

    def labels(state: SAEState):
        assigned = [lambda s: s.since_fired] + ([lambda s: s.sae.threshold] if architecture == "batchtopk" else [])
        tree = jax.tree.map(lambda _: "learn", state)
        return eqx.tree_at(lambda s: [where(s) for where in assigned], tree, ["assign"] * len(assigned))

    groups = optax.multi_transform({"learn": optax.adam(lr), "assign": optax.sgd(1.0)}, labels)
    if architecture == "relu":
        return groups
    return optax.chain(without_parallel_gradient(), groups, projected(architecture == "jumprelu"))


@eqx.filter_jit
def _metrics(state: SAEState, x: Float[Array, "n d_in"], dead_window: int) -> dict[str, Array]:
    sae = state.sae
    latents = sae.encode(x)
    error = jnp.sum((sae.decode(latents) - x) ** 2, axis=-1)
    variance = jnp.sum((x - x.mean(axis=0)) ** 2, axis=-1)
    return {"l0": jnp.mean(jnp.sum(latents > 0, axis=-1)),
            "explained_variance": 1 - error.sum() / variance.sum(),
            "mse": error.mean(),
            "dead_fraction": jnp.mean(state.since_fired >= dead_window)}


def train_sae(
    activations,
    architecture: str = "topk",
    d_sae: int = 4096,
    *,
    k: int | None = None,
    steps: int = 10_000,
    batch_size: int | None = None,
    lr: float = 3e-4,
    seed: int = 0,
    l1_coefficient: float = 5.0,
    l0_coefficient: float = 1.0,
    bandwidth: float = 0.05,
    initial_threshold: float = 0.01,
    aux_coefficient: float | None = None,
    aux_k: int | None = None,
    dead_window: int = 1_000_000,
    threshold_rate: float = 0.01,
    normalize: bool = True,
    apply_b_dec_to_input: bool = True,
    site: str | None = None,
    init: SAE | None = None,
    sample_size: int = 8192,
    eval_every: int = 100,
    run=None,
    name: str = "sae",
    progress: bool = True,
) -> TrainedSAE:
    """Trains a sparse autoencoder on ``activations`` through ``jinterp.train.train``.

    Args:
        activations: an array ``[n, d_in]`` or an activation source (``ArrayActivations``,
            ``ModelActivations``: anything with ``d_in``, ``batch_size``, ``__call__(step)`` and
            ``sample(n)``).
        architecture: "relu", "topk", "batchtopk" or "jumprelu" (see ``jinterp.sae.autoencoder``).
        d_sae: the number of latents.
        k: latents per token (topk, batchtopk).
        steps, batch_size, lr, seed: optimisation (Adam; the learning rate decays linearly to 0
            over the last 20% of the steps). ``batch_size`` (default ``min(4096, n)``) is for an
            array; a source has its own.
        l1_coefficient: relu's L1 penalty; l0_coefficient, bandwidth, initial_threshold: jumprelu's
            L0 penalty, straight-through kernel width and starting threshold (in normalised units).
        aux_coefficient, aux_k: the auxiliary-k loss (default 1/32 for relu/topk/batchtopk, 0 for
            jumprelu; ``aux_k`` default ``d_in // 2``).
        dead_window: a latent is dead when it has not fired in this many training tokens.
        threshold_rate: batchtopk's running-threshold rate.
        normalize: rescale inputs to mean norm ``sqrt(d_in)`` during training (folded in after).
        apply_b_dec_to_input: subtract ``b_dec`` before encoding.
        site: the jinterp site the activations come from, recorded on the SAE (default: the source's).
        init: start from this SAE (in normalised units) instead of the literature's initialisation.
        sample_size: activations drawn once for ``b_dec``'s geometric median, the input scale and
            the evaluations.
        eval_every, run, name, progress: as ``jinterp.train.train`` (``run``: checkpoint and resume).

    Returns:
        a ``TrainedSAE``.
    """
    choose(architecture, ARCHITECTURES, "SAE architecture")
    source = _source(activations, batch_size, seed)
    site = site if site is not None else getattr(source, "site", None)
    d_in = source.d_in
    if not isinstance(d_sae, int) or d_sae < 1:
        raise ValueError(f"d_sae must be a positive int, got {d_sae!r}")
    if architecture in ("topk", "batchtopk") and k is None:
        raise ValueError(f"A {architecture} SAE needs k (latents per token), e.g. k=32")
    if not 0 < dead_window <= 2 ** 24:
        raise ValueError(f"dead_window must be in [1, 2**24] tokens (counted exactly in float32), got {dead_window}")
    if aux_coefficient is None:
        aux_coefficient = 0.0 if architecture == "jumprelu" else 1 / 32
    aux_k = min(aux_k or max(d_in // 2, 1), d_sae)

    sample = jnp.asarray(source.sample(sample_size), jnp.float32)
    input_scale = math.sqrt(d_in) / float(jnp.linalg.norm(sample, axis=-1).mean()) if normalize else 1.0
    sample = sample * input_scale
    if init is None:
        threshold = 0.0 if architecture == "batchtopk" else initial_threshold
        init = SAE.init(d_in, d_sae, architecture, key=jax.random.key(seed), k=k, b_dec=geometric_median(sample),
                        threshold=threshold, apply_b_dec_to_input=apply_b_dec_to_input, site=site)
    elif (init.architecture, init.d_in, init.d_sae, init.k) != (architecture, d_in, d_sae, k):
        raise ValueError(f"init is a {init.architecture} SAE d_in={init.d_in}, d_sae={init.d_sae}, k={init.k}; "
                         f"this training asks for {architecture} d_in={d_in}, d_sae={d_sae}, k={k}")
    numbers = (input_scale, l1_coefficient, l0_coefficient, bandwidth, aux_coefficient, dead_window, threshold_rate)
    loss = SAELoss(*(jnp.asarray(n, jnp.float32) for n in numbers), aux_k=aux_k)
    trained = train(SAEState(init, jnp.zeros(d_sae)), loss, sae_optimizer(architecture, float(lr), steps), source,
                    steps=steps, eval_every=eval_every, evaluate=lambda state: _metrics(state, sample, dead_window),
                    run=run, name=name, progress=progress,
                    description=f"SAE {architecture} d_sae={d_sae}" + (f" k={k}" if k else ""))
    state = trained.params
    return TrainedSAE(state.sae.with_input_scale(input_scale), trained.history, input_scale,
                      np.asarray(state.since_fired))


def _source(activations: Any, batch_size: int | None, seed: int):
    if hasattr(activations, "sample") and callable(activations):
        if batch_size is not None and batch_size != activations.batch_size:
            raise ValueError(f"batch_size={batch_size} given, but the source serves batches of "
                             f"{activations.batch_size}; set it on the source")
        return activations
    array = jnp.asarray(activations)
    if array.ndim != 2 or not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"activations must be a float array [n, d_in] or an activation source, "
                         f"got {array.dtype} {array.shape}")
    return ArrayActivations(array, batch_size or min(4096, array.shape[0]), seed)
