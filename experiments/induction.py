"""Induction heads form in a phase change (Olsson et al. 2022): a 2-layer attention-only
transformer trained on random tokens with a repeated segment, with jinterp's one training loop.

Training data: every sequence is ``n_ctx`` uniform random tokens in which a segment of random
length (``min_segment..max_segment``) at a random start is followed right away by its copy.
Offset and length vary, so no positional rule predicts the copy: the model must find the
current token's earlier occurrence and predict the token that followed it, which takes two
composing heads: a layer-0 previous-token head writes "my previous token was A" into every
position, and a layer-1 induction head, whose keys read that (K-composition), attends from a
later A to the token right after the earlier A and copies it.

Evaluation uses the standard probe: ``eval_sequences`` sequences of ``L = n_ctx // 2`` random
tokens followed by their repeat. For a pattern ``A[head, query, key]``:

* induction score = mean over queries ``i`` in the second copy (``L <= i < 2L``) of
  ``A[i, i - L + 1]``: attention from a token to the token right after its earlier occurrence;
* previous-token score = mean over queries ``1 <= i < 2L`` of ``A[i, i - 1]``;
* first-half loss = next-token loss predicting tokens ``1..L-1`` (random: ln(vocab) at best);
  repeated-half loss = predicting tokens ``L+1..2L-1``, each one the copy of a seen token.

The phase change is the evaluation step after the interval where the repeated-half loss falls
fastest (largest drop per step between consecutive evaluations).
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
from jaxtyping import Array, Float, Int

import jinterp
from jinterp import llc, plots, qkov
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option
from jinterp.train import train


@dataclass(frozen=True)
class Config:
    """The defaults are the full run: 6 minutes (5.5 of them training) on a 2-core CPU shared with other work.

    Why these: 2 layers is the smallest model in which induction can form (it needs two composing
    heads); 4 heads of 16 dimensions per layer leave room for several induction heads and a clear
    previous-token head; a context of 64 with segments of 4-32 tokens puts about a third of the
    targets (28% on average) in a copy. In trials, LayerNorm with the standard 0.02 initialisation, batches
    of 128 and a learning rate of 1e-3 formed induction heads after 600-800 steps for each of 5 seeds
    tried (on a GPU; on this CPU seed 0, at step 700), while
    no LayerNorm, batches of 32 or a learning rate of 3e-3 stayed on the plateau much longer or found
    another solution (the repeated-half loss falls but attention is not on the i -> i - L + 1 diagonal).
    """

    seed: int = option(0, "seed of the initial weights, the training data and the evaluation sequences")
    vocab: int = option(128, "number of token ids (all uniformly random)")
    n_ctx: int = option(64, "sequence length; the evaluation repeats n_ctx // 2 random tokens once")
    d_model: int = option(64, "residual stream width")
    n_heads: int = option(4, "attention heads per layer (d_head = d_model // n_heads)")
    layer_norm: bool = option(True, "pre-norm LayerNorm in the blocks and before the unembedding")
    min_segment: int = option(4, "shortest repeated segment in the training data")
    max_segment: int = option(32, "longest repeated segment in the training data (at most n_ctx // 2)")
    steps: int = option(2000, "optimizer steps")
    batch_size: int = option(128, "training sequences per step")
    learning_rate: float = option(1e-3, "AdamW learning rate (constant)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    eval_every: int = option(50, "steps between evaluations of the scores and losses")
    checkpoint_every: int = option(500, "steps between checkpoints (a multiple of eval_every)")
    eval_sequences: int = option(64, "repeated random sequences the scores and losses are measured on")
    threshold: float = option(0.5, "a layer-1 head with a final induction score above this is an induction head")
    llc_every: int = option(250, "steps between the parameter snapshots whose LLC is estimated (a multiple of "
                                 "eval_every); 0: no LLC")
    llc_examples: int = option(1024, "training sequences the LLC's loss is measured on (n; nbeta = n / log n)")
    llc_batch_size: int = option(32, "sequences per SGLD step")
    llc_chains: int = option(4, "SGLD chains per estimate")
    llc_draws: int = option(100, "SGLD steps per chain")
    llc_step_size: float = option(1e-5, "SGLD step size (epsilon)")
    llc_gamma: float = option(3e4, "SGLD localisation strength (gamma); the weights are small (init std 0.02)")
    llc_heads: bool = option(True, "also every head's refined LLC (only that head's Q/K/V/O weights sampled)")


def check(cfg: Config) -> None:
    """Clear errors for configs that cannot run."""
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model={cfg.d_model} must be a multiple of n_heads={cfg.n_heads}")
    if not 2 <= cfg.min_segment <= cfg.max_segment <= cfg.n_ctx // 2:
        raise ValueError(f"need 2 <= min_segment={cfg.min_segment} <= max_segment={cfg.max_segment} "
                         f"<= n_ctx // 2 = {cfg.n_ctx // 2}: a segment and its copy must fit in a sequence")
    if cfg.vocab < 2:
        raise ValueError(f"vocab must be at least 2, got {cfg.vocab}")
    if cfg.llc_every < 0 or cfg.llc_every % cfg.eval_every:
        raise ValueError(f"llc_every={cfg.llc_every} must be 0 (no LLC) or a multiple of eval_every={cfg.eval_every}")


def model_config(cfg: Config) -> jinterp.Config:
    return jinterp.Config(d_model=cfg.d_model, n_layers=2, n_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads,
                          d_vocab=cfg.vocab, n_ctx=cfg.n_ctx, attn_only=True, norm="layer" if cfg.layer_norm else None,
                          positional="learned", architecture="attn-only toy")


# Data ---------------------------------------------------------------------------------------------

def segment_sequences(key: jax.Array, batch: int, n_ctx: int, vocab: int, min_segment: int, max_segment: int):
    """Random tokens with one segment repeated right after itself.

    Returns ``(tokens [batch, n_ctx], start [batch], length [batch])``: tokens ``start + length + k``
    equal tokens ``start + k`` for ``0 <= k < length``; every other token is uniformly random.
    """
    k_tokens, k_length, k_start = jax.random.split(key, 3)
    tokens = jax.random.randint(k_tokens, (batch, n_ctx), 0, vocab, dtype=jnp.int32)
    length = jax.random.randint(k_length, (batch,), min_segment, max_segment + 1, dtype=jnp.int32)
    start = jnp.floor(jax.random.uniform(k_start, (batch,)) * (n_ctx - 2 * length + 1)).astype(jnp.int32)
    pos = jnp.arange(n_ctx)[None, :]
    in_copy = (pos >= (start + length)[:, None]) & (pos < (start + 2 * length)[:, None])
    source = jnp.where(in_copy, pos - length[:, None], pos)  # the copy reads the segment, never itself
    return jnp.take_along_axis(tokens, source, axis=1), start, length


class SegmentBatches(eqx.Module):
    """``step -> tokens [batch, n_ctx]``: the training batch of a step, drawn from the seed and the step alone."""

    key: jax.Array
    batch: int = eqx.field(static=True)
    n_ctx: int = eqx.field(static=True)
    vocab: int = eqx.field(static=True)
    min_segment: int = eqx.field(static=True)
    max_segment: int = eqx.field(static=True)

    def __call__(self, step: Int[Array, ""]) -> Int[Array, "batch n_ctx"]:
        key = jax.random.fold_in(self.key, step)
        return segment_sequences(key, self.batch, self.n_ctx, self.vocab, self.min_segment, self.max_segment)[0]


def repeated_sequences(key: jax.Array, batch: int, length: int, vocab: int) -> Int[Array, "batch 2*length"]:
    """The standard induction probe: ``length`` uniformly random tokens, then the same tokens again."""
    first = jax.random.randint(key, (batch, length), 0, vocab, dtype=jnp.int32)
    return jnp.concatenate([first, first], axis=1)


# Scores and losses --------------------------------------------------------------------------------

def induction_score(pattern: Float[Array, "... query key"], length: int) -> Float[Array, "..."]:
    """Mean attention from each query ``i`` of the second copy (``length <= i < 2 length``) to key
    ``i - length + 1``, the token after the earlier occurrence of token ``i``; ``pattern``'s
    leading axes (batch, layer, head) are kept except the batch, which callers average."""
    queries = jnp.arange(length, 2 * length)
    return pattern[..., queries, queries - length + 1].mean(-1)


def previous_token_score(pattern: Float[Array, "... query key"]) -> Float[Array, "..."]:
    """Mean attention from each query ``i >= 1`` to key ``i - 1``."""
    queries = jnp.arange(1, pattern.shape[-2])
    return pattern[..., queries, queries - 1].mean(-1)


def token_losses(logits: Float[Array, "batch pos vocab"], tokens: Int[Array, "batch pos"]) -> Float[Array, "batch _"]:
    """Cross-entropy of predicting token ``i + 1`` at position ``i``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])


def half_losses(logits, tokens, length: int) -> dict[str, Array]:
    """Mean loss on the first copy's predictable-in-principle tokens ``1..L-1`` (random) and on the
    repeated tokens ``L+1..2L-1`` (each predictable by induction)."""
    losses = token_losses(logits, tokens)  # index i predicts token i + 1
    return {"loss_first": losses[:, : length - 1].mean(), "loss_repeated": losses[:, length:].mean()}


def next_token_loss(model: jinterp.Transformer, tokens: Int[Array, "batch n_ctx"]) -> Float[Array, ""]:
    """The training loss: mean next-token cross-entropy over every position."""
    return token_losses(model(tokens), tokens).mean()


@eqx.filter_jit
def evaluate(model: jinterp.Transformer, tokens: Int[Array, "batch 2L"]) -> dict[str, Array]:
    """Half losses and per-head ``[layer, head]`` induction and previous-token scores on repeated sequences."""
    length = tokens.shape[1] // 2
    logits, cache = jinterp.run(model, tokens, capture=["blocks.*.attn.pattern"])
    pattern = cache.stack("attn.pattern")  # [layer, batch, head, query, key]
    return {**half_losses(logits, tokens, length), "induction": induction_score(pattern, length).mean(1),
            "previous_token": previous_token_score(pattern).mean(1)}


def k_composition(model: jinterp.Transformer) -> Float[Array, "head0 head1"]:
    """K-composition scores (Elhage et al. 2021) ``[layer-0 head, layer-1 head]``: how much of what each
    layer-0 head writes is read by each layer-1 head's keys, ``|W_OV^0 (W_QK^1)^T|_F / (|W_OV^0|_F |W_QK^1|_F)``
    in the row-vector convention (``x W_OV`` is the layer-0 head's output, ``x W_QK y^T`` the layer-1
    score of query ``x`` and key ``y``), from ``jinterp.qkov.composition_scores``: LayerNorm weights
    folded in and writing weights centred first (``jinterp.process_weights``), so the matrices are the
    ones acting on the residual stream."""
    return qkov.composition_scores(model, "k")[0, :, 1, :]


# Computation --------------------------------------------------------------------------------------

def compute(run: Run) -> dict:
    cfg: Config = run.config
    check(cfg)
    k_model, k_data, k_eval = jax.random.split(jax.random.key(cfg.seed), 3)
    model = jinterp.Transformer.init(model_config(cfg), k_model)
    data = SegmentBatches(k_data, cfg.batch_size, cfg.n_ctx, cfg.vocab, cfg.min_segment, cfg.max_segment)
    probe = repeated_sequences(k_eval, cfg.eval_sequences, cfg.n_ctx // 2, cfg.vocab)
    initial_composition = k_composition(model)

    optimizer = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
    trained = train(model, next_token_loss, optimizer, data, steps=cfg.steps, eval_every=cfg.eval_every,
                    evaluate=lambda m: evaluate(m, probe), run=run, name="model",
                    checkpoint_every=cfg.checkpoint_every, description="induction: training",
                    snapshot_every=cfg.llc_every or None)
    model = trained.params
    history = {key: np.asarray(value) for key, value in trained.history.items()}
    analysis = run.step("analysis", lambda: analyse(model, probe, cfg.threshold))
    results = {"history": history, "analysis": analysis, "initial_k_composition": initial_composition,
               "example": probe[0]}
    if cfg.llc_every:
        results["llc"] = estimate_llc(run, cfg, trained.snapshots)
    return results


def estimate_llc(run: Run, cfg: Config, snapshots: dict) -> dict:
    """The LLC of every snapshot on ``llc_examples`` fresh sequences of the training distribution (and every
    head's refined LLC), each snapshot a checkpointed step."""
    k_data, k_sgld = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), 1), 2)
    tokens = segment_sequences(k_data, cfg.llc_examples, cfg.n_ctx, cfg.vocab, cfg.min_segment, cfg.max_segment)[0]
    return llc.over_training(snapshots, next_token_loss, tokens, k_sgld, run=run, heads=cfg.llc_heads,
                             description="induction: LLC", step_size=cfg.llc_step_size, gamma=cfg.llc_gamma,
                             chains=cfg.llc_chains, draws=cfg.llc_draws, batch_size=cfg.llc_batch_size)


def analyse(model: jinterp.Transformer, probe: Int[Array, "batch 2L"], threshold: float) -> dict:
    """Final losses and scores, the half losses with each head zero-ablated ``[layer, head]`` and with
    every layer-1 head scoring above ``threshold`` zeroed at once (NaN if none does), the K-composition
    scores and every head's attention pattern on the first probe sequence."""
    length = probe.shape[1] // 2
    final = evaluate(model, probe)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    ablated = np.zeros((n_layers, n_heads, 2), np.float32)  # [layer, head, (first, repeated)]
    for layer in range(n_layers):
        for head in range(n_heads):
            zero = jinterp.Zero(f"blocks.{layer}.attn.z", heads=[head])
            logits, _ = jinterp.run(model, probe, edits=zero)
            losses = half_losses(logits, probe, length)
            ablated[layer, head] = losses["loss_first"], losses["loss_repeated"]
    induction_heads = np.nonzero(np.asarray(final["induction"][1]) > threshold)[0]
    without_induction = np.float32(np.nan)
    if induction_heads.size:
        logits, _ = jinterp.run(model, probe, edits=jinterp.Zero("blocks.1.attn.z", heads=induction_heads))
        without_induction = half_losses(logits, probe, length)["loss_repeated"]
    _, cache = jinterp.run(model, probe[:1], capture=["blocks.*.attn.pattern"])
    return {"loss_first": final["loss_first"], "loss_repeated": final["loss_repeated"],
            "loss_repeated_without_induction_heads": without_induction,
            "induction": final["induction"], "previous_token": final["previous_token"],
            "ablated_loss_first": ablated[..., 0], "ablated_loss_repeated": ablated[..., 1],
            "k_composition": k_composition(model), "example_pattern": cache.stack("attn.pattern")[:, 0]}


# Report -------------------------------------------------------------------------------------------

def phase_change(steps: np.ndarray, loss: np.ndarray) -> tuple[int, float]:
    """The evaluation step ending the interval of steepest fall of ``loss`` per step, and that slope."""
    slope = np.diff(loss) / np.diff(steps)
    i = int(np.argmin(slope))
    return int(steps[i + 1]), float(slope[i])


def summarise(cfg: Config, results: dict) -> dict:
    """The heads and numbers the report and metrics.json are built from."""
    history, analysis = results["history"], results["analysis"]
    induction, previous = np.asarray(analysis["induction"]), np.asarray(analysis["previous_token"])
    steps = np.asarray(history["eval_step"])
    at, slope = phase_change(steps, np.asarray(history["loss_repeated"]))
    best = int(np.argmax(induction[1]))
    prev_head = int(np.argmax(previous[0]))
    increase = np.asarray(analysis["ablated_loss_repeated"]) - float(analysis["loss_repeated"])
    crossed = np.nonzero(np.asarray(history["induction"])[:, 1, best] > cfg.threshold)[0]
    return {"phase_change_step": at, "phase_change_slope": slope, "induction_head": (1, best),
            "induction_heads": [(1, int(h)) for h in np.nonzero(induction[1] > cfg.threshold)[0]],
            "previous_token_head": (0, prev_head), "ablation_increase": increase,
            "threshold_step": int(steps[crossed[0]]) if crossed.size else None}


def _name(head) -> str:
    return f"L{head[0]}H{head[1]}"


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    history, analysis = results["history"], results["analysis"]
    summary = summarise(cfg, results)
    steps = np.asarray(history["eval_step"])
    n_layers, n_heads = np.asarray(analysis["induction"]).shape
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    ind_head, prev_head = summary["induction_head"], summary["previous_token_head"]
    length = cfg.n_ctx // 2
    page = Report("Induction heads: the phase change in a 2-layer attention-only transformer", directory / "plots")

    page.heading("Setup")
    page.text(f"A 2-layer attention-only transformer (d_model {cfg.d_model}, {cfg.n_heads} heads per layer, "
              f"learned positions, {'LayerNorm' if cfg.layer_norm else 'no LayerNorm'}, vocab {cfg.vocab}, context "
              f"{cfg.n_ctx}) trained for {cfg.steps} AdamW steps (lr {cfg.learning_rate}, batch {cfg.batch_size}) on "
              f"random tokens in which a segment of {cfg.min_segment}-{cfg.max_segment} tokens at a random offset is "
              f"repeated. Losses and scores are measured every {cfg.eval_every} steps on {cfg.eval_sequences} "
              f"sequences of {length} random tokens followed by their repeat. Induction score: mean attention from "
              f"a token of the second copy to the token right after its earlier occurrence (i -> i - {length - 1}); "
              "previous-token score: mean attention from i to i - 1.")

    page.heading("The phase change")
    fig, ax = plt.subplots(figsize=(9, 4.5))
    train_loss = np.asarray(history["loss"])
    window = min(cfg.eval_every, len(train_loss))
    smooth = np.convolve(train_loss, np.ones(window) / window, mode="valid")
    training = f"training loss ({window}-step mean)"
    ax.axhline(math.log(cfg.vocab), color="grey", ls=":", lw=0.8, label=f"ln(vocab) = {math.log(cfg.vocab):.2f}")
    plots.curves({training: np.arange(window, len(train_loss) + 1), "first half (random tokens)": steps,
                  "repeated half": steps},
                 {training: smooth, "first half (random tokens)": history["loss_first"],
                  "repeated half": history["loss_repeated"]},
                 ax=ax, styles={training: {"color": "lightgrey", "marker": None}}, marker=".",
                 marks={f"phase change (steepest drop), step {summary['phase_change_step']}":
                        summary["phase_change_step"]},
                 ylabel="next-token loss (nats)", title="Loss on the first and the repeated half")
    page.figure(fig, "loss_curves", "The repeated-half loss stays at the random-token level, then falls sharply "
                "once induction heads form; the first-half loss cannot fall below ln(vocab).")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in ((axes[0], "induction", "Induction score"),
                           (axes[1], "previous_token", "Previous-token score")):
        values = np.asarray(history[key])
        plots.curves(steps, {_name(h): values[:, h[0], h[1]] for h in heads}, ax=ax, legend=key == "previous_token",
                     styles={_name(h): {"ls": "-" if h[0] else "--"} for h in heads},
                     marks={"phase change": summary["phase_change_step"]}, title=f"{title} per head over training")
    axes[0].set_ylabel("mean attention")
    page.figure(fig, "score_trajectories", "Dashed: layer-0 heads; solid: layer-1 heads; red: the phase change.")

    page.heading("Final scores")
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
    for ax, values, title in ((axes[0], analysis["induction"], "Induction score"),
                              (axes[1], analysis["previous_token"], "Previous-token score"),
                              (axes[2], summary["ablation_increase"], "Repeated-half loss increase when zeroed")):
        plots.head_heatmap(values, ax=ax, title=title, centred=False, annotate=True,
                           vmin=min(0.0, float(np.min(values))))
    page.figure(fig, "final_scores", f"Per head [layer, head] after {cfg.steps} steps.")
    page.table(["head", "induction score", "previous-token score", "first-half loss, zeroed",
                "repeated-half loss, zeroed", "repeated-half loss increase"],
               [[_name(h), float(analysis["induction"][h]), float(analysis["previous_token"][h]),
                 float(analysis["ablated_loss_first"][h]), float(analysis["ablated_loss_repeated"][h]),
                 float(summary["ablation_increase"][h])] for h in heads],
               f"Unablated: first-half loss {float(analysis['loss_first']):.3f}, repeated-half loss "
               f"{float(analysis['loss_repeated']):.3f}. Zeroing a head sets its output z to 0 at every position "
               "(jinterp.Zero at blocks.L.attn.z with a head mask).")

    page.heading("Ablating heads")
    found = summary["induction_heads"]
    colours = {prev_head: "tab:blue"} | {head: "tab:red" for head in found}
    fig = plots.head_bars(summary["ablation_increase"], highlight=colours, ylabel="repeated-half loss increase (nats)",
                          title="Zero-ablating one head at a time").figure
    page.figure(fig, "ablation", f"Red: induction heads (layer 1, score above {cfg.threshold}); blue: the "
                f"previous-token head {_name(prev_head)}, which every induction head's keys depend on.")
    without = float(analysis["loss_repeated_without_induction_heads"])
    if found:
        page.text(f"Zeroing all induction heads at once ({', '.join(map(_name, found))}) raises the repeated-half "
                  f"loss from {float(analysis['loss_repeated']):.3f} to {without:.3f}: they back each other up, so "
                  "one head zeroed alone costs less.")

    page.heading("The circuit")
    example = np.asarray(results["example"])
    pattern = np.asarray(analysis["example_pattern"])  # [layer, head, query, key]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, head, title in ((axes[0], ind_head, "induction head"), (axes[1], prev_head, "previous-token head")):
        plots.heatmap(pattern[head[0], head[1]], ax=ax, cmap="Blues", vmin=0, vmax=1, aspect="equal",
                      xlabel="key position", ylabel="query position", title=f"{_name(head)} ({title})")
        ax.axhline(length - 0.5, color="orange", lw=0.8)
        ax.axvline(length - 0.5, color="orange", lw=0.8)
    page.figure(fig, "attention_patterns", f"Attention on one probe sequence: {length} random tokens (first "
                f"ones: {', '.join(map(str, example[:8]))}, ...) then their repeat (orange lines). The induction head "
                f"attends along the diagonal i -> i - {length - 1}, the previous-token head along i -> i - 1.")
    composition = np.asarray(analysis["k_composition"])
    initial = np.asarray(results["initial_k_composition"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, values, title in ((axes[0], initial, "at initialisation"), (axes[1], composition, "after training")):
        plots.heatmap(values, ax=ax, title=f"K-composition {title}", xlabel="layer-1 head", ylabel="layer-0 head",
                      vmin=min(0.0, float(values.min())), vmax=composition.max(), annotate=True)
    page.figure(fig, "k_composition", "How much each layer-0 head's output (OV) is read by each layer-1 head's "
                f"keys (QK). The previous-token head {_name(prev_head)} feeds the induction head {_name(ind_head)}: "
                f"K-composition {composition[prev_head[1], ind_head[1]]:.3f}, against {initial.mean():.3f} "
                "on average at initialisation.")

    if "llc" in results:
        llc_report(page, cfg, results, summary, heads)

    page.run_section(cfg, info, f"This run took {info['seconds']:.1f} s")
    page.write(directory / "report.html")

    scores = lambda key: {_name(h): float(analysis[key][h]) for h in heads}  # noqa: E731
    write_json(directory / "metrics.json", {
        "phase_change_step": summary["phase_change_step"],
        "phase_change_definition": "evaluation step ending the interval of steepest repeated-half loss drop per step",
        "phase_change_slope_per_step": summary["phase_change_slope"],
        "induction_score_above_threshold_step": summary["threshold_step"],
        "induction_head": _name(ind_head), "induction_heads": [_name(h) for h in summary["induction_heads"]],
        "previous_token_head": _name(prev_head),
        "final": {"loss_first": float(analysis["loss_first"]), "loss_repeated": float(analysis["loss_repeated"]),
                  "training_loss_last_eval_mean": float(train_loss[-cfg.eval_every:].mean()),
                  "induction_score": scores("induction"), "previous_token_score": scores("previous_token")},
        "ablation_repeated_loss_increase": {_name(h): float(summary["ablation_increase"][h]) for h in heads},
        "loss_repeated_without_induction_heads": float(analysis["loss_repeated_without_induction_heads"]),
        "k_composition_previous_to_induction": float(composition[prev_head[1], ind_head[1]]),
        "k_composition_initial_mean": float(initial.mean()),
        "config_hash": info.get("config_hash"), "seconds": info.get("seconds"),
        "training_seconds": info.get("steps", {}).get("model", {}).get("seconds"),
        **({"llc": llc_metrics(results["llc"], heads)} if "llc" in results else {})})


def llc_metrics(estimates: dict, heads: list) -> dict:
    values = {"step": estimates["step"].tolist(), "mean": estimates["mean"].tolist(), "std": estimates["std"].tolist(),
              "nbeta": float(estimates["nbeta"][0]), "diagnostics": llc.problems(estimates)}
    if "head_mean" in estimates:
        values["heads_final"] = {_name(h): float(estimates["head_mean"][-1][h]) for h in heads}
    return values


def llc_report(page: Report, cfg: Config, results: dict, summary: dict, heads: list) -> None:
    """The LLC over training, every head's refined LLC, and the sampler's diagnostics."""
    estimates, history = results["llc"], results["history"]
    steps = np.asarray(estimates["step"])
    page.heading("Local learning coefficient")
    page.text(f"The LLC (Lau et al. 2023, jinterp.llc) of the parameters every {cfg.llc_every} steps: SGLD with "
              f"{cfg.llc_chains} chains of {cfg.llc_draws} steps (step size {cfg.llc_step_size}, localisation gamma "
              f"{cfg.llc_gamma}, nbeta = n / log n = {float(estimates['nbeta'][0]):.1f} for n = {cfg.llc_examples} "
              f"training sequences, batches of {cfg.llc_batch_size}), the same random draws at every snapshot. "
              "A head's refined LLC samples only that head's W_Q, W_K, W_V and W_O.")
    ax = plots.estimates_over_training(
        steps, estimates["mean"], estimates["std"], label="LLC (mean ± std over chains)", ylabel="estimated LLC",
        title="LLC over training", beside_ylabel="repeated-half loss (nats)",
        beside={"repeated-half loss": (history["eval_step"], history["loss_repeated"])},
        marks={"phase change": (summary["phase_change_step"], "red")})
    page.figure(ax.figure, "llc", "Red: the phase change. The LLC counts the effective number of parameters the "
                "network's loss depends on around the snapshot.")
    if "head_mean" in estimates:
        per_head = np.asarray(estimates["head_mean"])
        ax = plots.curves(steps, {_name(h): per_head[:, h[0], h[1]] for h in heads}, ylabel="refined LLC",
                          title="Each head's refined LLC over training",
                          marks={"phase change": summary["phase_change_step"]},
                          styles={_name(h): {"marker": ".", "ls": "-" if h[0] else "--"} for h in heads})
        page.figure(ax.figure, "llc_heads", "Dashed: layer-0 heads; solid: layer-1 heads; red: the phase change.")
        analysis = results["analysis"]
        final_mean, final_std = np.asarray(estimates["head_mean"])[-1], np.asarray(estimates["head_std"])[-1]
        page.table(["head", "refined LLC", "std over chains", "induction score", "previous-token score"],
                   [[_name(h), float(final_mean[h]), float(final_std[h]), float(analysis["induction"][h]),
                     float(analysis["previous_token"][h])] for h in heads],
                   f"Refined LLC of each head at step {int(steps[-1])}.")
    page.table(["step", "LLC", "std over chains", "split R-hat", "loss at the snapshot (nats)"],
               [[int(s), float(m), float(d), float(r), float(i)] for s, m, d, r, i in
                zip(steps, estimates["mean"], estimates["std"], llc.rhats(estimates), estimates["init_loss"])])
    found = llc.problems(estimates)
    page.text("Sampler diagnostics: " + ("; ".join(found) if found else llc.NO_PROBLEMS))


EXPERIMENT = Experiment("induction", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
