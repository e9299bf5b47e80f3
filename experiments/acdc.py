"""ACDC (Conmy et al. 2023) on the induction task: train the 2-layer attention-only induction model (as
``jinterp run induction`` does), then find its circuit with jinterp.acdc, each receiver's edge trials one
vmapped program and one checkpoint, so a run resumes receiver by receiver after any interruption.

Task: sequences of random tokens followed by their repeat (clean) against the same sequences with
another random first half (corrupted: the second half repeats nothing); the metric is the KL divergence
of the full model's next-token distribution on the clean repeated half from the circuit's. The report
draws the circuit by layer with edges by effect, lists the kept edges, and sets them beside the
K-composition scores read off the weights (jinterp.qkov).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import jinterp
from experiments import induction
from jinterp import acdc, plots, qkov
from jinterp.circuits import Graph
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option
from jinterp.train import train


@dataclass(frozen=True)
class Config:
    """The defaults train the induction experiment's default model (2,000 steps, about 6 minutes on 2 CPU
    cores) and run ACDC on 8 sequences (about a minute)."""

    seed: int = option(0, "seed of the model, its training data, and the ACDC sequences")
    vocab: int = option(128, "number of token ids")
    n_ctx: int = option(64, "training sequence length")
    d_model: int = option(64, "residual stream width")
    n_heads: int = option(4, "attention heads per layer")
    min_segment: int = option(4, "shortest repeated segment in the training data")
    max_segment: int = option(32, "longest repeated segment in the training data")
    steps: int = option(2000, "optimizer steps")
    batch_size: int = option(128, "training sequences per step")
    learning_rate: float = option(1e-3, "AdamW learning rate")
    checkpoint_every: int = option(500, "steps between training checkpoints")
    sequences: int = option(8, "sequences ACDC runs on (clean and corrupted)")
    length: int = option(16, "random tokens per sequence before their repeat")
    tau: float = option(0.1, "ACDC threshold: an edge whose removal raises the KL by less than this is removed")


def _induction_config(cfg: Config) -> induction.Config:
    return induction.Config(seed=cfg.seed, vocab=cfg.vocab, n_ctx=cfg.n_ctx, d_model=cfg.d_model, n_heads=cfg.n_heads,
                            min_segment=cfg.min_segment, max_segment=cfg.max_segment, steps=cfg.steps,
                            batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, eval_every=cfg.checkpoint_every,
                            checkpoint_every=cfg.checkpoint_every, llc_every=0)


def check(cfg: Config) -> None:
    induction.check(_induction_config(cfg))
    if not 2 <= 2 * cfg.length <= cfg.n_ctx:
        raise ValueError(f"length={cfg.length}: a sequence and its repeat (2 x length) must fit n_ctx={cfg.n_ctx}")
    if cfg.sequences < 1 or cfg.tau < 0:
        raise ValueError(f"sequences must be positive and tau >= 0, got sequences={cfg.sequences}, tau={cfg.tau}")


def task(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Clean: ``length`` random tokens and their repeat; corrupted: another random first half."""
    key = jax.random.fold_in(jax.random.key(cfg.seed), 21)
    clean = np.asarray(induction.repeated_sequences(key, cfg.sequences, cfg.length, cfg.vocab))
    corrupted = clean.copy()
    corrupted[:, :cfg.length] = np.random.default_rng(cfg.seed).integers(0, cfg.vocab, (cfg.sequences, cfg.length))
    return clean, corrupted


def compute(run: Run) -> dict:
    cfg: Config = run.config
    check(cfg)
    ind = _induction_config(cfg)
    k_model, k_data, _ = jax.random.split(jax.random.key(cfg.seed), 3)
    model = jinterp.Transformer.init(induction.model_config(ind), k_model)
    data = induction.SegmentBatches(k_data, cfg.batch_size, cfg.n_ctx, cfg.vocab, cfg.min_segment, cfg.max_segment)
    trained = train(model, induction.next_token_loss, optax.adamw(cfg.learning_rate, weight_decay=ind.weight_decay),
                    data, steps=cfg.steps, eval_every=cfg.checkpoint_every, run=run, name="model",
                    checkpoint_every=cfg.checkpoint_every, description="acdc: training the induction model")
    model = trained.params
    clean, corrupted = task(cfg)
    positions = list(range(cfg.length, 2 * cfg.length))  # the repeated half
    result = acdc.acdc(model, clean, corrupted, cfg.tau, logit_positions=positions, progress=not run.quiet,
                       step=run.step)
    return {"circuit": result.circuit, "effects": result.effects, "metric": np.float64(result.metric),
            "metric_full": np.float64(result.metric_full), "metric_empty": np.float64(result.metric_empty),
            "trials": np.int64(result.trials), "forwards": np.int64(result.forwards),
            "k_composition": np.asarray(qkov.composition_scores(model, "k")),
            "previous_token": np.asarray(induction.evaluate(model, _probe(cfg))["previous_token"]),
            "clean": clean, "corrupted": corrupted}


def _probe(cfg: Config):
    return induction.repeated_sequences(jax.random.key(cfg.seed + 1), 16, cfg.length, cfg.vocab)


def summarise(cfg: Config, results: dict) -> dict:
    graph = Graph.of(induction.model_config(_induction_config(cfg)))
    circuit, effects = np.asarray(results["circuit"], bool), np.asarray(results["effects"])
    edges = sorted(((graph.upstream[u], graph.downstream[d], float(effects[u, d]))
                    for u, d in zip(*np.nonzero(circuit))), key=lambda e: -abs(e[2]))
    previous = int(np.argmax(np.asarray(results["previous_token"])[0]))
    k_edges = [e for e in edges if e[1].endswith(".k")]
    return {"tau": cfg.tau, "edges": len(edges), "of": graph.n_edges,
            "kl_circuit": float(results["metric"]), "kl_full": float(results["metric_full"]),
            "kl_empty": float(results["metric_empty"]), "trials": int(results["trials"]),
            "previous_token_head": f"L0H{previous}",
            "key_edges_from_previous_token_head": [f"{u}->{d}" for u, d, _ in k_edges if u == f"L0H{previous}"],
            "kept_edges": [{"edge": f"{u}->{d}", "effect": e} for u, d, e in edges]}


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    summary = summarise(cfg, results)
    graph = Graph.of(induction.model_config(_induction_config(cfg)))
    page = Report("ACDC on the induction model", directory / "plots")
    page.text(f"ACDC at tau = {cfg.tau} keeps {summary['edges']} of {summary['of']} edges: the circuit's KL to the "
              f"full model on the repeated half is {summary['kl_circuit']:.4f} nats (every edge: "
              f"{summary['kl_full']:.2g}; none: {summary['kl_empty']:.3f}), after {summary['trials']} edge trials. "
              f"The previous-token head "
              f"{summary['previous_token_head']} feeds the keys of: "
              f"{', '.join(summary['key_edges_from_previous_token_head']) or 'none'}.")
    page.heading("The circuit")
    fig, ax = plt.subplots(figsize=(9, 6))
    plots.circuit_graph(results["circuit"], graph, results["effects"], ax=ax,
                        title=f"ACDC circuit, tau = {cfg.tau}: {summary['edges']} edges")
    page.figure(fig, "circuit", "Writers and readers of one head share a node; arrows from writer to reader, width "
                "and colour by the KL increase measured when the edge was tried; labels: the reader (q, k, v).")
    page.table(["edge", "KL increase when removed"], [[e["edge"], e["effect"]] for e in summary["kept_edges"]],
               "Kept edges by the effect their trial measured")
    page.heading("Beside the weights: K-composition")
    k = np.asarray(results["k_composition"])[0, :, 1, :]
    fig, ax = plt.subplots(figsize=(5, 4))
    plots.heatmap(k, ax=ax, xlabel="layer-1 head", ylabel="layer-0 head", annotate=True,
                  title="K-composition (jinterp.qkov)")
    page.figure(fig, "k_composition", "How much of each layer-0 head's output each layer-1 head's keys read.")
    page.run_section(cfg, info, f"This run took {info['seconds']:.1f} s")
    page.write(directory / "report.html")
    write_json(directory / "metrics.json", summary | {"seconds": info.get("seconds"),
                                                       "config_hash": info.get("config_hash")})


EXPERIMENT = Experiment("acdc", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
