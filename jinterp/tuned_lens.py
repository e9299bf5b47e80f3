"""The tuned lens (Belrose et al. 2023): the logit lens with a learned affine translator per layer.

The residual stream entering layer ``l`` (``blocks.{l}.resid_pre``; layer 0 reads the embeddings)
is translated to ``h + h @ A[l] + b[l]`` and then read out by the model's own final norm and
unembedding. ``A`` is stored ``[d_in, d_out]`` like every jinterp weight (the paper's ``A h``
with ``A`` transposed). Translators start at zero, so an untrained lens *is* the logit lens, and
``TunedLens.logits`` returns the same ``[n_layers + 1, ...]`` stack as ``jinterp.lens.logit_lens``:
row ``l < n_layers`` reads ``resid_pre`` of layer ``l``, the last row is the model's output.

Training (``fit``, through ``jinterp.train.train``) distils the model into each layer's lens:
the loss is KL(final distribution || lens distribution at layer l), summed over layers and
averaged over the real (unpadded) positions. The frozen model is a field of the loss module, so
its weights are arguments of the compiled step, not constants.

    lens = tuned_lens.fit(model, windows, mask, steps=200).params
    tuned_lens.save(lens, "runs/lens"); lens = tuned_lens.load("runs/lens", model)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int
from safetensors.numpy import load_file, save_file

from jinterp._compile import jit
from jinterp.cache import Cache
from jinterp.core import run as run_model
from jinterp.lens import accumulated_resid, readout
from jinterp.models.config import Config
from jinterp.models.transformer import Transformer
from jinterp.train import ShuffledRows, Trained, train

WEIGHTS, CONFIG, FORMAT = "translators.safetensors", "tuned_lens.json", "jinterp.tuned_lens/1"


class TunedLens(eqx.Module):
    """One affine translator per layer; ``model`` names the model it was made for and
    ``fingerprint`` identifies that model's weights (checked by ``load``)."""

    A: Float[Array, "n_layers d_model d_model"]
    b: Float[Array, "n_layers d_model"]
    model: str = eqx.field(static=True)
    fingerprint: str = eqx.field(static=True)

    @classmethod
    def init(cls, model: Transformer, name: str | None = None) -> TunedLens:
        """The identity translators (the logit lens) for ``model``; ``name`` defaults to its architecture."""
        cfg = model.cfg
        if not cfg.unembed:
            raise ValueError(f"The tuned lens reads residuals out through the unembedding; this {cfg.architecture} "
                             "model has none (unembed=False)")
        return cls(jnp.zeros((cfg.n_layers, cfg.d_model, cfg.d_model), jnp.float32),
                   jnp.zeros((cfg.n_layers, cfg.d_model), jnp.float32),
                   name or cfg.architecture, model_fingerprint(model))

    @property
    def n_layers(self) -> int:
        return self.A.shape[0]

    def translate(self, states: Float[Array, "n_layers *rest d_model"]) -> Float[Array, "n_layers *rest d_model"]:
        """Each layer's residual stream (``states[l]``: ``resid_pre`` of layer ``l``) translated."""
        if states.shape[0] != self.n_layers:
            raise ValueError(f"translate takes one residual stream per layer, [n_layers={self.n_layers}, ..., "
                             f"d_model]; got shape {states.shape}")
        h = states.astype(jnp.float32)
        bias = self.b.reshape(self.n_layers, *(1,) * (h.ndim - 2), -1)
        return h + jnp.einsum("l...d,lde->l...e", h, self.A) + bias

    def logits(self, model: Transformer, cache: Cache, position: int | None = -1):
        """The tuned lens of a cached run, comparable row by row with ``jinterp.lens.logit_lens``:
        logits ``[n_layers + 1, batch, d_vocab]`` at ``position`` (``None``: every position,
        ``[n_layers + 1, batch, pos, d_vocab]``); the last row is the model's output. The cache
        needs ``blocks.*.resid_pre`` and the last layer's ``resid_post``."""
        states, _ = accumulated_resid(model, cache)
        if position is not None:
            states = states[:, :, position]
        translated = self.translate(states[:-1]).astype(states.dtype)
        return readout(model, jnp.concatenate([translated, states[-1:]]))


def model_fingerprint(model) -> str:
    """A sha256 of the model's config (sizes and options; a model without a jinterp ``Config``: its class
    name) and every weight's dtype, shape and bytes."""
    if isinstance(getattr(model, "cfg", None), Config):
        cfg = {k: v for k, v in model.cfg.to_dict().items() if k != "architecture"}  # a label, not the model
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    else:
        h = hashlib.sha256(type(model).__qualname__.encode())
    for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
        leaf = np.asarray(leaf)
        h.update(f"{leaf.dtype}{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


# KL to the model's output -------------------------------------------------------------------------

def kl_sums(lens: TunedLens, model: Transformer, tokens: Int[Array, "batch pos"],
            attention_mask: Bool[Array, "batch pos"] | None = None) -> tuple[Array, Array]:
    """KL(final || lens at layer l) summed over the real positions, ``[n_layers]``, and their count.

    The model runs once (no gradient flows into it), then every layer is read out at once, one
    matmul: faster on CPU than a loop over layers, at the price of ``[n_layers, batch, pos, d_vocab]``
    floats (SmolLM2-135M, 64 tokens: 0.4 GB per copy); keep batches small.
    """
    logits, cache = run_model(model, tokens, capture=["blocks.*.resid_pre"], attention_mask=attention_mask)
    states = jax.lax.stop_gradient(cache.stack("resid_pre"))  # [n_layers, batch, pos, d_model]
    log_p = jax.lax.stop_gradient(jax.nn.log_softmax(logits.astype(jnp.float32), -1))
    p = jnp.exp(log_p)
    z = readout(model, lens.translate(states).astype(states.dtype)).astype(jnp.float32)
    kl = (p * log_p).sum(-1) + jax.nn.logsumexp(z, -1) - (p * z).sum(-1)  # sum p log p - sum p log q
    weight = jnp.ones(tokens.shape, jnp.float32) if attention_mask is None else jnp.asarray(attention_mask, jnp.float32)
    return (kl * weight).sum((1, 2)), weight.sum()


def layer_kl(lens: TunedLens, model: Transformer, tokens, attention_mask=None) -> Array:
    """Mean KL(final || lens at layer l) over the real positions of ``tokens`` ``[batch, pos]``: ``[n_layers]``."""
    sums, count = kl_sums(lens, model, tokens, attention_mask)
    return sums / jnp.maximum(count, 1.0)


_kl_sums_jit = jit(kl_sums)


def mean_layer_kl(lens: TunedLens, model: Transformer, tokens, attention_mask=None, batch_size: int = 8) -> np.ndarray:
    """``layer_kl`` over a whole set of sequences ``[n, pos]``, ``batch_size`` at a time (bounded
    memory; the last batch is padded with masked rows, so one compiled shape serves them all)."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    padding = -len(tokens) % batch_size
    tokens, mask = (np.pad(rows, ((0, padding), (0, 0))) for rows in (tokens, mask))  # zeros: masked out
    sums, count = np.zeros(lens.n_layers), 0.0
    for start in range(0, len(tokens), batch_size):
        s, c = _kl_sums_jit(lens, model, tokens[start:start + batch_size], mask[start:start + batch_size])
        sums, count = sums + np.asarray(s, np.float64), count + float(c)
    if count == 0:
        raise ValueError("mean_layer_kl: attention_mask selects no position")
    return sums / count


# Training -----------------------------------------------------------------------------------------

class Distillation(eqx.Module):
    """``loss(lens, (tokens, mask))`` for ``train``: KL to the model's output, summed over layers and
    averaged over real positions. The frozen model is a field, so it is passed, not compiled in."""

    model: Transformer

    def __call__(self, lens: TunedLens, batch) -> Array:
        tokens, mask = batch
        return layer_kl(lens, self.model, tokens, mask).sum()


def fit(model: Transformer, tokens, attention_mask=None, *, steps: int, batch_size: int = 4,
        optimizer: optax.GradientTransformation | None = None, seed: int = 0, lens: TunedLens | None = None,
        evaluate=None, eval_every: int = 50, run=None, name: str = "tuned_lens", progress: bool = True) -> Trained:
    """Trains a tuned lens for ``model`` on sequences ``tokens`` ``[n, pos]`` (``attention_mask``:
    True at real tokens) with ``jinterp.train.train``; returns its ``Trained`` (``.params`` is the lens).

    ``optimizer`` defaults to Adam(1e-3); ``lens`` to ``TunedLens.init(model)``; ``evaluate``,
    ``eval_every``, ``run`` and ``name`` are ``train``'s (checkpoints and resuming with a run).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_sequences, pos], got shape {tokens.shape}")
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, tokens {tokens.shape}")
    lens = TunedLens.init(model) if lens is None else lens
    batches = ShuffledRows((tokens, mask), batch_size, seed)
    return train(lens, Distillation(model), optimizer or optax.adam(1e-3), batches, steps=steps, eval_every=eval_every,
                 evaluate=evaluate, run=run, name=name, description="tuned lens", progress=progress)


# Files ---------------------------------------------------------------------------------------------

def save(lens: TunedLens, directory) -> Path:
    """Writes ``translators.safetensors`` (``A``, ``b``) and ``tuned_lens.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"A": np.asarray(lens.A), "b": np.asarray(lens.b)}, directory / WEIGHTS)
    n_layers, d_model = lens.b.shape
    config = {"format": FORMAT, "model": lens.model, "model_fingerprint": lens.fingerprint, "n_layers": n_layers,
              "d_model": d_model, "reads": "blocks.{l}.resid_pre", "translation": "h + h @ A[l] + b[l]"}
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory


def load(directory, model: Transformer, check_model: bool = True) -> TunedLens:
    """The lens saved in ``directory`` for ``model``. Refuses a lens of another size and, unless
    ``check_model=False``, one trained for other weights (another model, or this one in another dtype)."""
    directory = Path(directory)
    for needed in (CONFIG, WEIGHTS):
        if not (directory / needed).exists():
            raise FileNotFoundError(f"{directory} holds no tuned lens: {needed} is missing")
    config = json.loads((directory / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG}: format {config.get('format')!r}, expected {FORMAT!r}")
    cfg = model.cfg
    if (config["n_layers"], config["d_model"]) != (cfg.n_layers, cfg.d_model):
        raise ValueError(f"The tuned lens in {directory} was trained for {config['model']!r} with n_layers="
                         f"{config['n_layers']}, d_model={config['d_model']}; this model has n_layers={cfg.n_layers}, "
                         f"d_model={cfg.d_model}")
    if check_model and config["model_fingerprint"] != model_fingerprint(model):
        raise ValueError(f"The tuned lens in {directory} was trained for other weights ({config['model']!r}, "
                         "fingerprint mismatch: another model, or this one in another dtype or processed "
                         "differently); pass check_model=False to use it anyway")
    arrays = load_file(directory / WEIGHTS)
    shapes = {"A": (cfg.n_layers, cfg.d_model, cfg.d_model), "b": (cfg.n_layers, cfg.d_model)}
    for key, shape in shapes.items():
        if key not in arrays or arrays[key].shape != shape or arrays[key].dtype != np.float32:
            found = None if key not in arrays else f"{arrays[key].dtype}{list(arrays[key].shape)}"
            raise ValueError(f"{directory / WEIGHTS}: {key!r} must be float32{list(shape)}, found {found}")
    return TunedLens(jnp.asarray(arrays["A"]), jnp.asarray(arrays["b"]), config["model"], config["model_fingerprint"])
