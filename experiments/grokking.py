"""Grokking modular addition (Nanda et al. 2023, "Progress measures for grokking via mechanistic
interpretability"): a 1-layer transformer trained on 30% of all a + b mod p generalises long after
it memorises, through a Fourier-multiplication circuit whose growth the progress measures track.

Inputs are the three tokens ``[a, b, =]`` (``=`` is token ``p``, so ``d_vocab = p + 1``); the answer
``(a + b) mod p`` is read at the last position over the ``p`` residues. Model and optimiser follow
the paper: d_model 128, 4 heads of 32, d_mlp 512, ReLU, learned positions, no LayerNorm, MLP
biases, normal(0, 1/sqrt(d_model)) weights (the unembedding 1/sqrt(d_vocab)); full-batch AdamW
(lr 1e-3 warmed up linearly over 10 steps, weight decay 1.0, betas (0.9, 0.98)) on a random 30% of
the p^2 pairs, drawn from the seed; the other 70% are the test set.

Key frequencies are the few frequencies the final embedding ``W_E[:p]`` concentrates on: sorted by
their norm in the Fourier basis, the top ``k`` that end at the largest ratio between consecutive
norms (``k <= max_key_frequencies``), unless ``key_frequencies`` fixes them. For a frequency w the
logits' directions ``cos(w(a + b))`` and ``sin(w(a + b))`` are unit vectors over the (a, b) grid, one
pair of coefficients per output c. Progress measures (Section 5.1 of the paper):

* restricted loss: the logits keep only their mean over (a, b) and their components along the key
  frequencies' directions; loss over all p^2 pairs. It falls once the circuit alone can do the task.
* excluded loss: the key frequencies' components are removed from the logits; loss over the training
  pairs. It rises as memorisation is replaced by the circuit.

Both need the key frequencies of the final model, so the training loop's ``evaluate`` hook stores a
snapshot of the parameters at every evaluation (next to train/test loss and accuracy), and a
second step computes the measures on the snapshots once the key frequencies are known.

Training loss is cross-entropy computed as ``log1p`` of the other classes' mass relative to the top
logit (``precise_loss``): exact in float32, where ``log_softmax`` rounds any loss below about 6e-8
to 0 and the correct class's gradient with it (the paper computed the loss in float64 for this).
With ``precise_loss=false`` the default run trains, but late in training its loss spikes again and
again (slingshots up to ~0.3 nats) and test loss stays near 1e-3; with it, losses fall smoothly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int

import jinterp
from jinterp import fourier, llc, plots
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option
from jinterp.train import train


@dataclass(frozen=True)
class Config:
    p: int = option(113, "the modulus (odd, e.g. a prime): inputs a, b in 0..p-1, tokens [a, b, =]")
    train_fraction: float = option(0.3, "fraction of the p^2 pairs trained on (full batch); the rest is the test set")
    seed: int = option(0, "seed of the initial weights and the train/test split")
    d_model: int = option(128, "residual stream width")
    n_heads: int = option(4, "attention heads (d_head = d_model // n_heads)")
    d_mlp: int = option(512, "MLP neurons")
    epochs: int = option(15_000, "full-batch optimizer steps")
    learning_rate: float = option(1e-3, "AdamW learning rate after warmup")
    warmup: int = option(10, "steps of linear learning-rate warmup from 0")
    weight_decay: float = option(1.0, "AdamW (decoupled) weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.98, "AdamW beta2")
    precise_loss: bool = option(True, "cross-entropy via log1p (exact in float32); false: optax's log_softmax")
    eval_every: int = option(200, "epochs between evaluations and parameter snapshots")
    checkpoint_every: int = option(2000, "epochs between training checkpoints (a multiple of eval_every)")
    key_frequencies: tuple[int, ...] | None = option(None, "fix the key frequencies (default: from the final W_E)")
    llc_every: int = option(1000, "epochs between the parameter snapshots whose LLC is estimated (a multiple of "
                                  "eval_every); 0: no LLC")
    llc_batch_size: int = option(256, "training pairs per SGLD step (nbeta = n / log n over all training pairs)")
    llc_chains: int = option(4, "SGLD chains per estimate")
    llc_draws: int = option(300, "SGLD steps per chain")
    llc_step_size: float = option(3e-5, "SGLD step size (epsilon)")
    llc_gamma: float = option(3000.0, "SGLD localisation strength (gamma); at 300 the chains climb out of the "
                                      "basin (split R-hat 1.4-1.6)")
    max_key_frequencies: int = option(8, "at most this many key frequencies are chosen")
    threshold: float = option(0.99, "accuracy that counts as learned, for the grokking epochs")
    neuron_threshold: float = option(0.85, "a neuron is explained by one frequency above this variance fraction")


def check(cfg: Config) -> None:
    """Clear errors for configs that cannot run."""
    fourier.n_frequencies(cfg.p)  # odd p >= 3
    if not 0 < cfg.train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {cfg.train_fraction}")
    if round(cfg.train_fraction * cfg.p**2) < 1 or round(cfg.train_fraction * cfg.p**2) >= cfg.p**2:
        raise ValueError(f"train_fraction={cfg.train_fraction} of p^2={cfg.p ** 2} pairs leaves no train or test set")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model={cfg.d_model} must be a multiple of n_heads={cfg.n_heads}")
    for k in cfg.key_frequencies or ():
        if not 1 <= k <= fourier.n_frequencies(cfg.p):
            raise ValueError(f"key frequency {k} is not in 1..{fourier.n_frequencies(cfg.p)} (p={cfg.p})")
    if cfg.max_key_frequencies < 1:
        raise ValueError(f"max_key_frequencies must be at least 1, got {cfg.max_key_frequencies}")
    if cfg.llc_every < 0 or cfg.llc_every % cfg.eval_every:
        raise ValueError(f"llc_every={cfg.llc_every} must be 0 (no LLC) or a multiple of eval_every={cfg.eval_every}")


def model_config(cfg: Config) -> jinterp.Config:
    return jinterp.Config(d_model=cfg.d_model, n_layers=1, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
                          d_mlp=cfg.d_mlp, d_vocab=cfg.p + 1, n_ctx=3, norm=None, act="relu", positional="learned",
                          mlp_bias=True, architecture="grokking 1-layer")


def init_model(cfg: Config, key: jax.Array) -> jinterp.Transformer:
    """The paper's initialisation: normal(0, 1/sqrt(d_model)) weights, the unembedding 1/sqrt(d_vocab)."""
    model = jinterp.Transformer.init(model_config(cfg), key, std=cfg.d_model**-0.5)
    return eqx.tree_at(lambda m: m.W_U, model, model.W_U * math.sqrt(cfg.d_model / (cfg.p + 1)))


# Data ---------------------------------------------------------------------------------------------

class Pairs(eqx.Module):
    """Every pair (a, b), a-major (index a * p + b): tokens ``[p^2, 3]``, answers ``[p^2]`` and which are trained on."""

    tokens: Int[Array, "pairs 3"]
    labels: Int[Array, " pairs"]
    is_train: Bool[Array, " pairs"]


def make_pairs(p: int, train_fraction: float, seed: int) -> Pairs:
    a, b = np.divmod(np.arange(p * p), p)
    tokens = np.stack([a, b, np.full_like(a, p)], 1).astype(np.int32)
    chosen = np.random.default_rng(seed).permutation(p * p)[: round(train_fraction * p * p)]
    is_train = np.zeros(p * p, bool)
    is_train[chosen] = True
    return Pairs(jnp.asarray(tokens), jnp.asarray((a + b) % p, jnp.int32), jnp.asarray(is_train))


class FullBatch(eqx.Module):
    """``step -> (tokens, labels)``: every training pair at every step, held as fields (not compiled in)."""

    tokens: Int[Array, "train 3"]
    labels: Int[Array, " train"]

    def __call__(self, step):
        return self.tokens, self.labels


# Model outputs and losses ---------------------------------------------------------------------------

def answer_logits(model: jinterp.Transformer, tokens: Int[Array, "batch 3"]) -> Float[Array, "batch p"]:
    """Logits over the p residues at the last position; the same as ``model(tokens)[:, -1, :p]``.

    In one layer without LayerNorm the keys and values of positions 0 and 1 depend on one token
    each, so they are read from ``[d_vocab, heads, d_head]`` tables and passed as jinterp's cached
    prefix: only the last position runs through the model (about 3x less work per step)."""
    attn, p = model.blocks.attn, model.cfg.d_vocab - 1
    x = model.W_E[:, None] + model.W_pos[None, :2]  # [d_vocab, position, d_model]
    keys, values = (jnp.einsum("vsd,hde->vshe", x, W[0]) for W in (attn.W_K, attn.W_V))
    prefix = tuple(jnp.stack([t[tokens[:, 0], 0], t[tokens[:, 1], 1]], 1)[None] for t in (keys, values))
    return model.forward(tokens, prefix=prefix)[0][:, -1, :p]


def cross_entropy(logits: Float[Array, "batch classes"], labels: Int[Array, " batch"]) -> Float[Array, " batch"]:
    """``logsumexp(logits) - logits[label]``, written as ``(top - logits[label]) + log1p(sum of
    exp(others - top))`` with ``top`` the largest logit: accurate (with its gradient) down to the
    smallest float32 losses, where ``log_softmax`` rounds ``1 + tiny`` to 1 and returns 0."""
    top_index = jnp.argmax(logits, -1)
    top = jnp.take_along_axis(logits, top_index[:, None], 1)
    others = jnp.where(jax.nn.one_hot(top_index, logits.shape[-1], dtype=bool), 0.0, jnp.exp(logits - top))
    label = jnp.take_along_axis(logits, labels[:, None], 1)
    # Where the answer is the top logit its margin is 0 with no gradient: were +1 and -1 summed into
    # that logit's gradient next to -s / (1 + s), a tiny s would be lost to rounding.
    margin = jnp.where(top_index == labels, 0.0, (top - label)[:, 0])
    return margin + jnp.log1p(others.sum(-1))


class Loss(eqx.Module):
    """The training loss of a full batch: mean cross-entropy of the answer, precise or optax's."""

    precise: bool = eqx.field(static=True)

    def __call__(self, model, batch):
        tokens, labels = batch
        logits = answer_logits(model, tokens)
        if self.precise:
            return cross_entropy(logits, labels).mean()
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def snapshot(model) -> Float[Array, " n_params"]:
    """Every float parameter of ``model``, raveled into one vector."""
    return ravel_pytree(eqx.filter(model, eqx.is_inexact_array))[0]


def restore(template, flat: Float[Array, " n_params"]):
    """``template`` with the parameters of a ``snapshot``."""
    params, static = eqx.partition(template, eqx.is_inexact_array)
    return eqx.combine(ravel_pytree(params)[1](flat), static)


@eqx.filter_jit
def evaluate(model: jinterp.Transformer, pairs: Pairs) -> dict[str, Array]:
    """Train and test loss and accuracy (precise loss), and a parameter snapshot for the progress measures."""
    logits = answer_logits(model, pairs.tokens)
    losses, correct = cross_entropy(logits, pairs.labels), logits.argmax(-1) == pairs.labels
    mean = lambda x, where: jnp.sum(jnp.where(where, x, 0)) / where.sum()  # noqa: E731
    return {"train_loss": mean(losses, pairs.is_train), "test_loss": mean(losses, ~pairs.is_train),
            "train_accuracy": mean(correct, pairs.is_train), "test_accuracy": mean(correct, ~pairs.is_train),
            "params": snapshot(model)}


# Fourier analysis and progress measures ------------------------------------------------------------

def choose_key_frequencies(norms: Float[np.ndarray, " n_frequencies"], max_keys: int) -> list[int]:
    """The frequencies (1-based) with the largest norms, down to the largest ratio between one norm and
    the next in descending order, among the top ``max_keys``: the gap between used and unused ones."""
    norms = np.asarray(norms, np.float64)
    order = np.argsort(-norms, kind="stable")
    top = norms[order][: min(max_keys, len(norms) - 1) + 1]
    k = int(np.argmax(top[:-1] / np.maximum(top[1:], 1e-30))) + 1
    return sorted(int(i) + 1 for i in order[:k])


def sum_directions(p: int, frequencies) -> Float[Array, "directions p p"]:
    """Unit vectors over the (a, b) grid along ``cos(2 pi w (a + b) / p)`` and ``sin(...)``, for each
    frequency w in turn: orthonormal for distinct frequencies in 1..(p-1)/2."""
    s = np.add.outer(np.arange(p), np.arange(p))
    rows = [f(2 * np.pi * w * s / p) for w in frequencies for f in (np.cos, np.sin)]
    return jnp.asarray(np.stack(rows) / (p / np.sqrt(2)), jnp.float32)


def split_logits(logits: Float[Array, "a b c"], directions: Float[Array, "directions a b"]):
    """``(mean, along)``: each output's mean over (a, b) ``[1, 1, c]`` and the logits' part along ``directions``."""
    coefficients = jnp.einsum("dab,abc->dc", directions, logits)
    return logits.mean((0, 1), keepdims=True), jnp.einsum("dc,dab->abc", coefficients, directions)


def restricted_and_excluded(logits: Float[Array, "a b c"], labels: Int[Array, "a b"], is_train: Bool[Array, "a b"],
                            directions: Float[Array, "directions a b"]) -> dict[str, Array]:
    """Restricted loss (mean + key directions only, over all pairs) and excluded loss (key directions
    removed, over the training pairs), with precise cross-entropy."""
    p = logits.shape[-1]
    mean, along = split_logits(logits, directions)

    def loss(kept):
        return cross_entropy(kept.reshape(-1, p), labels.reshape(-1)).reshape(labels.shape)

    excluded = loss(logits - along)
    return {"restricted_loss": loss(mean + along).mean(),
            "excluded_loss": jnp.sum(jnp.where(is_train, excluded, 0)) / is_train.sum()}


@eqx.filter_jit
def progress_measures(snapshots: Float[Array, "n n_params"], template, pairs: Pairs,
                      directions: Float[Array, "directions p p"], key_mask: Bool[Array, " n_frequencies"]):
    """Restricted and excluded loss, the key frequencies' share of the embedding's squared norm and the
    total squared weight norm, for each parameter snapshot."""
    p = template.cfg.d_vocab - 1

    def one(flat):
        model = restore(template, flat)
        logits = answer_logits(model, pairs.tokens).reshape(p, p, p)
        measures = restricted_and_excluded(logits, pairs.labels.reshape(p, p), pairs.is_train.reshape(p, p),
                                           directions)
        squares = fourier.frequency_norms(model.W_E[:p]) ** 2
        measures["key_embedding_fraction"] = (squares * key_mask).sum() / (model.W_E[:p] ** 2).sum()
        measures["weight_norm"] = jnp.sqrt((flat**2).sum())
        return measures

    return jax.lax.map(one, snapshots)


def analyse(model: jinterp.Transformer, pairs: Pairs, cfg: Config) -> dict:
    """The final model's embedding in the Fourier basis, its key frequencies and its neurons' frequencies."""
    p = cfg.p
    embedding = model.W_E[:p]
    norms = np.asarray(fourier.frequency_norms(embedding))
    keys = list(cfg.key_frequencies) if cfg.key_frequencies else choose_key_frequencies(norms, cfg.max_key_frequencies)
    _, cache = jinterp.run(model, pairs.tokens, capture=["blocks.0.mlp.post"])
    neurons = cache["blocks.0.mlp.post"][:, -1].reshape(p, p, cfg.d_mlp)  # [a, b, neuron] at "="
    fractions = fourier.frequency_fractions_2d(neurons)  # [frequency, neuron]
    best = np.asarray(fractions).argmax(0)
    alive = np.asarray(neurons.std((0, 1))) > 0  # a dead neuron has no variance to explain
    fractions_np = np.asarray(fractions)
    shown = sorted(keys, key=lambda k: -fractions_np[k - 1].max())[:3]  # the cleanest neuron of 3 key frequencies
    examples = np.array([fractions_np[k - 1].argmax() for k in shown], np.int32)
    return {"key_frequencies": np.array(sorted(set(keys)), np.int32),
            "component_norms": fourier.component_norms(embedding), "frequency_norms": norms,
            "neuron_fractions": fractions, "neuron_best_frequency": best + 1, "neuron_alive": alive,
            "example_neurons": examples, "example_activations": jnp.moveaxis(neurons[:, :, examples], -1, 0)}


# Computation --------------------------------------------------------------------------------------

def compute(run: Run) -> dict:
    cfg: Config = run.config
    check(cfg)
    pairs = make_pairs(cfg.p, cfg.train_fraction, cfg.seed)
    model = init_model(cfg, jax.random.key(cfg.seed))
    schedule = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup) if cfg.warmup else cfg.learning_rate
    optimizer = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay)
    train_pairs = FullBatch(pairs.tokens[pairs.is_train], pairs.labels[pairs.is_train])
    trained = train(model, Loss(cfg.precise_loss), optimizer, train_pairs, steps=cfg.epochs,
                    eval_every=cfg.eval_every, evaluate=lambda m: evaluate(m, pairs), run=run, name="model",
                    checkpoint_every=cfg.checkpoint_every, description="grokking: training")
    model = trained.params
    history = {key: np.asarray(value) for key, value in trained.history.items() if key != "params"}
    analysis = run.step("analysis", lambda: analyse(model, pairs, cfg))
    keys = [int(k) for k in analysis["key_frequencies"]]
    key_mask = np.isin(np.arange(1, fourier.n_frequencies(cfg.p) + 1), keys)
    progress = run.step("progress_measures", lambda: progress_measures(
        jnp.asarray(trained.history["params"]), model, pairs, sum_directions(cfg.p, keys), jnp.asarray(key_mask)))
    results = {"history": history, "analysis": analysis, "progress": progress, "is_train": np.asarray(pairs.is_train)}
    if cfg.llc_every:
        # The snapshots the evaluations already keep, at every llc_every epochs.
        snapshots = {int(step): restore(model, jnp.asarray(flat))
                     for step, flat in zip(trained.history["eval_step"], trained.history["params"])
                     if step % cfg.llc_every == 0}
        results["llc"] = llc.over_training(
            snapshots, Loss(cfg.precise_loss), (train_pairs.tokens, train_pairs.labels),
            jax.random.fold_in(jax.random.key(cfg.seed), 1), run=run, description="grokking: LLC",
            step_size=cfg.llc_step_size, gamma=cfg.llc_gamma, chains=cfg.llc_chains, draws=cfg.llc_draws,
            batch_size=min(cfg.llc_batch_size, len(train_pairs.labels)))
    return results


# Report -------------------------------------------------------------------------------------------

def first_reaching(steps, values, threshold: float) -> int | None:
    """The first evaluation epoch at which ``values`` reach ``threshold``, or None."""
    reached = np.nonzero(np.asarray(values) >= threshold)[0]
    return int(np.asarray(steps)[reached[0]]) if reached.size else None


def summarise(cfg: Config, results: dict) -> dict:
    """The numbers the report and metrics.json are built from."""
    history, analysis = results["history"], results["analysis"]
    steps = np.asarray(history["eval_step"])
    keys = [int(k) for k in analysis["key_frequencies"]]
    norms = np.asarray(analysis["component_norms"], np.float64)
    squares = norms[1:] ** 2
    per_frequency = squares[0::2] + squares[1::2]
    fractions = np.asarray(analysis["neuron_fractions"])
    alive = np.asarray(analysis["neuron_alive"], bool)
    best_fraction = fractions.max(0)
    best = np.asarray(analysis["neuron_best_frequency"])
    explained = alive & (best_fraction > cfg.neuron_threshold)
    return {"train_epoch": first_reaching(steps, history["train_accuracy"], cfg.threshold),
            "test_epoch": first_reaching(steps, history["test_accuracy"], cfg.threshold),
            "key_frequencies": keys,
            "key_embedding_fraction": float(per_frequency[np.array(keys) - 1].sum() / (norms**2).sum()),
            "neurons_alive": int(alive.sum()), "neurons_explained": int(explained.sum()),
            "neurons_explained_by_key": int((explained & np.isin(best, keys)).sum()),
            "neurons_per_key": {k: int((explained & (best == k)).sum()) for k in keys},
            "median_best_fraction": float(np.median(best_fraction[alive])) if alive.any() else float("nan")}


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    history, analysis, progress = results["history"], results["analysis"], results["progress"]
    summary = summarise(cfg, results)
    steps = np.asarray(history["eval_step"])
    keys = summary["key_frequencies"]
    n_train = int(np.asarray(results["is_train"]).sum())
    page = Report(f"Grokking modular addition (p = {cfg.p})", directory / "plots")

    page.heading("Setup")
    page.text(f"A 1-layer transformer (d_model {cfg.d_model}, {cfg.n_heads} heads, d_mlp {cfg.d_mlp}, ReLU, no "
              f"LayerNorm) predicts (a + b) mod {cfg.p} from the tokens [a, b, =]. Full-batch AdamW (lr "
              f"{cfg.learning_rate}, {cfg.warmup} warmup steps, weight decay {cfg.weight_decay}, betas "
              f"({cfg.beta1}, {cfg.beta2})) for {cfg.epochs} epochs on {n_train} of the {cfg.p ** 2} pairs "
              f"({cfg.train_fraction:.0%}, seed {cfg.seed}); the rest is the test set. Evaluated every "
              f"{cfg.eval_every} epochs; loss: {'precise (log1p) ' if cfg.precise_loss else ''}cross-entropy.")

    page.heading("Grokking: train accuracy saturates early, test accuracy much later")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    train_loss = np.asarray(history["loss"])
    every_step = "training loss (every step)"
    plots.curves({every_step: np.arange(1, len(train_loss) + 1), "train": steps, "test": steps},
                 {every_step: train_loss, "train": history["train_loss"], "test": history["test_loss"]}, ax=axes[0],
                 styles={every_step: {"color": "lightgrey", "lw": 0.8}}, yscale="log", xlabel="epoch",
                 ylabel="cross-entropy (nats)", title="Loss")
    plots.curves(steps, {"train": history["train_accuracy"], "test": history["test_accuracy"]}, ax=axes[1],
                 xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in axes:
        for key, colour in (("train_epoch", "tab:blue"), ("test_epoch", "tab:orange")):
            if summary[key] is not None:
                ax.axvline(summary[key], color=colour, ls="--", lw=0.8)
    page.figure(fig, "loss_accuracy", f"Dashed: the first evaluation with accuracy >= {cfg.threshold:.0%}: "
                f"train at epoch {summary['train_epoch']}, test at epoch {summary['test_epoch']}.")

    page.heading("The embedding in the Fourier basis")
    norms = np.asarray(analysis["component_norms"])
    frequency = np.arange(1, fourier.n_frequencies(cfg.p) + 1)
    fig, ax = plt.subplots(figsize=(13, 4))
    plots.grouped_bars({"cos": norms[1::2], "sin": norms[2::2]}, [str(k) for k in frequency], ax=ax,
                       xlabel="frequency k", ylabel="norm of W_E[:p] component",
                       title=f"Key frequencies {keys} (red); constant component {norms[0]:.2f}")
    for k in keys:  # bar k sits at x = k - 1
        ax.annotate(str(k), (k - 1, max(norms[2 * k - 1], norms[2 * k])), ha="center", va="bottom", color="red")
    page.figure(fig, "embedding_fourier", f"The embedding of the residues, W_E[:p], in the Fourier basis: each bar "
                f"is the norm over d_model of one cos or sin component. The key frequencies carry "
                f"{summary['key_embedding_fraction']:.1%} of its squared norm.")

    page.heading("Neurons in the 2D Fourier basis")
    fractions = np.asarray(analysis["neuron_fractions"])  # [frequency, neuron]
    best = np.asarray(analysis["neuron_best_frequency"])
    alive = np.asarray(analysis["neuron_alive"], bool)
    best_fraction = fractions.max(0)
    order = [n for n in np.lexsort((-best_fraction, best)) if alive[n]]  # clustered by frequency
    shown = sorted(set(keys) | set(int(b) for b in best[alive & (best_fraction > cfg.neuron_threshold)]))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    plots.heatmap(fractions[np.array(shown) - 1][:, order], ax=axes[0], vmin=0, vmax=1,
                  yticklabels=[f"{k}{'*' if k in keys else ''}" for k in shown],
                  xlabel=f"neuron (the {len(order)} alive ones, clustered by best frequency)", ylabel="frequency",
                  title="Fraction of each neuron's variance explained by a frequency")
    axes[1].hist(best_fraction[alive], bins=np.linspace(0, 1, 21))
    axes[1].axvline(cfg.neuron_threshold, color="red", ls="--", lw=0.8)
    axes[1].set(xlabel="fraction explained by the best frequency", ylabel="neurons")
    page.figure(fig, "neuron_frequencies", f"MLP activations at the last position over all (a, b). "
                f"{summary['neurons_explained']} of {summary['neurons_alive']} alive neurons have more than "
                f"{cfg.neuron_threshold:.0%} of their variance explained by one frequency, "
                f"{summary['neurons_explained_by_key']} of them by a key frequency (starred). Per key frequency: "
                + ", ".join(f"{k}: {n}" for k, n in summary["neurons_per_key"].items()) + ".")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, neuron, grid in zip(axes, analysis["example_neurons"], analysis["example_activations"]):
        ax.imshow(np.asarray(grid), cmap="viridis", origin="lower")
        ax.set(xlabel="b", ylabel="a", title=f"neuron {int(neuron)}: frequency {int(best[neuron])} "
               f"({fractions[best[neuron] - 1, neuron]:.0%})")
    page.figure(fig, "example_neurons", "Activations over (a, b) of the neuron best explained by each of (up to) "
                "three key frequencies: periodic in a and in b with that one frequency.")

    page.heading("Progress measures")
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    plots.curves(steps, {"train loss": history["train_loss"], "test loss": history["test_loss"],
                         "restricted loss (all pairs)": progress["restricted_loss"],
                         "excluded loss (train pairs)": progress["excluded_loss"]}, ax=axes[0], yscale="log",
                 xlabel="epoch", ylabel="cross-entropy (nats)",
                 title=f"Restricted and excluded loss, key frequencies {keys}")
    plots.curves(steps, {"key frequencies' share": progress["key_embedding_fraction"]}, ax=axes[1], color="tab:red",
                 xlabel="epoch", ylabel="fraction of ||W_E[:p]||^2", title="Key frequencies' share of the embedding")
    twin = axes[1].twinx()
    twin.plot(steps, progress["weight_norm"], color="tab:grey")
    twin.set_ylabel("total weight norm (grey)")
    page.figure(fig, "progress_measures", "Restricted loss keeps only the logits' mean over (a, b) and their "
                "components along cos/sin(w(a + b)) for the key frequencies w; excluded loss removes those "
                "components. Both use the final model's key frequencies on parameter snapshots taken during "
                "training. Excluded loss rising while train loss stays low marks the circuit replacing memorisation; "
                "the weight norm falls in the cleanup phase.")

    if "llc" in results:
        llc_report(page, cfg, results, summary)

    page.run_section(cfg, info, f"This run took {info['seconds']:.1f} s")
    page.write(directory / "report.html")

    training = info.get("steps", {}).get("model", {}).get("seconds")
    last = lambda values: float(np.asarray(values)[-1])  # noqa: E731
    write_json(directory / "metrics.json", {
        "key_frequencies": keys, "key_embedding_fraction": summary["key_embedding_fraction"],
        "key_embedding_fraction_definition": "key frequencies' share of the squared Frobenius norm of W_E[:p]",
        "train_accuracy_epoch": summary["train_epoch"], "test_accuracy_epoch": summary["test_epoch"],
        "grokking_epoch_definition": f"first evaluation epoch with accuracy >= {cfg.threshold}",
        "final": {"train_accuracy": last(history["train_accuracy"]), "test_accuracy": last(history["test_accuracy"]),
                  "train_loss": last(history["train_loss"]), "test_loss": last(history["test_loss"]),
                  "restricted_loss": last(progress["restricted_loss"]),
                  "excluded_loss": last(progress["excluded_loss"])},
        "neurons": {"alive": summary["neurons_alive"], "explained_by_one_frequency": summary["neurons_explained"],
                    "explained_by_a_key_frequency": summary["neurons_explained_by_key"],
                    "per_key_frequency": {str(k): n for k, n in summary["neurons_per_key"].items()},
                    "median_best_fraction": summary["median_best_fraction"]},
        "config_hash": info.get("config_hash"), "seconds": info.get("seconds"), "training_seconds": training,
        "epochs_per_second": cfg.epochs / training if training else None,
        **({"llc": {"epoch": results["llc"]["step"].tolist(), "mean": results["llc"]["mean"].tolist(),
                    "std": results["llc"]["std"].tolist(), "nbeta": float(results["llc"]["nbeta"][0]),
                    "diagnostics": llc.problems(results["llc"])}} if "llc" in results else {})})


EXPERIMENT = Experiment("grokking", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)


def llc_report(page: Report, cfg: Config, results: dict, summary: dict) -> None:
    """The LLC over training next to train and test loss, and the sampler's diagnostics."""
    estimates, history = results["llc"], results["history"]
    steps = np.asarray(estimates["step"])
    page.heading("Local learning coefficient")
    page.text(f"The LLC (Lau et al. 2023, jinterp.llc) of the parameter snapshots every {cfg.llc_every} epochs: SGLD "
              f"with {cfg.llc_chains} chains of {cfg.llc_draws} steps (step size {cfg.llc_step_size}, localisation "
              f"gamma {cfg.llc_gamma}, nbeta = n / log n = {float(estimates['nbeta'][0]):.1f} over the n training "
              f"pairs, batches of {cfg.llc_batch_size}), the same random draws at every snapshot.")
    ax = plots.estimates_over_training(
        steps, estimates["mean"], estimates["std"], label="LLC (mean ± std over chains)", ylabel="estimated LLC",
        xlabel="epoch", title="LLC over training", beside_ylabel="loss (nats)", beside_yscale="log",
        beside={"train loss": (history["eval_step"], history["train_loss"]),
                "test loss": (history["eval_step"], history["test_loss"])},
        marks={"train accuracy reached": (summary["train_epoch"], "tab:blue"),
               "test accuracy reached": (summary["test_epoch"], "tab:orange")})
    page.figure(ax.figure, "llc", "Dashed: the epochs at which train and test accuracy reach the threshold. The LLC "
                "counts the effective number of parameters the training loss depends on around the snapshot: it "
                "rises while the network memorises and falls when the generalising circuit replaces memorisation.")
    page.table(["epoch", "LLC", "std over chains", "split R-hat", "train loss at the snapshot"],
               [[int(s), float(m), float(d), float(r), float(i)] for s, m, d, r, i in
                zip(steps, estimates["mean"], estimates["std"], llc.rhats(estimates), estimates["init_loss"])])
    found = llc.problems(estimates)
    page.text("Sampler diagnostics: " + ("; ".join(found) if found else llc.NO_PROBLEMS))
