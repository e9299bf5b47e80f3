"""Crosscoders: one sparse dictionary reading and writing the activations of several models at the
same site (acausal, one layer), for model diffing (Lindsey et al. 2024, "Sparse Crosscoders for
Cross-Layer Features and Model Diffing"; Minder et al. 2025, "Overcoming Sparsity Artifacts in
Crosscoders to Interpret Chat-Tuning").

    source = CrosscoderActivations((base, fine_tuned), tokens, "blocks.3.resid_post", sequences_per_batch=8)
    trained = train_crosscoder(source, "batchtopk", d_sae=4096, k=32)
    cc = trained.crosscoder
    cc.relative_norms()                 # [d_sae]: 0 base-only, 1/2 shared, 1 fine-tune-only
    relative_norm_classes(cc)["fine_tune_only"]
    latent_scaling(cc, activations, latents)   # flags latents that only *look* fine-tune-only

A crosscoder with ``n_models`` models of width ``d`` is an ``SAE`` over their activations side by
side (``d_in = n_models * d``, model-major: model 0's ``d`` values, then model 1's, ...): latent
``i`` reads ``sum_m x_m @ W_enc[m]`` and writes ``W_dec[i, m]`` into model ``m``. So it trains
through ``train_sae`` unchanged but for the L1 penalty, which weights each latent by the *sum* of
its per-model decoder norms (Lindsey et al.): a latent used by one model only then pays for one
norm, and its other decoder blocks shrink to 0. The BatchTopK variant (Minder et al.) keeps each
latent's whole decoder row (all models together) at unit norm, as jinterp's TopK SAEs do, and
leaves the split between models free; selection is on the latent's value, i.e. on its value times
that unit norm.

Inputs are normalised by one scale for all models together (``train_sae``'s ``normalize``), so the
relative decoder norms compare the models in their own units; two models whose activation norms
differ a lot are better normalised beforehand.

Latent scaling (Minder et al. 2025, section 3): for a latent that looks specific to model ``b``
(its decoder block in model ``a`` near 0), fit, per model ``m``, the scalar ``beta_m`` that best
explains a target ``y_m`` by the latent's activation times its decoder direction in ``b``:
``beta_m = argmin sum_x |beta f(x) d_b - y_m(x)|^2``. With ``y_m`` the reconstruction error of
model ``m`` with the latent's own contribution added back, ``nu_error = beta_a / beta_b`` near 1
says that model ``a``'s activations hold the direction after all and the sparsity penalty merely
shrank its decoder (complete shrinkage); with ``y_m`` model ``m``'s reconstruction (what all
latents write, the latent included, the constant ``b_dec`` left out), ``nu_reconstruction`` near
1 says other latents carry the direction in model ``a`` (latent decoupling). In model ``b`` both
fits are about 1 for a latent that carries its direction there. Truly ``b``-specific latents have
both ratios near 0.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from safetensors.numpy import load_file

from jinterp import names as S
from jinterp.sae.autoencoder import SAE
from jinterp.sae.saving import CONFIG, FROM_SAELENS, WEIGHTS, write_saelens
from jinterp.sae.sources import ModelActivations
from jinterp.sae.training import decoder_norms, train_sae
from jinterp.specs import lookup

DEFAULT_MODELS = ("base", "fine_tune")


class Crosscoder(eqx.Module):
    """A crosscoder over ``len(models)`` models' activations of width ``d_model`` at one site.

    ``sae`` works on the models' activations side by side (``[..., n_models * d_model]``); the
    methods here take and give them with a model axis, ``[..., n_models, d_model]``. ``models``
    names the models (default ``("base", "fine_tune")`` for two)."""

    sae: SAE
    models: tuple[str, ...] = eqx.field(static=True)

    def __check_init__(self):
        if len(self.models) < 2 or len(set(self.models)) != len(self.models):
            raise ValueError(f"A crosscoder needs two or more distinct model names, got {self.models!r}")
        if self.sae.is_transcoder or self.sae.d_in % len(self.models):
            raise ValueError(f"A crosscoder's SAE must be an autoencoder whose d_in={self.sae.d_in} is "
                             f"n_models={len(self.models)} times the models' width")

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def d_model(self) -> int:
        """The width of one model's activations."""
        return self.sae.d_in // self.n_models

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    @property
    def site(self) -> str | None:
        return self.sae.site

    @property
    def W_dec(self) -> Float[Array, "d_sae n_models d_model"]:
        """Each latent's decoder direction in each model."""
        return self.sae.W_dec.reshape(self.d_sae, self.n_models, self.d_model)

    @property
    def W_enc(self) -> Float[Array, "n_models d_model d_sae"]:
        return self.sae.W_enc.reshape(self.n_models, self.d_model, self.d_sae)

    @property
    def b_dec(self) -> Float[Array, "n_models d_model"]:
        return self.sae.b_dec.reshape(self.n_models, self.d_model)

    def model_index(self, model: int | str) -> int:
        """A model's position on the model axis, from its index or name."""
        if isinstance(model, str):
            if model not in self.models:
                raise ValueError(f"No model {model!r} in this crosscoder; its models: {', '.join(self.models)}")
            return self.models.index(model)
        if not isinstance(model, int | np.integer) or not 0 <= model < self.n_models:
            raise ValueError(f"model must be a name in {self.models} or an index in [0, {self.n_models - 1}], "
                             f"got {model!r}")
        return int(model)

    def _flat(self, x: Float[Array, "... n_models d_model"]) -> Array:
        if x.shape[-2:] != (self.n_models, self.d_model):
            raise ValueError(f"Crosscoder input has shape {x.shape}; its last two axes must be "
                             f"(n_models={self.n_models}, d_model={self.d_model}): the models {self.models}")
        return x.reshape(*x.shape[:-2], self.sae.d_in)

    def encode(self, x: Float[Array, "... n_models d_model"]) -> Float[Array, "... d_sae"]:
        """The shared latents of the models' activations at one token."""
        return self.sae.encode(self._flat(x))

    def decode(self, latents: Float[Array, "... d_sae"]) -> Float[Array, "... n_models d_model"]:
        """Each model's reconstruction."""
        return self.sae.decode(latents).reshape(*latents.shape[:-1], self.n_models, self.d_model)

    def __call__(self, x: Float[Array, "... n_models d_model"]) -> Float[Array, "... n_models d_model"]:
        return self.decode(self.encode(x))

    def decoder_norms(self) -> Float[Array, "d_sae n_models"]:
        """Each latent's decoder norm in each model."""
        return decoder_norms(self.sae.W_dec, self.n_models)

    def relative_norms(self, a: int | str = 0, b: int | str = 1) -> Float[Array, " d_sae"]:
        """``|d_b| / (|d_a| + |d_b|)`` per latent (Lindsey et al.'s relative decoder norm): 0 for a
        latent only model ``a`` uses, 1/2 for one both use alike, 1 for one only ``b`` uses. A
        latent with no decoder in either model gets 1/2."""
        norms = self.decoder_norms()
        na, nb = norms[:, self.model_index(a)], norms[:, self.model_index(b)]
        total = na + nb
        return jnp.where(total > 0, nb / jnp.where(total > 0, total, 1.0), 0.5)

    def model_sae(self, model: int | str) -> SAE:
        """The dictionary as model ``model`` alone sees it: an SAE reading that model's activations
        and writing its reconstruction, the other models' encoder terms left out (as if their
        activations were their ``b_dec``: no contribution). For splicing into one model or a
        dashboard of it."""
        m, sae = self.model_index(model), self.sae
        return SAE(self.W_enc[m], sae.b_enc, self.W_dec[:, m], self.b_dec[m], sae.threshold,
                   architecture=sae.architecture, k=sae.k, apply_b_dec_to_input=sae.apply_b_dec_to_input,
                   site=sae.site)


def relative_norm_classes(crosscoder: Crosscoder, a: int | str = 0, b: int | str = 1, *, only: float = 0.1,
                          shared: float = 0.1) -> dict[str, np.ndarray]:
    """Latent indices by relative decoder norm (``Crosscoder.relative_norms``), the split of Minder et
    al. 2025: ``"<a>_only"`` below ``only``, ``"<b>_only"`` above ``1 - only``, ``"shared"`` within
    ``shared`` of 1/2, ``"other"`` the rest (keys named after the crosscoder's models, e.g.
    ``base_only``, ``fine_tune_only``)."""
    if not 0 < only < 0.5 or not 0 < shared <= 0.5 - only:
        raise ValueError(f"Need 0 < only < 0.5 and 0 < shared <= 0.5 - only, got only={only}, shared={shared}")
    r = np.asarray(crosscoder.relative_norms(a, b))
    name_a, name_b = (crosscoder.models[crosscoder.model_index(m)] for m in (a, b))
    classes = {f"{name_a}_only": r < only, f"{name_b}_only": r > 1 - only, "shared": np.abs(r - 0.5) <= shared}
    classes["other"] = ~np.any(np.stack(list(classes.values())), axis=0)
    return {name: np.flatnonzero(mask) for name, mask in classes.items()}


def relative_norm_histogram(crosscoder: Crosscoder, a: int | str = 0, b: int | str = 1,
                            bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``(counts [bins], edges [bins + 1])`` of the relative decoder norms over [0, 1]."""
    return np.histogram(np.asarray(crosscoder.relative_norms(a, b)), bins=bins, range=(0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class LatentScaling:
    """Latent scaling's fits for ``latents`` (Minder et al. 2025): ``beta_error [n, n_models]`` (fit to
    each model's reconstruction error with the latent's contribution added back) and
    ``beta_reconstruction [n, n_models]`` (fit to what the latents write into each model),
    both along the latent's decoder direction in model ``direction``; ``nu_error`` and
    ``nu_reconstruction`` their ratios ``beta[:, other] / beta[:, direction]``."""

    latents: np.ndarray
    direction: int
    other: int
    beta_error: np.ndarray
    beta_reconstruction: np.ndarray

    @property
    def nu_error(self) -> np.ndarray:
        return self.beta_error[:, self.other] / self.beta_error[:, self.direction]

    @property
    def nu_reconstruction(self) -> np.ndarray:
        return self.beta_reconstruction[:, self.other] / self.beta_reconstruction[:, self.direction]


def latent_scaling(crosscoder: Crosscoder, activations: Float[Array, "n n_models d_model"], latents,
                   direction: int | str = 1, other: int | str = 0, batch: int = 4096) -> LatentScaling:
    """Latent scaling (see the module's docstring) of ``latents`` (indices) on ``activations``,
    along each latent's decoder direction in model ``direction`` (default the second, e.g. the
    fine-tune), compared with model ``other``. Closed form: ``beta_m = sum_x f(x) (d . y_m(x)) /
    (|d|^2 sum_x f(x)^2)``, accumulated over batches of ``batch`` tokens."""
    latents = np.asarray(latents, np.int64).reshape(-1)
    if latents.size and (latents.min() < 0 or latents.max() >= crosscoder.d_sae):
        raise ValueError(f"latents must be in [0, {crosscoder.d_sae - 1}], got {latents.min()}..{latents.max()}")
    m_dir, m_other = crosscoder.model_index(direction), crosscoder.model_index(other)
    if m_dir == m_other:
        raise ValueError(f"direction and other must be different models, both are {crosscoder.models[m_dir]!r}")
    activations = jnp.asarray(activations)
    if activations.ndim != 3:
        raise ValueError(f"activations must be [n, n_models={crosscoder.n_models}, d_model={crosscoder.d_model}], "
                         f"got {activations.shape}")
    sums = [np.zeros((latents.size, crosscoder.n_models)) for _ in range(2)]
    squares = np.zeros(latents.size)
    for start in range(0, activations.shape[0], batch):
        error, reconstruction, f2 = _scaling_sums(crosscoder, activations[start:start + batch], jnp.asarray(latents),
                                                  m_dir)
        sums[0] += np.asarray(error, np.float64)
        sums[1] += np.asarray(reconstruction, np.float64)
        squares += np.asarray(f2, np.float64)
    norm2 = np.asarray(jnp.sum(crosscoder.W_dec[latents, m_dir] ** 2, axis=-1), np.float64)
    denominator = (norm2 * squares)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        betas = [np.where(denominator > 0, s / np.where(denominator > 0, denominator, 1), np.nan) for s in sums]
    return LatentScaling(latents, m_dir, m_other, *betas)


@eqx.filter_jit
def _scaling_sums(crosscoder: Crosscoder, x, latents, m_dir: int):
    f = crosscoder.encode(x)  # [n, d_sae]
    written = (f @ crosscoder.sae.W_dec).reshape(x.shape)  # what the latents write, b_dec left out
    chosen = f[:, latents]  # [n, L]
    d = crosscoder.W_dec[latents, m_dir]  # [L, d]
    # The latent's own contribution to model m is f * W_dec[j, m]; its projection on d: f * (W_dec[j, m] . d).
    own = chosen[:, :, None] * jnp.einsum("lmd,ld->lm", crosscoder.W_dec[latents], d)[None]  # [n, L, M]
    error = jnp.einsum("nmd,ld->nlm", x - written - crosscoder.b_dec, d) + own  # d . y_m, error target
    reconstruction = jnp.einsum("nmd,ld->nlm", written, d)  # d . y_m, reconstruction target
    return (jnp.einsum("nl,nlm->lm", chosen, error), jnp.einsum("nl,nlm->lm", chosen, reconstruction),
            jnp.sum(chosen ** 2, axis=0))


class CrosscoderActivations(eqx.Module):
    """The activations of several models at one ``site`` on the same token sequences, side by side
    (``[batch, n_models * d_model]``, model-major), computed on the fly inside the compiled
    training step: each step runs every model on the same ``sequences_per_batch`` sequences (a
    ``ModelActivations`` per model, same seed). Arguments as ``ModelActivations``; ``names`` name
    the models (default ``("base", "fine_tune")`` for two, ``model0, model1, ...`` otherwise);
    ``tokenizers`` (optional, one per model) are checked to be the same vocabulary, as the models'
    ``d_vocab`` always are: a crosscoder reads the models on the same tokens. ``memory_budget``
    bounds each model's forward on its own (the models' activations are not summed against it)."""

    sources: tuple[ModelActivations, ...]
    names: tuple[str, ...] = eqx.field(static=True)

    def __init__(self, models, tokens: Int[Array, "n_seq seq"], site: str, sequences_per_batch: int, *,
                 skip: int = 0, seed: int = 0, memory_budget: float | None = None,
                 names: tuple[str, ...] | None = None, tokenizers=None):
        models = tuple(models)
        if names is None:
            names = DEFAULT_MODELS if len(models) == 2 else tuple(f"model{i}" for i in range(len(models)))
        names = tuple(names)
        if len(models) < 2 or len(names) != len(models) or len(set(names)) != len(names):
            raise ValueError(f"A crosscoder reads two or more models with distinct names; got {len(models)} models "
                             f"named {names!r}")
        check_same_inputs(models, site, names, tokenizers)
        tokens = jnp.asarray(tokens)
        self.sources = tuple(ModelActivations(model, tokens, site, sequences_per_batch, skip=skip, seed=seed,
                                              memory_budget=memory_budget) for model in models)
        self.names = names

    @property
    def site(self) -> str:
        return self.sources[0].site

    @property
    def d_in(self) -> int:
        return sum(source.d_in for source in self.sources)

    @property
    def batch_size(self) -> int:
        return self.sources[0].batch_size

    def __call__(self, step) -> Float[Array, "batch d_in"]:
        return jnp.concatenate([source._step(step) for source in self.sources], axis=-1)

    def sample(self, n: int) -> Float[Array, "n d_in"]:
        return jnp.concatenate([source.sample(n) for source in self.sources], axis=-1)

    def all(self) -> Float[Array, "n_tokens n_models d_model"]:
        """Every token's activations in every model, with a model axis (as ``ModelActivations.all``)."""
        return jnp.stack([source.all() for source in self.sources], axis=1)


def check_same_inputs(models, site: str, names, tokenizers=None) -> None:
    """Raise unless every model has ``site`` with the same shape and axes, the same vocabulary size
    and (if given) tokenizers with the same vocabulary: the error names both models that differ."""
    specs = [lookup(model.site_specs(), site) for model in models]
    vocabs = [getattr(getattr(model, "cfg", None), "d_vocab", None) for model in models]
    for i in range(1, len(models)):
        if (specs[i].shape[2:], specs[i].axes[2:]) != (specs[0].shape[2:], specs[0].axes[2:]):
            raise ValueError(f"A crosscoder reads {site} in every model with one shape: {names[0]!r} has "
                             f"{specs[0].shape[2:]} {specs[0].axes[2:]}, {names[i]!r} has {specs[i].shape[2:]} "
                             f"{specs[i].axes[2:]}. Use models of one architecture (a base and its fine-tune)")
        if vocabs[i] != vocabs[0]:
            raise ValueError(f"A crosscoder runs every model on the same tokens, but {names[0]!r} has a vocabulary "
                             f"of {vocabs[0]} and {names[i]!r} of {vocabs[i]}: their tokenizers differ")
    if tokenizers is not None:
        tokenizers = list(tokenizers)
        if len(tokenizers) != len(models):
            raise ValueError(f"tokenizers: one per model ({len(models)}), got {len(tokenizers)}")
        vocab = [t.backend.get_vocab(with_added_tokens=True) for t in tokenizers]
        for i in range(1, len(models)):
            if vocab[i] != vocab[0]:
                differing = sorted(set(vocab[0].items()) ^ set(vocab[i].items()), key=str)[:3]
                raise ValueError(f"A crosscoder runs every model on the same tokens, but the tokenizers of "
                                 f"{names[0]!r} ({tokenizers[0].vocab_size} tokens) and {names[i]!r} "
                                 f"({tokenizers[i].vocab_size} tokens) differ, e.g. in {differing}")


@dataclasses.dataclass(frozen=True)
class TrainedCrosscoder:
    """``crosscoder`` (reading raw activations), and as ``TrainedSAE``: ``history``, ``input_scale``,
    ``since_fired [d_sae]``."""

    crosscoder: Crosscoder
    history: dict[str, np.ndarray]
    input_scale: float
    since_fired: np.ndarray


def train_crosscoder(activations, architecture: str = "batchtopk", d_sae: int = 4096, *,
                     models: tuple[str, ...] | None = None, **kwargs) -> TrainedCrosscoder:
    """Train a crosscoder through ``train_sae``.

    Args:
        activations: a ``CrosscoderActivations`` (streamed from the models), or an array
            ``[n, n_models, d_model]`` of the models' activations on the same tokens.
        architecture: "batchtopk" (Minder et al. 2025; needs ``k``), "relu" (Lindsey et al. 2024's
            L1 penalty weighted by the sum of per-model decoder norms; ``l1_coefficient``), or
            "topk" / "jumprelu" as for SAEs.
        d_sae: the number of shared latents.
        models: the models' names (default: the source's, else ``("base", "fine_tune")`` for two).
        kwargs: as ``train_sae`` (``k``, ``steps``, ``lr``, ``run``, ``name`` (default
            "crosscoder"), ``shuffle_buffer``, ...).
    """
    if "target_site" in kwargs or "n_models" in kwargs:
        raise ValueError("A crosscoder reads and writes one site in every model: no target_site; its n_models "
                         "comes from the activations")
    if isinstance(activations, CrosscoderActivations):
        n_models = len(activations.sources)
        models = activations.names if models is None else tuple(models)
        source = activations
    else:
        array = jnp.asarray(activations)
        if array.ndim != 3 or array.shape[1] < 2:
            raise ValueError(f"activations must be a CrosscoderActivations or an array [n, n_models >= 2, d_model], "
                             f"got shape {array.shape}")
        n_models = array.shape[1]
        source = array.reshape(array.shape[0], -1)
    if models is None:
        models = DEFAULT_MODELS if n_models == 2 else tuple(f"model{i}" for i in range(n_models))
    if len(models) != n_models:
        raise ValueError(f"models names {len(models)} models, the activations have {n_models}")
    kwargs.setdefault("name", "crosscoder")
    trained = train_sae(source, architecture, d_sae, n_models=n_models, **kwargs)
    return TrainedCrosscoder(Crosscoder(trained.sae, tuple(models)), trained.history, trained.input_scale,
                             trained.since_fired)


# Files --------------------------------------------------------------------------------------

def save_crosscoder(crosscoder: Crosscoder, directory, *, model_names: tuple[str | None, ...] | None = None) -> Path:
    """Write a crosscoder in SAELens' layout with a model axis: ``cfg.json`` and
    ``sae_weights.safetensors`` holding ``W_enc [n_models, d_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, n_models, d_in]``, ``b_dec [n_models, d_in]`` (and ``threshold [d_sae]`` for
    the thresholded architectures), ``d_in`` being one model's width. ``cfg.json`` is SAELens'
    (architecture named as for an SAE, ``d_in`` per model) plus ``n_models`` and a ``crosscoder``
    object: ``models`` (the names on the model axis, in order), ``model_names`` (e.g. the models'
    sources, optional) and ``layout`` (the axes of each array). SAELens itself has no crosscoder
    class; this is the layout of the public crosscoder replications (model axis before
    ``d_in``). Returns the directory."""
    if model_names is not None and len(model_names) != crosscoder.n_models:
        raise ValueError(f"model_names: one per model ({crosscoder.models}), got {model_names!r}")
    sae = crosscoder.sae
    weights = {"W_enc": crosscoder.W_enc, "b_enc": sae.b_enc, "W_dec": crosscoder.W_dec, "b_dec": crosscoder.b_dec}
    layout = {"W_enc": ["n_models", "d_in", "d_sae"], "b_enc": ["d_sae"], "W_dec": ["d_sae", "n_models", "d_in"],
              "b_dec": ["n_models", "d_in"], "threshold": ["d_sae"]}
    names = None if model_names is None else list(model_names)
    return write_saelens(sae, directory, weights, d_in=crosscoder.d_model, n_models=crosscoder.n_models,
                         reshape_activations="none",
                         crosscoder={"models": list(crosscoder.models), "model_names": names, "layout": layout})


def load_crosscoder(directory, *, site: str | None = None) -> Crosscoder:
    """Read a directory written by ``save_crosscoder``."""
    directory = Path(directory)
    missing = [name for name in (CONFIG, WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a crosscoder directory: {', '.join(missing)} missing")
    config = json.loads((directory / CONFIG).read_text())
    if "crosscoder" not in config or "n_models" not in config:
        raise ValueError(f"{directory / CONFIG} has no crosscoder/n_models entry: it is a plain SAE "
                         f"(read it with load_saelens)")
    architecture = config.get("architecture", "standard")
    if architecture not in FROM_SAELENS:
        raise ValueError(f"Crosscoder architecture {architecture!r} in {directory / CONFIG} is not supported; "
                         f"valid: {', '.join(FROM_SAELENS)}")
    n, d, d_sae = int(config["n_models"]), int(config["d_in"]), int(config["d_sae"])
    w = {name: jnp.asarray(value) for name, value in load_file(str(directory / WEIGHTS)).items()}
    expected = {"W_enc": (n, d, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, n, d), "b_dec": (n, d)}
    for name, shape in expected.items():
        if name not in w or w[name].shape != shape:
            raise ValueError(f"{directory / WEIGHTS}: {name} must have shape {shape} (n_models={n}, d_in={d}, "
                             f"d_sae={d_sae}), got {None if name not in w else w[name].shape}")
    hook_name = (config.get("metadata") or {}).get("hook_name")
    if site is None and hook_name is not None:
        site = S.parse(hook_name).name
    k = config.get("k") if architecture == "topk" else None
    sae = SAE(w["W_enc"].reshape(n * d, d_sae), w["b_enc"], w["W_dec"].reshape(d_sae, n * d),
              w["b_dec"].reshape(n * d), w.get("threshold"), architecture=FROM_SAELENS[architecture],
              k=None if k is None else int(k), apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)),
              site=site)
    return Crosscoder(sae, tuple(config["crosscoder"]["models"]))
