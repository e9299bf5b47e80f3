"""Linear probes: does a layer's activation linearly encode a label?

    features = probes.collect(model, tokens, "blocks.*.resid_post", positions, attention_mask=mask)
    fitted = probes.train_probe(features["blocks.6.resid_post"], labels, steps=300)
    fitted.held_out_accuracy, fitted.probe.direction()

``collect`` (``jinterp.collect``, imported here) captures sites for many prompts in batches that
fit a memory budget and keeps one (or a few) positions per prompt. ``train_probe`` fits a ``Probe``
(softmax regression, L2-regularised) with optax through the one training loop
(``jinterp.train.train``) on a training split, and scores it on the rest.

Features are standardised with the training split's mean and standard deviation (held inside the
probe, so it takes raw activations): residual streams have a few dimensions hundreds of times
larger than the rest, which would otherwise dominate the optimisation and the weight decay.
"""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from jinterp._compile import jit
from jinterp.collection import collect  # noqa: F401  (probes.collect is jinterp.collect)
from jinterp.train import shuffled_batches, train


class Probe(eqx.Module):
    """A linear classifier of raw features: ``logits = ((x - mean) / scale) @ W + b``.

    ``W`` ``[d, n_classes]`` and ``b`` ``[n_classes]`` are trained; ``mean`` and ``scale``
    ``[d]`` (the training split's statistics) are fixed.
    """

    W: Float[Array, "d n_classes"]
    b: Float[Array, " n_classes"]
    mean: Float[Array, " d"]
    scale: Float[Array, " d"]

    @classmethod
    def init(cls, mean, scale, n_classes: int) -> Probe:
        """A probe at zero (the loss is convex: no random start is needed) over standardised features."""
        mean, scale = jnp.asarray(mean, jnp.float32), jnp.asarray(scale, jnp.float32)
        return cls(jnp.zeros((mean.shape[0], n_classes)), jnp.zeros(n_classes), mean, scale)

    def __call__(self, features: Float[Array, "n d"]) -> Float[Array, "n n_classes"]:
        return ((features - self.mean) / self.scale) @ self.W + self.b

    def predict(self, features: Float[Array, "n d"]) -> Int[Array, " n"]:
        return jnp.argmax(self(features), -1)

    def accuracy(self, features: Float[Array, "n d"], labels: Int[Array, " n"]) -> float:
        return float(_scores(self, jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32))[0])

    def directions(self) -> Float[Array, "d n_classes"]:
        """Each class's direction in raw feature space, centred over classes (softmax ignores a
        shift shared by all classes): the logit of class c moves by ``directions()[:, c] @ dx``."""
        raw = self.W / self.scale[:, None]
        return raw - raw.mean(1, keepdims=True)

    def direction(self) -> Float[Array, " d"]:
        """A binary probe's direction in raw feature space: ``logit(1) - logit(0) = direction @ x + c``."""
        if self.W.shape[1] != 2:
            raise ValueError(f"direction() is for binary probes; this one has {self.W.shape[1]} classes "
                             "(use directions())")
        return (self.W[:, 1] - self.W[:, 0]) / self.scale


@dataclasses.dataclass(frozen=True)
class TrainedProbe:
    """A fitted ``probe``, its accuracy on the training split and on the held-out one, the
    indices of both splits into the features, and ``history`` (``train.Trained.history``:
    ``loss`` per step; ``train_accuracy``, ``held_out_accuracy``, ``held_out_loss`` per evaluation)."""

    probe: Probe
    train_accuracy: float
    held_out_accuracy: float
    train_index: np.ndarray
    held_out_index: np.ndarray
    history: dict[str, np.ndarray]


class CrossEntropy(eqx.Module):
    """Mean softmax cross-entropy plus ``weight_decay * |W|^2`` (in standardised units; b is free)."""

    weight_decay: float = eqx.field(static=True)

    def __call__(self, probe: Probe, batch) -> Float[Array, ""]:
        features, labels = batch
        loss = optax.softmax_cross_entropy_with_integer_labels(probe(features), labels).mean()
        return loss + self.weight_decay * jnp.sum(probe.W**2)


class Examples(eqx.Module):
    """``step -> (features, labels)``: shuffled mini-batches, or everything when the batch is all.
    The arrays are fields, so they are passed to the compiled loop rather than baked into it."""

    features: Float[Array, "n d"]
    labels: Int[Array, " n"]
    batch_size: int = eqx.field(static=True)
    seed: int = eqx.field(static=True)

    def __call__(self, step):
        n = self.labels.shape[0]
        if self.batch_size >= n:
            return self.features, self.labels
        index = shuffled_batches(n, self.batch_size, self.seed)(step)
        return self.features[index], self.labels[index]


@jit
def _scores(probe: Probe, features, labels):
    """(accuracy, mean cross-entropy) of ``probe`` on labelled features."""
    logits = probe(features)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return accuracy, optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=16)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    # One optimizer object per rate: the training step is compiled once for all probes of a shape.
    return optax.adam(learning_rate)


def split(n: int, held_out: float, seed: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of ``n`` examples: a ``held_out`` fraction drawn at random,
    or with ``groups`` ``[n]`` that fraction of the distinct groups (whole groups are held out)."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    rng = np.random.default_rng(seed)
    if groups is None:
        k = min(max(round(held_out * n), 1), n - 1)
        order = rng.permutation(n)
        return np.sort(order[k:]), np.sort(order[:k])
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}; expected one group per example, ({n},)")
    unique = np.unique(groups)
    if len(unique) < 2:
        raise ValueError(f"groups has {len(unique)} distinct value(s); holding out whole groups needs at least 2")
    k = min(max(round(held_out * len(unique)), 1), len(unique) - 1)
    chosen = np.isin(groups, rng.permutation(unique)[:k])
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def train_probe(
    features: Float[np.ndarray, "n d"],
    labels: Int[np.ndarray, " n"],
    *,
    n_classes: int | None = None,
    held_out: float = 0.2,
    groups=None,
    steps: int = 300,
    learning_rate: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_every: int | None = None,
    run=None,
    name: str = "probe",
    progress: bool = True,
) -> TrainedProbe:
    """Fits a linear probe from ``features`` ``[n, d]`` to integer ``labels`` ``[n]`` with Adam.

    Args:
        n_classes: number of classes (default: ``labels.max() + 1``; 2 is a binary probe).
        held_out: fraction of examples held out for scoring (or of ``groups``, if given).
        groups: ``[n]`` group ids (e.g. the word or number each example is about): whole groups are
            held out, so the held-out score measures generalisation to unseen groups.
        steps, learning_rate, batch_size: Adam steps, rate, and examples per step (all: full batch).
        weight_decay: L2 penalty ``weight_decay * |W|^2`` on standardised weights.
        seed: the split and the batch order.
        eval_every: score both splits every this many steps (default: ten times in all).
        run, name: a ``jinterp.runs.Run`` to checkpoint and resume through, under ``name``.
    """
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise TypeError(f"features must be floats, got dtype {features.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids [n], got shape {labels.shape} and dtype {labels.dtype}")
    if len(labels) != len(features):
        raise ValueError(f"features has {len(features)} examples but labels has {len(labels)}")
    if len(labels) < 2:
        raise ValueError(f"a probe needs at least 2 examples (one to train, one held out), got {len(labels)}")
    if (labels < 0).any():
        raise ValueError(f"label {int(labels[labels < 0][0])} is out of range: labels are class ids 0, 1, ...")
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    bad = labels[labels >= n_classes]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is out of range: valid labels are 0..{n_classes - 1} "
                         f"(n_classes={n_classes})")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinity")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    train_index, held_out_index = split(len(labels), held_out, seed, groups)

    train_x, train_y = features[train_index].astype(np.float32), labels[train_index].astype(np.int32)
    test_x, test_y = jnp.asarray(features[held_out_index], jnp.float32), jnp.asarray(labels[held_out_index], jnp.int32)
    scale = train_x.std(0, dtype=np.float64)
    probe = Probe.init(train_x.mean(0, dtype=np.float64), np.where(scale > 0, scale, 1.0), int(n_classes))
    data = Examples(jnp.asarray(train_x), jnp.asarray(train_y), min(batch_size, len(train_y)), seed)

    def evaluate(probe):
        held_out_accuracy, held_out_loss = _scores(probe, test_x, test_y)
        return {"train_accuracy": _scores(probe, data.features, data.labels)[0],
                "held_out_accuracy": held_out_accuracy, "held_out_loss": held_out_loss}

    trainable = eqx.tree_at(lambda p: (p.mean, p.scale), jax.tree.map(lambda _: True, probe), replace=(False, False))
    trained = train(probe, CrossEntropy(float(weight_decay)), _adam(float(learning_rate)), data, steps=steps,
                    eval_every=eval_every or max(1, steps // 10), evaluate=evaluate, trainable=trainable, run=run,
                    name=name, description=name, progress=progress)
    history = trained.history
    return TrainedProbe(trained.params, float(history["train_accuracy"][-1]), float(history["held_out_accuracy"][-1]),
                        train_index, held_out_index, history)
