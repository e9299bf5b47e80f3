"""Distributed alignment search (Geiger et al. 2023): learn the subspace of a site in which a
model holds a causal variable.

A high-level causal model says what the output should be when a variable's value is taken
from a *source* input and put into a *base* input (the counterfactual label). DAS looks for a
k-dimensional subspace of one site (``blocks.1.resid_post`` at some positions) such that
swapping the source run's coordinates in that subspace into the base run (a
``jinterp.Interchange``) makes the model give that label. The subspace is learned by gradient
descent on the cross-entropy of the counterfactual label; the share of held-out (base, source)
pairs on which the intervened model outputs it is the interchange-intervention accuracy (IIA).

    alignment = das.fit(model, "blocks.0.resid_post", k=2, positions=[1],
                        base=base, source=source, labels=labels, steps=500).params
    das.accuracy(alignment, model, test_base, test_source, test_labels)   # IIA
    das.save(alignment, "runs/das"); alignment = das.load("runs/das", model)

Both forward passes (source, then base under the interchange) run inside the one loss, so a
training step is one compiled program; the frozen model is a field of the loss module, passed
to it rather than compiled in.
"""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from safetensors.numpy import load_file, save_file

from jinterp import names as S
from jinterp._compile import jit
from jinterp.core import run as run_model
from jinterp.interventions import Interchange
from jinterp.models.transformer import Transformer
from jinterp.specs import canonical, lookup
from jinterp.train import ShuffledRows, Trained, train
from jinterp.tuned_lens import model_fingerprint

WEIGHTS, CONFIG, FORMAT = "rotation.safetensors", "das.json", "jinterp.das/1"


class Alignment(eqx.Module):
    """A learned distributed interchange at one site: the span of ``rotation``'s ``k`` columns at
    ``positions`` of ``site`` (a full name with its layer, e.g. ``blocks.1.resid_post``).

    ``rotation`` is a free ``[d, k]`` matrix; ``Interchange`` orthonormalises it by QR. That is the
    parametrisation of the orthogonal map: every free matrix of full rank gives a valid subspace,
    so optax needs no constraint or retraction, and only the ``d x k`` columns that matter are
    learned (a Cayley or matrix-exponential map parametrises all ``d x d`` of the rotation, most of
    it irrelevant to a k-dimensional interchange, and costs a ``d x d`` solve or expm per step).
    """

    rotation: Float[Array, "d k"]
    site: str = eqx.field(static=True)
    positions: tuple[int, ...] = eqx.field(static=True)
    variable: str = eqx.field(static=True)
    model: str = eqx.field(static=True)
    fingerprint: str = eqx.field(static=True)

    @classmethod
    def init(cls, model: Transformer, site, k: int, positions, key: jax.Array, *, variable: str = "",
             name: str | None = None) -> Alignment:
        """A random k-dimensional subspace (normal columns) at ``site`` and ``positions`` of ``model``;
        ``variable`` names the causal variable it aligns, ``name`` the model (default: its architecture)."""
        site, d = _site(model, site)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d:
            raise ValueError(f"k={k!r} is out of range: the subspace dimension must be an int in 1..{d} "
                             f"(the size of {site}'s last axis)")
        positions = _positions(positions, model.cfg.n_ctx)
        rotation = jax.random.normal(key, (d, int(k)), jnp.float32)
        return cls(rotation, site, positions, variable, name or model.cfg.architecture, model_fingerprint(model))

    @property
    def k(self) -> int:
        return self.rotation.shape[1]

    @property
    def layer(self) -> int | None:
        return S.parse(self.site).layer

    def basis(self) -> Float[Array, "d k"]:
        """The orthonormal basis of the subspace (QR of ``rotation``, as ``Interchange`` computes it)."""
        return jnp.linalg.qr(self.rotation)[0]

    def interchange(self, source: Float[Array, "batch pos d"]) -> Interchange:
        """The edit: this subspace of the site's value at ``positions`` taken from ``source`` (that site's
        value in the source run, ``[batch, pos, d]``)."""
        return Interchange(self.site, source, self.rotation, positions=self.positions)

    def logits(self, model: Transformer, base: Int[Array, "batch pos"], source: Int[Array, "batch pos"],
               logit_positions: int = -1) -> Float[Array, "batch d_vocab"]:
        """The model's logits at ``logit_positions`` (one position) on ``base`` with this subspace swapped
        in from ``source``."""
        _, cache = run_model(model, source, capture=[self.site])
        value = jax.lax.stop_gradient(cache[self.site])  # the source run is data, not a path to train
        logits, _ = run_model(model, base, edits=self.interchange(value), logit_positions=jnp.array([logit_positions]))
        return logits[:, 0]


def _site(model: Transformer, site) -> tuple[str, int]:
    """A site name -> (its full name, the size of the axis the interchange rotates)."""
    parsed = S.site_key(canonical(site))
    if parsed.layer == "*":
        raise ValueError(f"Site {site!r} names every layer; DAS aligns one site: name a layer, "
                         f"e.g. {S.site_name(parsed.kind, 0)}")
    specs = model.site_specs()
    spec = lookup(specs, site)
    if spec.axes[:2] != ("batch", "pos") or len(spec.axes) != 3:
        valid = dict.fromkeys(s.kind for s in specs.values()
                              if s.axes[:2] == ("batch", "pos") and len(s.axes) == 3 and s.axes[2] != "1")
        raise ValueError(f"Site {site!r} has axes {spec.axes}; DAS rotates one vector per position, at a site with "
                         f"axes (batch, pos, features): one of {', '.join(valid)}")
    return spec.name, spec.shape[-1]


def _positions(positions, n_ctx: int) -> tuple[int, ...]:
    values = np.atleast_1d(np.asarray(positions))
    if values.size == 0 or not np.issubdtype(values.dtype, np.integer) or values.ndim != 1:
        raise ValueError(f"positions must be a non-empty list of ints, got {positions!r}")
    bad = values[(values < -n_ctx) | (values >= n_ctx)]
    if bad.size:
        raise ValueError(f"position {int(bad[0])} is out of range for a context of n_ctx={n_ctx} "
                         f"(valid {-n_ctx}..{n_ctx - 1})")
    return tuple(int(p) for p in values)


# Training -----------------------------------------------------------------------------------------

class CounterfactualLoss(eqx.Module):
    """``loss(alignment, (base, source, labels))`` for ``train``: the cross-entropy of the counterfactual
    labels under the interchange. The frozen model is a field, so it is passed, not compiled in."""

    model: Transformer
    logit_positions: int = eqx.field(static=True)

    def __call__(self, alignment: Alignment, batch) -> Array:
        base, source, labels = batch
        logits = alignment.logits(self.model, base, source, self.logit_positions).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _pairs(model: Transformer, base, source, labels) -> tuple[Array, Array, Array]:
    base, source = jnp.asarray(base, jnp.int32), jnp.asarray(source, jnp.int32)
    labels = jnp.asarray(labels, jnp.int32)
    if base.ndim != 2 or base.shape != source.shape:
        raise ValueError(f"base and source must be token arrays of one shape [n, pos]; got {base.shape} "
                         f"and {source.shape}")
    if labels.shape != base.shape[:1]:
        raise ValueError(f"labels must be one token id per pair, shape ({base.shape[0]},); got {labels.shape}")
    vocab = model.cfg.d_vocab
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(f"labels must be token ids in 0..{vocab - 1}, got {int(labels.min())}..{int(labels.max())}")
    return base, source, labels


def fit(model: Transformer, site, k: int, positions, base, source, labels, *, steps: int, batch_size: int = 64,
        optimizer: optax.GradientTransformation | None = None, seed: int = 0, logit_positions: int = -1,
        alignment: Alignment | None = None, variable: str = "", evaluate=None, eval_every: int = 100, run=None,
        name: str = "das", progress: bool = True) -> Trained:
    """Learns a ``k``-dimensional alignment at ``site`` and ``positions`` with ``jinterp.train.train``;
    returns its ``Trained`` (``.params`` is the ``Alignment``).

    ``base``, ``source``: token pairs ``[n, pos]``; ``labels`` ``[n]``: the token the high-level model
    predicts at ``logit_positions`` (one position) of ``base`` when the variable takes its value from ``source``.
    ``optimizer`` defaults to Adam(1e-2); ``alignment`` (one to continue from, whose site, k and
    positions then apply) to a random subspace drawn from ``seed``; ``evaluate``, ``eval_every``,
    ``run`` and ``name`` are ``train``'s (with a run: checkpoints, and resuming from them). Each call
    compiles its training step anew (the site is static and the optimizer a new closure): seconds on
    a CPU for a small model, often more than the steps themselves.
    """
    base, source, labels = _pairs(model, base, source, labels)
    if alignment is None:
        alignment = Alignment.init(model, site, k, positions, jax.random.key(seed), variable=variable)
    return train(alignment, CounterfactualLoss(model, logit_positions), optimizer or optax.adam(1e-2),
                 ShuffledRows((base, source, labels), batch_size, seed), steps=steps, eval_every=eval_every,
                 evaluate=evaluate, run=run, name=name, description=f"DAS {alignment.site}", progress=progress)


@jit
def _correct(alignment: Alignment, model: Transformer, base, source, labels, logit_positions: int):
    return (alignment.logits(model, base, source, logit_positions).argmax(-1) == labels).sum()


def accuracy(alignment: Alignment, model: Transformer, base, source, labels, *, logit_positions: int = -1,
             batch_size: int = 256) -> float:
    """Interchange-intervention accuracy: the share of pairs whose intervened output (the argmax at
    ``logit_positions``, one position) is the counterfactual label."""
    base, source, labels = _pairs(model, base, source, labels)
    correct = 0
    for start in range(0, len(base), batch_size):
        rows = slice(start, start + batch_size)
        correct += int(_correct(alignment, model, base[rows], source[rows], labels[rows], logit_positions))
    return correct / max(len(base), 1)


# Files ---------------------------------------------------------------------------------------------

def save(alignment: Alignment, directory) -> Path:
    """Writes ``rotation.safetensors`` (the ``[d, k]`` matrix) and ``das.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"rotation": np.asarray(alignment.rotation)}, directory / WEIGHTS)
    d, k = alignment.rotation.shape
    config = {"format": FORMAT, "site": alignment.site, "layer": alignment.layer,
              "positions": list(alignment.positions), "k": k, "d": d, "variable": alignment.variable,
              "model": alignment.model, "model_fingerprint": alignment.fingerprint,
              "interchange": "x + Q Q^T (s - x), Q = qr(rotation).Q"}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def load(directory, model: Transformer, check_model: bool = True) -> Alignment:
    """The alignment saved in ``directory``, for ``model``. Refuses one for a site this model lacks or
    of another size and, unless ``check_model=False``, one learned on other weights."""
    directory = Path(directory)
    for needed in (CONFIG, WEIGHTS):
        if not (directory / needed).exists():
            raise FileNotFoundError(f"{directory} holds no DAS alignment: {needed} is missing")
    config = json.loads((directory / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
    site, d = _site(model, config["site"])
    if check_model and config["model_fingerprint"] != model_fingerprint(model):
        raise ValueError(f"The alignment in {directory} was learned on other weights ({config['model']!r}, "
                         "fingerprint mismatch: another model, or this one in another dtype or processed "
                         "differently); pass check_model=False to use it anyway")
    rotation = load_file(directory / WEIGHTS).get("rotation")
    shape = (d, config["k"])
    if rotation is None or rotation.shape != shape or rotation.dtype != np.float32:
        found = None if rotation is None else f"{rotation.dtype}{list(rotation.shape)}"
        raise ValueError(f"{directory / WEIGHTS}: 'rotation' must be float32{list(shape)} for {site}, found {found}")
    positions = _positions(config["positions"], model.cfg.n_ctx)
    return Alignment(jnp.asarray(rotation), site, positions, config["variable"], config["model"],
                     config["model_fingerprint"])
