"""The one training loop: a jitted optax step over deterministic batches, evaluated and
checkpointed at intervals through a run.

    trained = train(params, loss, optax.adamw(1e-3), batches, steps=5_000, run=run, name="model")

``loss(params, batch)`` returns a scalar (or ``(scalar, aux)``; aux is ignored) and
``batches(step)`` returns the batch of an int32 step, traced: the data order is a function of
the step alone (``shuffled_batches`` draws epochs from a seed), so a resumed run sees the same
batches as an uninterrupted one. Only the inexact arrays of ``params`` selected by ``trainable``
are trained; the rest (a frozen model, integer buffers) pass through unchanged.

The steps between two evaluations run as one compiled ``lax.scan``. Arrays that ``loss`` or
``batches`` close over are compiled into the program as constants, which is slow for big ones
(a model's weights, a dataset): hold those as fields of an ``eqx.Module`` or an ``eqx.Partial``
instead, so they are passed in as arguments.

With a ``run`` the loop saves its state (trainable arrays, optimizer state, history) every
``checkpoint_every`` steps under ``checkpoints/NAME/``, keeps only the newest, and resumes from it:
a run killed at any moment and rerun gives the same bits as one never interrupted (on CPU),
because the blocks of steps are the same and restored arrays are the saved bytes. With
``snapshot_every`` it also keeps the parameters at every multiple of that many steps (step 0 included),
under ``checkpoints/NAME.snapshots/`` with a run, for analyses over training (e.g. ``jinterp.llc``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jinterp._compile import jit


@dataclasses.dataclass(frozen=True)
class Trained:
    """The trained ``params`` (frozen parts included) and the ``history`` of the run:
    ``loss`` ``[steps]`` (every step's training loss), ``eval_step`` ``[n_evals]`` (the step each
    evaluation ran after, 0 first) and each of ``evaluate``'s keys stacked ``[n_evals, ...]``."""

    params: Any
    history: dict[str, np.ndarray]
    snapshots: dict[int, Any] = dataclasses.field(default_factory=dict)  # step -> params, with snapshot_every


def shuffled_batches(n_examples: int, batch_size: int, seed: int) -> Callable[[jax.Array], jax.Array]:
    """``step -> indices [batch_size]``: epochs of a fresh permutation each (drawn from ``seed`` and
    the epoch number), cut into ``n_examples // batch_size`` batches (the remainder is dropped)."""
    if not 0 < batch_size <= n_examples:
        raise ValueError(f"batch_size must be in [1, n_examples={n_examples}], got {batch_size}")
    per_epoch = n_examples // batch_size
    key = jax.random.key(seed)

    def indices(step):
        epoch, i = jnp.divmod(step, per_epoch)
        order = jax.random.permutation(jax.random.fold_in(key, epoch), n_examples)
        return jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)

    return indices


class ShuffledRows(eqx.Module):
    """``step -> tuple``: the same ``batch_size`` rows (``shuffled_batches``) of each of ``arrays``,
    which share a leading axis of examples. The arrays are fields, so they are passed to the compiled
    loop rather than baked into it."""

    arrays: tuple[jax.Array, ...]
    batch_size: int = eqx.field(static=True)
    seed: int = eqx.field(static=True)

    def __call__(self, step):
        rows = shuffled_batches(self.arrays[0].shape[0], self.batch_size, self.seed)(step)
        return tuple(array[rows] for array in self.arrays)


def _scalar_loss(loss, params, batch):
    value = loss(params, batch)
    return value[0] if isinstance(value, tuple) else value


@jit
def _advance(trainable, opt_state, frozen, loss, batches, optimizer, first, n: int):
    """``n`` optimizer steps from step ``first``; returns the new state and each step's loss."""

    def one(state, step):
        trainable, opt_state = state
        batch = batches(step)
        value, grads = jax.value_and_grad(lambda t: _scalar_loss(loss, eqx.combine(t, frozen), batch))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), value

    steps = first + jnp.arange(n, dtype=jnp.int32)
    (trainable, opt_state), losses = jax.lax.scan(one, (trainable, opt_state), steps)
    return trainable, opt_state, losses


def _leaves(tree) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def _unflatten(like, saved: dict, what: str):
    leaves, treedef = jax.tree.flatten(like)
    if len(saved) != len(leaves):
        raise ValueError(f"The checkpointed {what} has {len(saved)} arrays, this training {len(leaves)}: "
                         "the checkpoint belongs to another model or optimizer")
    return jax.tree.unflatten(treedef, [jnp.asarray(saved[k]) for k in sorted(saved)])


def train(
    params,
    loss: Callable,
    optimizer: optax.GradientTransformation,
    batches: Callable[[jax.Array], Any],
    *,
    steps: int,
    eval_every: int = 100,
    evaluate: Callable[[Any], dict] | None = None,
    trainable=eqx.is_inexact_array,
    run=None,
    name: str = "train",
    checkpoint_every: int | None = None,
    description: str | None = None,
    progress: bool = True,
    snapshot_every: int | None = None,
) -> Trained:
    """Trains ``params`` for ``steps`` optimizer steps; returns a ``Trained``.

    ``evaluate(params) -> {name: array}`` runs before the first step and after every
    ``eval_every`` steps (and the last). ``trainable``: an equinox filter (a function of a leaf,
    or a pytree prefix of bools) choosing what is trained. ``run`` (a ``jinterp.runs.Run``):
    checkpoint every ``checkpoint_every`` steps (a multiple of ``eval_every``; default: at every
    evaluation) under ``name`` and resume from the newest checkpoint. ``snapshot_every`` (a multiple of
    ``eval_every``): keep the params at step 0 and every multiple of it in ``Trained.snapshots`` (saved with
    the run, so a resumed run has them all).
    """
    for argument, value in (("steps", steps), ("eval_every", eval_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{argument} must be a positive int, got {value!r}")
    checkpoint_every = checkpoint_every or eval_every
    if checkpoint_every % eval_every:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be a multiple of eval_every={eval_every}: "
                         "checkpoints are taken between blocks of steps")
    if snapshot_every is not None and (not isinstance(snapshot_every, int) or snapshot_every < 1
                                       or snapshot_every % eval_every):
        raise ValueError(f"snapshot_every={snapshot_every!r} must be a positive multiple of eval_every={eval_every}: "
                         "snapshots are taken between blocks of steps")
    trained, frozen = eqx.partition(params, trainable)
    if not jax.tree.leaves(trained):
        raise ValueError("Nothing to train: the `trainable` filter selects no arrays of params")
    opt_state = optimizer.init(trained)
    history = {"loss": [], "eval_step": []}

    def record_evaluation(step: int):
        history["eval_step"].append(np.int64(step))
        if evaluate is not None:
            for key, value in evaluate(eqx.combine(trained, frozen)).items():
                if key in ("loss", "eval_step"):
                    raise ValueError(f"evaluate() may not return the key {key!r}: the loop records it itself")
                history.setdefault(key, []).append(np.asarray(value))

    start, seconds = 0, 0.0
    store = None if run is None else run.store
    if store is not None:
        found = _newest_checkpoint(store, name)
        if found is not None:
            start, saved, seconds = found
            trained = _unflatten(trained, saved["trainable"], "trainable params")
            opt_state = _unflatten(opt_state, saved["opt_state"], "optimizer state")
            history = {key: list(values) for key, values in saved["history"].items()}
            if start < steps:
                run.log(f"{name}: resumed from the checkpoint at step {start} of {steps}")
    snapshots = {}

    def take_snapshot(step: int):
        if snapshot_every and step % snapshot_every == 0:
            if store is not None:  # saved before the training checkpoint of the same step, so a resume finds it
                store.save(f"{name}.snapshots/{step:09d}", _leaves(trained), 0.0)
            snapshots[step] = trained

    if snapshot_every and start > 0:
        for step in range(0, start + 1, snapshot_every):
            found = store.load(f"{name}.snapshots/{step:09d}")
            if found is None:
                run.log(f"{name}: the parameter snapshot at step {step} is missing; it cannot be recomputed")
            else:
                snapshots[step] = _unflatten(trained, found[0], "parameter snapshot")
    if start == 0:
        record_evaluation(0)
        take_snapshot(0)

    quiet = not progress or (run is not None and run.quiet)
    bar = tqdm(total=steps, initial=start, desc=description or name, unit="step", disable=quiet)
    step = start
    while step < steps:
        n = min(eval_every, steps - step)
        began = time.perf_counter()
        trained, opt_state, losses = _advance(trained, opt_state, frozen, loss, batches, optimizer,
                                              jnp.int32(step), n)
        losses = np.asarray(losses)
        history["loss"].extend(losses)
        step += n
        record_evaluation(step)
        take_snapshot(step)
        seconds += time.perf_counter() - began
        bar.update(n)
        bar.set_postfix(loss=f"{float(losses.mean()):.4g}")
        if store is not None and (step % checkpoint_every == 0 or step == steps):
            _save_checkpoint(store, name, step, trained, opt_state, history, seconds)
    bar.close()
    if not math.isfinite(float(history["loss"][-1])):
        raise FloatingPointError(f"{name}: the training loss is {history['loss'][-1]} after {steps} steps")
    if run is not None:
        run.timings[name] = {"seconds": seconds, "restored": start == steps}
    stacked = {key: np.stack(values) for key, values in history.items()}
    return Trained(eqx.combine(trained, frozen), stacked,
                   {step: eqx.combine(t, frozen) for step, t in sorted(snapshots.items())})


def _step_names(store, name: str) -> list[int]:
    """Steps with a checkpoint or a seal (a checkpoint without its seal is found, and deleted, too)."""
    folder = store.directory / name
    found = {p.name.removesuffix(".json") for p in folder.glob("*")}
    return sorted((int(s) for s in found if s.isdigit()), reverse=True)


def _newest_checkpoint(store, name: str):
    """(step, values, seconds) of the newest readable checkpoint of ``name``, or None."""
    for step in _step_names(store, name):
        found = store.load(f"{name}/{step:09d}")
        if found is not None:
            return step, found[0], found[1]["seconds"]
    return None


def _save_checkpoint(store, name, step, trained, opt_state, history, seconds):
    values = {"trainable": _leaves(trained), "opt_state": _leaves(opt_state),
              "history": {key: np.stack(v) for key, v in history.items()}}
    store.save(f"{name}/{step:09d}", values, seconds)
    for older in _step_names(store, name):  # only the newest is needed to resume
        if older != step:
            store.delete(f"{name}/{older:09d}")
