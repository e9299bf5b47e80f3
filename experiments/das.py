"""Distributed alignment search (Geiger et al. 2023) on a two-equality task: a small transformer
learns ``(a == b, c == d)`` and DAS finds where, in which subspace, it holds each equality.

Task: four symbol tokens ``a b c d`` (``n_symbols`` of them); at the last position the model
predicts one of four answer tokens, ``2 (a == b) + (c == d)`` after the symbols. Inputs are drawn
with ``a == b`` and ``c == d`` each true half the time. The high-level causal model computes two
intermediate variables, LEFT = ``a == b`` and RIGHT = ``c == d``, and outputs their pair.

The model: 2 blocks (attention + MLP, LayerNorm, learned positions); the first attends within a
window of 2 tokens (a local, Gemma-style layer), the second globally. So the answer has known
places: after block 0, only position 1 (``b``, which saw ``a``) can hold LEFT and only position 3
(``d``, which saw ``c``) can hold RIGHT; block 1 brings both to the output position 3.

Interchange: for a (base, source) pair, the counterfactual label for LEFT is the answer for
``(LEFT(source), RIGHT(base))`` (RIGHT: ``(LEFT(base), RIGHT(source))``). It equals the base's own
answer on half the pairs, so an intervention that does nothing, or something unrelated, scores
about 0.5 interchange-intervention accuracy (IIA): chance is 0.5.

DAS learns a ``k``-dimensional subspace per (variable, site, position) on training pairs and
reports IIA on held-out pairs of fresh inputs. Controls: the same site with a random, untrained
subspace; and the (variable, position) combinations that cannot hold the variable (RIGHT at ``b``,
which has not seen ``c`` or ``d``; LEFT at ``d`` after the local block, which has not seen ``a``
or ``b``), where IIA must stay at chance whatever the subspace.

A first version used Geiger et al.'s hierarchical equality (the answer ``(a == b) == (c == d)``,
an XOR of the two variables). Trained here it sat at chance for thousands of steps (no single
variable predicts an XOR, so the gradient has nothing to start from); with a larger initialisation
a globally attending model learned it, but computed ``a == b`` along several routes at once, and
no site held a variable cleanly (best IIA 0.69 for LEFT, 0.84 for RIGHT at k = 4 or 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jaxtyping import Array, Int

import jinterp
from jinterp import das, plots
from jinterp.patching import Chunks
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option
from jinterp.train import train

VARIABLES = ("left", "right")  # a == b, c == d
POSITION_NAMES = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Config:
    """The defaults are the full run: 3 min 30 s on a 2-core CPU shared with other work (load ~10), about
    half of it compiling: each alignment compiles its own training step."""

    seed: int = option(0, "seed of the weights, the data, the pairs and the DAS initialisations")
    n_symbols: int = option(16, "distinct symbol tokens a, b, c, d are drawn from")
    d_model: int = option(32, "residual stream width")
    n_heads: int = option(2, "attention heads per layer (d_head = d_model // n_heads)")
    d_mlp: int = option(64, "MLP width")
    window: int = option(2, "attention window of block 0 (block 1 attends globally)")
    steps: int = option(1000, "optimizer steps training the task model")
    batch_size: int = option(256, "inputs per training step of the task model")
    learning_rate: float = option(3e-3, "peak AdamW learning rate of the task model (cosine decay to 0)")
    eval_every: int = option(100, "steps between evaluations of the task model's accuracy")
    test_inputs: int = option(2048, "fresh inputs the task accuracy is measured on")
    sites: tuple[str, ...] = option(("blocks.0.resid_post", "blocks.1.resid_mid"),
                                    "sites DAS searches, each at every position in positions")
    positions: tuple[int, ...] = option((1, 3), "positions searched: 1 is b, 3 is d (the output position)")
    k: int = option(2, "dimension of the aligned subspace")
    das_steps: int = option(250, "Adam steps per DAS alignment")
    das_batch: int = option(128, "pairs per DAS step")
    das_learning_rate: float = option(3e-2, "Adam learning rate of the DAS rotation")
    train_pairs: int = option(8192, "(base, source) pairs DAS is trained on")
    test_pairs: int = option(2048, "held-out pairs IIA is measured on (fresh inputs)")


def check(cfg: Config) -> None:
    """Clear errors for configs that cannot run."""
    if cfg.n_symbols < 2:
        raise ValueError(f"n_symbols must be at least 2 (a != b must be possible), got {cfg.n_symbols}")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model={cfg.d_model} must be a multiple of n_heads={cfg.n_heads}")
    bad = [p for p in cfg.positions if not -4 <= p < 4]
    if bad:
        raise ValueError(f"positions {bad} are out of range: inputs have 4 positions (0..3 = a, b, c, d)")
    if not cfg.sites:
        raise ValueError("sites is empty: name at least one site, e.g. blocks.0.resid_post")


def model_config(cfg: Config) -> jinterp.Config:
    return jinterp.Config(d_model=cfg.d_model, n_layers=2, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
                          d_mlp=cfg.d_mlp, d_vocab=cfg.n_symbols + 4, n_ctx=4, act="relu", norm="layer",
                          positional="learned", layer_types=("local", "global"), sliding_window=cfg.window,
                          architecture="two-equality toy")


# The task and its causal model ---------------------------------------------------------------------

def equality_inputs(key: jax.Array, n: int, n_symbols: int) -> Int[Array, "n 4"]:
    """``n`` inputs ``a b c d`` with ``a == b`` and ``c == d`` each true with probability 1/2."""
    k_first, k_equal, k_shift = jax.random.split(key, 3)
    first = jax.random.randint(k_first, (n, 2), 0, n_symbols)  # a, c
    equal = jax.random.bernoulli(k_equal, 0.5, (n, 2))
    other = (first + jax.random.randint(k_shift, (n, 2), 1, n_symbols)) % n_symbols  # anything but the first
    second = jnp.where(equal, first, other)  # b, d
    return jnp.stack([first[:, 0], second[:, 0], first[:, 1], second[:, 1]], axis=1).astype(jnp.int32)


def variables(tokens: Int[Array, "n 4"]) -> dict[str, Array]:
    """The causal model's intermediate variables of each input."""
    return {"left": tokens[:, 0] == tokens[:, 1], "right": tokens[:, 2] == tokens[:, 3]}


def answer(left: Array, right: Array, n_symbols: int) -> Int[Array, " n"]:
    """The causal model's output: the answer token ``n_symbols + 2 left + right``."""
    return (n_symbols + 2 * left.astype(jnp.int32) + right.astype(jnp.int32)).astype(jnp.int32)


def counterfactual_labels(base, source, variable: str, n_symbols: int) -> Int[Array, " n"]:
    """The causal model's output on ``base`` with ``variable`` set to its value on ``source``."""
    values = variables(base)
    values[variable] = variables(source)[variable]
    return answer(values["left"], values["right"], n_symbols)


def pairs(key: jax.Array, n: int, n_symbols: int) -> tuple[Array, Array]:
    """``n`` (base, source) pairs of independent inputs."""
    k_base, k_source = jax.random.split(key)
    return equality_inputs(k_base, n, n_symbols), equality_inputs(k_source, n, n_symbols)


CAN, UNSEEN, TOO_LATE = "can carry it", "has not seen both tokens", "too late: the output no longer reads it"


def role(variable: str, site: str, position: int, window: int, n_layers: int = 2) -> str:
    """Whether a residual-stream site at ``position`` can carry ``variable`` to the output, by the attention
    pattern alone: ``resid_pre`` of block 0 holds one token; after block 0's attention a position has seen
    the last ``window`` tokens, after block 1's every token up to it (causal attention); and after the
    last attention only the output position still reaches the output."""
    first = 0 if variable == "left" else 2  # the variable compares tokens first and first + 1
    position %= 4
    parsed = jinterp.names.parse(site)
    attended = parsed.layer + (parsed.kind != "resid_pre")  # attention layers the value comes after
    earliest = position if attended == 0 else max(0, position - window + 1) if attended == 1 else 0
    if not earliest <= first < position:
        return UNSEEN
    return TOO_LATE if attended >= n_layers and position != 3 else CAN


# Training the task model ----------------------------------------------------------------------------

class TaskBatches(eqx.Module):
    """``step -> inputs [batch, 4]``, drawn from the key and the step alone."""

    key: jax.Array
    batch: int = eqx.field(static=True)
    n_symbols: int = eqx.field(static=True)

    def __call__(self, step):
        return equality_inputs(jax.random.fold_in(self.key, step), self.batch, self.n_symbols)


class TaskLoss(eqx.Module):
    """Cross-entropy of the answer at the last position."""

    n_symbols: int = eqx.field(static=True)

    def __call__(self, model: jinterp.Transformer, tokens) -> Array:
        v = variables(tokens)
        logits = model(tokens)[:, -1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, answer(v["left"], v["right"],
                                                                              self.n_symbols)).mean()


@eqx.filter_jit
def task_accuracy(model: jinterp.Transformer, tokens, n_symbols: int) -> Array:
    v = variables(tokens)
    return (model(tokens)[:, -1].argmax(-1) == answer(v["left"], v["right"], n_symbols)).mean()


# Computation --------------------------------------------------------------------------------------

def searches(cfg: Config) -> list[tuple[str, str, int]]:
    """(variable, site, position) of every alignment DAS learns."""
    return [(variable, site, position) for site in cfg.sites for position in cfg.positions for variable in VARIABLES]


def compute(run: Run) -> dict:
    cfg: Config = run.config
    check(cfg)
    k_model, k_data, k_test, k_train_pairs, k_test_pairs, k_das = jax.random.split(jax.random.key(cfg.seed), 6)
    model = jinterp.Transformer.init(model_config(cfg), k_model)
    todo = searches(cfg)
    for _, site, position in todo[::2]:  # clear errors before any training
        das.Alignment.init(model, site, cfg.k, [position], k_das)
    test = equality_inputs(k_test, cfg.test_inputs, cfg.n_symbols)
    optimizer = optax.adamw(optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps))
    trained = train(model, TaskLoss(cfg.n_symbols), optimizer, TaskBatches(k_data, cfg.batch_size, cfg.n_symbols),
                    steps=cfg.steps, eval_every=cfg.eval_every,
                    evaluate=lambda m: {"accuracy": task_accuracy(m, test, cfg.n_symbols)}, run=run, name="model",
                    description="task model")
    model = trained.params
    train_base, train_source = pairs(k_train_pairs, cfg.train_pairs, cfg.n_symbols)
    test_base, test_source = pairs(k_test_pairs, cfg.test_pairs, cfg.n_symbols)

    def search(i: int) -> np.ndarray:
        """[IIA of the learned subspace, IIA of a random one, final training loss] of one search."""
        variable, site, position = todo[i]
        key = jax.random.fold_in(k_das, i)
        labels = counterfactual_labels(train_base, train_source, variable, cfg.n_symbols)
        fitted = das.fit(model, site, cfg.k, [position], train_base, train_source, labels, steps=cfg.das_steps,
                         batch_size=cfg.das_batch, optimizer=optax.adam(cfg.das_learning_rate), seed=cfg.seed + i,
                         variable=variable, eval_every=cfg.das_steps, progress=False)
        random = das.Alignment.init(model, site, cfg.k, [position], key, variable=variable)
        held_out = counterfactual_labels(test_base, test_source, variable, cfg.n_symbols)
        iia = [das.accuracy(a, model, test_base, test_source, held_out) for a in (fitted.params, random)]
        if i == 0:  # one learned alignment kept as files, to show and check the save/load path
            das.save(fitted.params, run.directory / "alignment")
        return np.array([*iia, float(np.mean(fitted.history["loss"][-10:]))], np.float32)

    results = run.chunked("das", Chunks(len(todo), search, np.stack, "DAS alignments"))
    v_base = variables(test_base)
    unchanged = counterfactual_labels(test_base, test_source, "left", cfg.n_symbols) == answer(
        v_base["left"], v_base["right"], cfg.n_symbols)
    return {"history": {key: np.asarray(v) for key, v in trained.history.items()},
            "task_accuracy": task_accuracy(model, test, cfg.n_symbols), "das": results,
            "no_op_iia_left": unchanged.mean()}


# Report -------------------------------------------------------------------------------------------

def summarise(cfg: Config, results: dict) -> list[dict]:
    """One row per search: where, which variable, whether it can be there, the IIAs."""
    rows = []
    for (variable, site, position), (iia, random_iia, loss) in zip(searches(cfg), np.asarray(results["das"])):
        rows.append({"variable": variable, "site": site, "position": int(position),
                     "token": POSITION_NAMES[position % 4],
                     "role": role(variable, site, position, cfg.window),
                     "iia": float(iia), "random_iia": float(random_iia), "final_loss": float(loss)})
    return rows


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    rows = summarise(cfg, results)
    page = Report("Distributed alignment search: where a transformer keeps a == b and c == d", directory / "plots")
    page.heading("Task and model")
    page.text(f"Inputs a b c d over {cfg.n_symbols} symbols, a == b and c == d each true half the time; the model "
              "answers at d with one of four tokens for the pair (a == b, c == d). Model: 2 blocks (d_model "
              f"{cfg.d_model}, {cfg.n_heads} heads, MLP {cfg.d_mlp}, LayerNorm); block 0 attends to the last "
              f"{cfg.window} tokens only, block 1 to everything before. Trained {cfg.steps} AdamW steps (batch "
              f"{cfg.batch_size}, peak rate {cfg.learning_rate}, cosine decay). Held-out accuracy: "
              f"{float(results['task_accuracy']):.4f} on {cfg.test_inputs} fresh inputs.")
    page.text(f"DAS: for each variable, site and position, a {cfg.k}-dimensional subspace learned with "
              f"{cfg.das_steps} Adam steps (rate {cfg.das_learning_rate}, batch {cfg.das_batch}) on "
              f"{cfg.train_pairs} (base, source) pairs, by the cross-entropy of the counterfactual answer under "
              f"the interchange; IIA on {cfg.test_pairs} held-out pairs. Chance (an intervention that changes "
              f"nothing): {float(results['no_op_iia_left']):.3f}.")
    labels = [f"{r['variable']}\n{r['site'].replace('blocks.', 'L').replace('.resid_', ' ')}\nat {r['token']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(7, 1.0 * len(rows)), 4.4))
    colours = {"learned subspace": ["tab:blue" if r["role"] == CAN else "tab:grey" for r in rows],
               "random subspace": "tab:orange"}
    iia = {"learned subspace": [r["iia"] for r in rows], "random subspace": [r["random_iia"] for r in rows]}
    plots.grouped_bars(iia, labels, colours=colours, ax=ax, ylim=(0, 1.2), ylabel="interchange-intervention accuracy",
                       title=f"IIA by variable and site (k = {cfg.k})")
    ax.axhline(float(results["no_op_iia_left"]), color="black", ls=":", lw=1, label="chance (no-op intervention)")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    page.figure(fig, "iia_by_site", "Blue: sites that can carry the variable to the output; grey: sites that by "
                "the attention pattern cannot (the controls: they have not seen both of its tokens, or come after "
                "the last attention at a position the output does not read); orange: a random, untrained "
                "subspace of the same dimension there.")
    page.table(["variable", "site", "position", "by the attention pattern", "IIA (learned)", "IIA (random subspace)",
                "final training loss"],
               [[r["variable"], r["site"], f"{r['position']} ({r['token']})", r["role"], r["iia"],
                 r["random_iia"], r["final_loss"]] for r in rows], "Held-out interchange-intervention accuracy")
    history = results["history"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    plots.curves(history["eval_step"], {"held-out accuracy": history["accuracy"]}, ax=ax, marker=".",
                 ylabel="held-out accuracy", title="Task model training")
    ax.set_ylim(0, 1.02)
    page.figure(fig, "task_accuracy", "Accuracy of the answer on fresh inputs during training.")
    page.run_section(cfg, info, f"This run took {info.get('seconds', 0):.1f} s. One learned alignment is saved "
                     "in alignment/ (rotation.safetensors + das.json).")
    page.write(directory / "report.html")
    write_json(directory / "metrics.json", {
        "task_accuracy": float(results["task_accuracy"]), "chance_iia": float(results["no_op_iia_left"]),
        "k": cfg.k, "searches": rows, "config_hash": info.get("config_hash"), "seconds": info.get("seconds")})


EXPERIMENT = Experiment("das", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
