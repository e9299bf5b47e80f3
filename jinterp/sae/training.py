"""Training SAEs through the one training loop (``jinterp.train.train``).

    trained = train_sae(activations, "topk", d_sae=4096, k=32, steps=20_000, lr=4e-4)
    trained.sae, trained.history["explained_variance"]

A transcoder trains the same way on pairs: ``train_sae((inputs, targets), ...)`` or a source serving
pairs (``ModelActivations(..., target_site=)``); the reconstruction error, the aux-k residual and
the explained variance are then measured against the targets.

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
``current - target``, and the optimizer's "assign" group (SGD, rate 1) lands them on ``target``
(to float rounding: ``current + (target - current)``). So they are checkpointed and resumed bit
for bit with everything else. The shuffle buffer (``shuffle_buffer=``, see
``sources.ShuffleBuffer``) rides the same way: each step trains on rows drawn from it, and the
source's fresh activations are assigned into the first of those rows.

Inputs are rescaled so that the mean norm is ``sqrt(d_in)`` (``normalize=True``, SAELens'
``expected_average_only_in``), which makes coefficients and learning rates transfer between sites;
the scale is folded into the returned SAE's weights, which therefore read raw activations (its
decoder rows then have norm ``1 / input_scale``). A transcoder's targets get their own scale (mean
norm ``sqrt(d_out)``), folded into its decoder likewise.
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

from jinterp._compile import jit
from jinterp.models.config import choose
from jinterp.sae.autoencoder import (
    ARCHITECTURES,
    SAE,
    _unit_rows,
    batch_topk,
    geometric_median,
    jumprelu,
    step,
    top_k,
    topk_decode,
    topk_encode,
)
from jinterp.sae.sources import ArrayActivations, Refill, ShuffleBuffer
from jinterp.train import train


class SAEState(eqx.Module):
    """What the loop trains: the SAE and, per latent, the training tokens seen since it last fired
    (capped at the dead window); with a shuffle buffer, its contents."""

    sae: SAE
    since_fired: Float[Array, " d_sae"]
    buffer: Any = None  # the shuffle buffer's activations (an array or an (input, target) pair), if any


@dataclasses.dataclass(frozen=True)
class TrainedSAE:
    """``sae`` (reading raw activations: the input scale is folded in), the loop's ``history``
    (``loss`` per step; per evaluation ``eval_step``, ``l0``, ``explained_variance``, ``mse``,
    ``dead_fraction``: of the targets for a transcoder), the ``input_scale`` used in training,
    ``since_fired [d_sae]`` and ``target_scale`` (a transcoder's targets'; ``input_scale`` otherwise)."""

    sae: SAE
    history: dict[str, np.ndarray]
    input_scale: float
    since_fired: np.ndarray
    target_scale: float


def _assign(current: Array, target: Array) -> Array:
    """A loss term of value 0 whose gradient is ``current - target``: one SGD step of rate 1 (the
    optimizer's "assign" group) moves ``current`` onto ``target``."""
    return jnp.sum((current - jax.lax.stop_gradient(current)) * jax.lax.stop_gradient(current - target))


def aux_k_loss(residual: Float[Array, "n d_out"], x: Float[Array, "n d_in"], W_enc: Float[Array, "d_in d_sae"],
               b_enc: Float[Array, " d_sae"], W_dec: Float[Array, "d_sae d_out"], dead: Array, k_aux: int) -> Array:
    """Gao et al. 2024's auxiliary loss: the ``k_aux`` largest pre-activations ``x @ W_enc + b_enc``
    of dead latents (taken as they are, as SAELens does, so a latent that never fires still gets a
    gradient) decode the ``residual`` of the main reconstruction. Scaled down by ``n_dead / k_aux``
    when fewer latents are dead; 0 when none is.

    A latent is dead for every token alike, so only the dead latents' columns of the encoder and
    rows of the decoder take part: the matmuls and the top-k run over them alone, not over all
    ``d_sae``. Shapes stay static: the gathered width is the first of ``k_aux, 2 k_aux, 4 k_aux,
    ..., d_sae`` that holds them all."""
    if not isinstance(k_aux, int) or not 0 < k_aux <= dead.shape[0]:
        raise ValueError(f"k_aux must be an int in [1, d_sae={dead.shape[0]}], got {k_aux!r}")
    return _aux_k(residual, x, W_enc, b_enc, W_dec, dead, k_aux)


def _aux_k_error(width: int, k_aux: int, residual, x, W_enc, b_enc, W_dec, dead):
    """The aux-k reconstruction error over the dead latents, gathered into ``width`` columns."""
    n_dead = dead.sum()
    if width < dead.shape[0]:
        columns = jnp.nonzero(dead, size=width, fill_value=0)[0]
        W_enc, b_enc, W_dec, dead = W_enc[:, columns], b_enc[columns], W_dec[columns], jnp.arange(width) < n_dead
    values, slots = jax.lax.top_k(jnp.where(dead, x @ W_enc + b_enc, -jnp.inf), k_aux)
    values = jnp.where(jnp.isfinite(values), values, 0.0)  # fewer than k_aux dead latents
    latents = jnp.put_along_axis(jnp.zeros((*values.shape[:-1], width), values.dtype), slots, values, axis=-1,
                                 inplace=False)
    error = jnp.mean(jnp.sum((latents @ W_dec - residual) ** 2, axis=-1))
    return jnp.minimum(n_dead / k_aux, 1.0) * error


def _aux_k_switch(k_aux: int, with_gradients: bool, *args):
    """``_aux_k_error`` (and its gradients) at the narrowest width that holds the dead latents."""
    dead = args[-1]
    d_sae = dead.shape[0]
    widths = sorted({min(k_aux * 2 ** i, d_sae) for i in range(math.ceil(math.log2(d_sae / k_aux)) + 1)})

    def branch(width):
        error = functools.partial(_aux_k_error, width, k_aux)
        return jax.value_and_grad(error, argnums=range(5)) if with_gradients else error

    return jax.lax.switch(jnp.searchsorted(jnp.array(widths), dead.sum()), [branch(w) for w in widths], *args)


# The gradients are taken inside each width's branch: differentiated through lax.switch, every branch
# would return the residuals of all the others (zeros as wide as d_sae), which costs more than aux-k.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _aux_k(residual, x, W_enc, b_enc, W_dec, dead, k_aux):
    return _aux_k_switch(k_aux, False, residual, x, W_enc, b_enc, W_dec, dead)


def _aux_k_forward(residual, x, W_enc, b_enc, W_dec, dead, k_aux):
    return _aux_k_switch(k_aux, True, residual, x, W_enc, b_enc, W_dec, dead)


def _aux_k_backward(k_aux, gradients, cotangent):
    return (*(cotangent * g for g in gradients), None)


_aux_k.defvjp(_aux_k_forward, _aux_k_backward)


class SAELoss(eqx.Module):
    """``loss(state, x [n, d_in])`` (a transcoder: ``loss(state, (x, y [n, d_out]))``, predicting
    ``y``): reconstruction + the architecture's sparsity penalty + aux-k, plus the zero-valued terms
    that update the dead-latent counter and batchtopk's threshold."""

    # Arrays, not Python numbers, so that other values do not compile the training step again.
    input_scale: Float[Array, ""]
    target_scale: Float[Array, ""]
    l1_coefficient: Float[Array, ""]
    l0_coefficient: Float[Array, ""]
    bandwidth: Float[Array, ""]
    aux_coefficient: Float[Array, ""]
    dead_window: Float[Array, ""]
    threshold_rate: Float[Array, ""]
    aux_k: int = eqx.field(static=True)
    n_models: int = eqx.field(static=True, default=1)  # a crosscoder's: d_in splits into this many models' blocks

    def __call__(self, state: SAEState, batch: Float[Array, "n d_in"] | tuple[Array, Array]) -> Array:
        sae = state.sae
        loss = 0.0
        if isinstance(batch, Refill):  # train on buffer rows; the fresh activations take the first of their slots
            slots, fresh = batch.slots, batch.fresh
            refilled = jax.tree.map(lambda b, f: b.at[slots[:len(f)]].set(f.astype(b.dtype)), state.buffer, fresh)
            loss += sum(_assign(b, r) for b, r in zip(jax.tree.leaves(state.buffer), jax.tree.leaves(refilled)))
            batch = jax.tree.map(lambda b: jax.lax.stop_gradient(b[slots]), state.buffer)  # data, not learned
        x, target = _pair(batch)
        x = x.astype(sae.W_enc.dtype) * self.input_scale
        target = target.astype(sae.W_enc.dtype) * self.target_scale
        # (x - b_dec) @ W_enc + b_enc with b_dec moved onto the bias: b_dec's gradient is then a
        # vector-matrix product, not a [n, d_sae] x [d_sae, d_in] matmul (inputs are normalised, so
        # there is no cancellation to fear).
        bias = sae.b_enc - sae.b_dec @ sae.W_enc if sae.apply_b_dec_to_input else sae.b_enc
        if sae.architecture == "topk":  # only each token's k active latents are decoded and get gradients
            values, indices = topk_encode(x, sae.W_enc, bias, sae.k)
            values = jax.nn.relu(values)
            reconstruction = topk_decode(values, indices, sae.W_dec) + sae.b_dec
            fired = jnp.zeros(sae.d_sae, bool).at[indices.reshape(-1)].max(values.reshape(-1) > 0)
        else:
            pre = x @ sae.W_enc + bias
            if sae.architecture == "batchtopk":
                latents = batch_topk(pre, sae.k)
            elif sae.architecture == "jumprelu":
                latents = jumprelu(pre, sae.threshold, self.bandwidth)
            else:
                latents = sae.activate(pre)
            reconstruction = sae.decode(latents)
            fired = jnp.any(latents > 0, axis=0)
        loss += jnp.mean(jnp.sum((reconstruction - target) ** 2, axis=-1))
        if sae.architecture == "relu":
            loss += self.l1_coefficient * jnp.mean(latents @ decoder_norms(sae.W_dec, self.n_models).sum(axis=-1))
        if sae.architecture == "jumprelu":
            loss += self.l0_coefficient * jnp.mean(jnp.sum(step(pre, sae.threshold, self.bandwidth), axis=-1))
        dead = state.since_fired >= self.dead_window
        residual = jax.lax.stop_gradient(target - reconstruction)
        loss += jax.lax.cond(jnp.any(dead) & (self.aux_coefficient != 0),  # skipped while no latent is dead
                             lambda: self.aux_coefficient * aux_k_loss(residual, x, sae.W_enc, bias, sae.W_dec, dead,
                                                                       self.aux_k),
                             lambda: jnp.zeros((), x.dtype))
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


def decoder_norms(W_dec: Float[Array, "d_sae d_out"], n_models: int = 1) -> Float[Array, "d_sae n_models"]:
    """Each latent's decoder norm in each of ``n_models`` equal blocks of ``d_out`` (a crosscoder's
    models, model-major); one block for an SAE. The L1 penalty weights a latent by their sum
    (Lindsey et al. 2024: for one model, the row's norm)."""
    return jnp.linalg.norm(W_dec.reshape(W_dec.shape[0], n_models, -1), axis=-1)


def _pair(batch) -> tuple[Array, Array]:
    """(input, target): an autoencoder's batch is both."""
    return batch if isinstance(batch, tuple) else (batch, batch)


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


def least_squares_encoder(sae: SAE, inputs: Float[Array, "n d_in"], targets: Float[Array, "n d_out"]) -> SAE:
    """A transcoder's encoder initialised as an autoencoder's tied one, read in the target space:
    latent i's pre-activation is ``((x - m) A) . W_dec[i]``, with ``A`` the least-squares linear map
    from inputs to targets and ``m`` the inputs' geometric median (for an autoencoder ``A = I`` and
    this is ``W_enc = W_dec.T`` on centred inputs). A random encoder, unrelated to the decoder,
    trains much more slowly: on the planted test's map it recovered 0.77 of the decoder
    directions in 400 steps where this recovers 0.94."""
    A = jnp.linalg.lstsq(inputs - inputs.mean(axis=0), targets - targets.mean(axis=0))[0]
    W_enc = (A @ sae.W_dec.T).astype(sae.W_enc.dtype)
    return eqx.tree_at(lambda s: (s.W_enc, s.b_enc), sae, (W_enc, -geometric_median(inputs) @ W_enc))


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
        tree = eqx.tree_at(lambda s: [where(s) for where in assigned], tree, ["assign"] * len(assigned))
        if state.buffer is not None:
            tree = eqx.tree_at(lambda s: s.buffer, tree, jax.tree.map(lambda _: "assign", state.buffer))
        return tree

    groups = optax.multi_transform({"learn": optax.adam(lr), "assign": optax.sgd(1.0)}, labels)
    if architecture == "relu":
        return groups
    return optax.chain(without_parallel_gradient(), groups, projected(architecture == "jumprelu"))


@jit
def _metrics(state: SAEState, sample, dead_window: int) -> dict[str, Array]:
    sae = state.sae
    x, target = _pair(sample)
    if sae.architecture == "topk":  # the sparse decoder, as in training: no dense [n, d_sae] matmul
        values, indices = top_k(sae.pre_activations(x), sae.k)
        values = jax.nn.relu(values)
        active, reconstruction = values > 0, topk_decode(values, indices, sae.W_dec) + sae.b_dec
    else:
        latents = sae.encode(x)
        active, reconstruction = latents > 0, sae.decode(latents)
    error = jnp.sum((reconstruction - target) ** 2, axis=-1)
    variance = jnp.sum((target - target.mean(axis=0)) ** 2, axis=-1)
    return {"l0": jnp.mean(jnp.sum(active, axis=-1)),
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
    apply_b_dec_to_input: bool | None = None,
    site: str | None = None,
    target_site: str | None = None,
    n_models: int = 1,
    init: SAE | None = None,
    shuffle_buffer: int | None = None,
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
            ``sample(n)``). A transcoder: a pair of arrays ``(inputs [n, d_in], targets [n, d_out])``
            or a source serving pairs (with ``d_out``).
        architecture: "relu", "topk", "batchtopk" or "jumprelu" (see ``jinterp.sae.autoencoder``).
        d_sae: the number of latents.
        k: latents per token (topk, batchtopk).
        steps, batch_size, lr, seed: optimisation (Adam; the learning rate decays linearly to 0
            over the last 20% of the steps). ``batch_size`` (default ``min(4096, n)``) is for an
            array; a source has its own, except through a shuffle buffer: then it is the rows trained
            on per step (default: the source's batch, so each activation is served once).
        l1_coefficient: relu's L1 penalty; l0_coefficient, bandwidth, initial_threshold: jumprelu's
            L0 penalty, straight-through kernel width and starting threshold (in normalised units).
        aux_coefficient, aux_k: the auxiliary-k loss (default 1/32 for relu/topk/batchtopk, 0 for
            jumprelu; ``aux_k`` default ``d_out // 2``, i.e. ``d_in // 2`` for an autoencoder).
        dead_window: a latent is dead when it has not fired in this many training tokens.
        threshold_rate: batchtopk's running-threshold rate.
        normalize: rescale inputs to mean norm ``sqrt(d_in)`` (a transcoder's targets: ``sqrt(d_out)``)
            during training (folded in after).
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (default: True for an autoencoder;
            a transcoder cannot).
        site: the jinterp site the activations come from, recorded on the SAE (default: the source's).
        target_site: a transcoder's target site, recorded likewise (default: the source's).
        n_models: a crosscoder's number of models (``jinterp.sae.crosscoder.train_crosscoder`` sets
            it): ``d_in`` is that many models' activations side by side, and relu's L1 penalty
            weights each latent by the sum of its per-model decoder norms.
        init: start from this SAE (in normalised units) instead of the literature's initialisation
            (a transcoder's encoder: ``least_squares_encoder``).
        shuffle_buffer: train through a buffer of this many activations (``sources.ShuffleBuffer``):
            the first contents come from ``sample``, each step then trains on ``batch_size`` rows
            drawn from it and refills them with the source's fresh batch.
        sample_size: activations drawn once for ``b_dec``'s geometric median, the input scale and
            the evaluations.
        eval_every, run, name, progress: as ``jinterp.train.train`` (``run``: checkpoint and resume).

    Returns:
        a ``TrainedSAE``.
    """
    choose(architecture, ARCHITECTURES, "SAE architecture")
    served_by_source = shuffle_buffer and _is_source(activations)  # then batch_size is the buffer's
    source = _source(activations, None if served_by_source else batch_size, seed)
    buffer = None
    if shuffle_buffer:
        source = ShuffleBuffer(source, shuffle_buffer, batch_size or source.batch_size, seed)
        buffer = source.sample(shuffle_buffer)  # the first contents; every step then refills what it serves
    site = site if site is not None else getattr(source, "site", None)
    target_site = target_site if target_site is not None else getattr(source, "target_site", None)
    d_in, d_out = source.d_in, getattr(source, "d_out", source.d_in)
    if not isinstance(d_sae, int) or d_sae < 1:
        raise ValueError(f"d_sae must be a positive int, got {d_sae!r}")
    if architecture in ("topk", "batchtopk") and k is None:
        raise ValueError(f"A {architecture} SAE needs k (latents per token), e.g. k=32")
    if not 0 < dead_window <= 2 ** 24:
        raise ValueError(f"dead_window must be in [1, 2**24] tokens (counted exactly in float32), got {dead_window}")
    if aux_coefficient is None:
        aux_coefficient = 0.0 if architecture == "jumprelu" else 1 / 32
    aux_k = min(aux_k or max(d_out // 2, 1), d_sae)

    drawn = source.sample(sample_size)
    transcoder = isinstance(drawn, tuple)
    if target_site is not None and not transcoder:
        raise ValueError(f"target_site={target_site!r} given, but the activations are not (input, target) pairs: "
                         f"pass (inputs, targets) or a source with a target_site")
    inputs, targets = (jnp.asarray(a, jnp.float32) for a in _pair(drawn))
    scales = [math.sqrt(a.shape[-1]) / float(jnp.linalg.norm(a, axis=-1).mean()) if normalize else 1.0
              for a in (inputs, targets)]
    input_scale, target_scale = scales if transcoder else scales[:1] * 2
    sample = (inputs * input_scale, targets * target_scale) if transcoder else inputs * input_scale
    if init is None:
        threshold = 0.0 if architecture == "batchtopk" else initial_threshold
        init = SAE.init(d_in, d_sae, architecture, key=jax.random.key(seed), k=k,
                        b_dec=geometric_median(_pair(sample)[1]), threshold=threshold,
                        apply_b_dec_to_input=apply_b_dec_to_input, site=site,
                        d_out=d_out if transcoder else None, target_site=target_site)
        if transcoder:
            init = least_squares_encoder(init, *sample)
    elif (init.architecture, init.d_in, init.d_sae, init.d_out, init.k) != (architecture, d_in, d_sae, d_out, k):
        raise ValueError(f"init is a {init.architecture} SAE d_in={init.d_in}, d_sae={init.d_sae}, "
                         f"d_out={init.d_out}, k={init.k}; this training asks for {architecture} d_in={d_in}, "
                         f"d_sae={d_sae}, d_out={d_out}, k={k}")
    numbers = (input_scale, target_scale, l1_coefficient, l0_coefficient, bandwidth, aux_coefficient, dead_window,
               threshold_rate)
    if not isinstance(n_models, int) or n_models < 1 or d_in % n_models:
        raise ValueError(f"n_models must be a positive int dividing d_in={d_in}, got {n_models!r}")
    loss = SAELoss(*(jnp.asarray(n, jnp.float32) for n in numbers), aux_k=aux_k, n_models=n_models)
    optimizer = sae_optimizer(architecture, float(lr), steps)
    trained = train(SAEState(init, jnp.zeros(d_sae), buffer), loss, optimizer, source, steps=steps,
                    eval_every=eval_every, evaluate=lambda state: _metrics(state, sample, dead_window),
                    run=run, name=name, progress=progress,
                    description=f"{'transcoder' if transcoder else 'SAE'} {architecture} d_sae={d_sae}"
                    + (f" k={k}" if k else ""))
    state = trained.params
    sae = state.sae.with_input_scale(input_scale, target_scale if transcoder else None)
    return TrainedSAE(sae, trained.history, input_scale, np.asarray(state.since_fired), target_scale)


def _is_source(activations: Any) -> bool:
    return hasattr(activations, "sample") and callable(activations)


def _source(activations: Any, batch_size: int | None, seed: int):
    if _is_source(activations):
        if batch_size is not None and batch_size != activations.batch_size:
            raise ValueError(f"batch_size={batch_size} given, but the source serves batches of "
                             f"{activations.batch_size}; set it on the source")
        return activations
    pair = isinstance(activations, tuple) and len(activations) == 2
    arrays = [jnp.asarray(a) for a in (activations if pair else [activations])]
    for array in arrays:
        if array.ndim != 2 or not jnp.issubdtype(array.dtype, jnp.floating):
            raise ValueError(f"activations must be a float array [n, d_in], a pair (inputs [n, d_in], targets "
                             f"[n, d_out]) or an activation source, got {array.dtype} {array.shape}")
    return ArrayActivations(arrays[0], batch_size or min(4096, arrays[0].shape[0]), seed,
                            targets=arrays[1] if pair else None)
