"""The tuned lens (Belrose et al. 2023) against the logit lens: affine translators trained to
read each layer's residual stream out as the model's final distribution.

Text: docstrings of Python's standard library (real English prose shipped with Python),
gathered deterministically from the top-level modules' sources and split train/held-out by
module. Both lenses are scored by mean KL(final distribution || lens distribution) per layer on
held-out text; the untrained tuned lens is the logit lens, so the first evaluation is its score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optax

import jinterp
from experiments.stdlib_text import is_held_out, stdlib_documents, windows
from jinterp import plots, tuned_lens
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option


@dataclass(frozen=True)
class Config:
    model: str = option("smollm2-135m", "registered name, .gguf file or HF-format directory")
    seq_len: int = option(32, "tokens per training and held-out sequence")
    batch_size: int = option(2, "sequences per optimizer step")
    steps: int = option(40, "optimizer steps")
    lr: float = option(1e-3, "Adam learning rate")
    eval_every: int = option(20, "evaluate on held-out text (and checkpoint) every this many steps")
    held_out: int = option(8, "held-out sequences the lenses are scored on")
    held_out_fraction: float = option(0.2, "share of standard-library modules held out")
    min_words: int = option(12, "shortest docstring kept, in words")
    seed: int = option(0, "seed of the training order and of the held-out sequences drawn")


def make_data(tokenizer, cfg: Config) -> dict:
    """Training sequences (all of the training modules) and ``cfg.held_out`` held-out ones."""
    if not 0 < cfg.held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {cfg.held_out_fraction}")
    documents = stdlib_documents(cfg.min_words)
    held = [name for name in documents if is_held_out(name, cfg.held_out_fraction)]
    kept = [name for name in documents if name not in held]
    train_windows = windows(tokenizer, [documents[n] for n in kept], cfg.seq_len)
    test_windows = windows(tokenizer, [documents[n] for n in held], cfg.seq_len)
    if len(test_windows) < cfg.held_out or len(train_windows) < cfg.batch_size:
        raise ValueError(f"Too little text for seq_len={cfg.seq_len}: {len(train_windows)} training and "
                         f"{len(test_windows)} held-out sequences, need batch_size={cfg.batch_size} and "
                         f"held_out={cfg.held_out}")
    chosen = np.sort(np.random.default_rng(cfg.seed).permutation(len(test_windows))[: cfg.held_out])
    return {"train": train_windows, "held_out": test_windows[chosen], "train_modules": kept, "held_out_modules": held}


# Computation --------------------------------------------------------------------------------------

LENS_DIRECTORY = "tuned_lens"  # inside the run directory: the trained translators, for tuned_lens.load


def compute(run: Run) -> dict:
    cfg: Config = run.config
    model, tokenizer = jinterp.load(cfg.model, progress=not run.quiet)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} comes without a tokenizer; the tuned lens experiment needs one")
    data = run.step("data", lambda: make_data(tokenizer, cfg))
    held_out = np.asarray(data["held_out"])

    def evaluate(lens):  # at step 0 the lens is the identity: this is the logit lens's score
        return {"held_out_kl": tuned_lens.mean_layer_kl(lens, model, held_out, batch_size=cfg.batch_size)}

    lens = tuned_lens.TunedLens.init(model, cfg.model)
    trained = tuned_lens.fit(model, np.asarray(data["train"]), steps=cfg.steps, batch_size=cfg.batch_size,
                             optimizer=optax.adam(cfg.lr), seed=cfg.seed, lens=lens, evaluate=evaluate,
                             eval_every=cfg.eval_every, run=run, name="tuned_lens",
                             progress=not run.quiet)
    tuned_lens.save(trained.params, run.directory / LENS_DIRECTORY)
    kl = trained.history["held_out_kl"]
    return {"history": trained.history, "logit_lens_kl": kl[0], "tuned_lens_kl": kl[-1],
            "tokens": {"train_seen": np.int64(cfg.steps * cfg.batch_size * cfg.seq_len),
                       "train_available": np.int64(np.size(data["train"])), "held_out": np.int64(held_out.size)},
            "modules": {"train": list(data["train_modules"]), "held_out": list(data["held_out_modules"])},
            "train_seconds": np.float64(run.timings["tuned_lens"]["seconds"])}


# Report -------------------------------------------------------------------------------------------

def summarise(results: dict) -> dict:
    logit, tuned = np.asarray(results["logit_lens_kl"]), np.asarray(results["tuned_lens_kl"])
    return {"kl_logit_lens": logit.tolist(), "kl_tuned_lens": tuned.tolist(),
            "mean_kl_logit_lens": float(logit.mean()), "mean_kl_tuned_lens": float(tuned.mean()),
            "mean_improvement": float((logit - tuned).mean()),
            "mean_improvement_after_embeddings": float((logit - tuned)[1:].mean()),
            "layers_improved": int((tuned < logit).sum())}


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    summary = summarise(results)
    history = results["history"]
    layers = np.arange(len(summary["kl_logit_lens"]))
    page = Report(f"Tuned lens vs logit lens: {cfg.model}", directory / "plots")
    tokens = results["tokens"]
    page.text(f"{cfg.steps} Adam steps (lr {cfg.lr}) of {cfg.batch_size} x {cfg.seq_len} tokens "
              f"({int(tokens['train_seen'])} tokens seen of {int(tokens['train_available'])} available, from "
              f"{len(results['modules']['train'])} standard-library modules); scored on {int(tokens['held_out'])} "
              f"held-out tokens from {len(results['modules']['held_out'])} other modules. Mean KL over layers: "
              f"logit lens {summary['mean_kl_logit_lens']:.3f}, tuned lens {summary['mean_kl_tuned_lens']:.3f} nats "
              f"({summary['layers_improved']} of {len(layers)} layers improved).")

    page.heading("KL to the final distribution by layer")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kl in history["held_out_kl"][1:-1]:
        ax.plot(layers, kl, color="tab:orange", alpha=0.3, lw=0.8)
    plots.layer_curves({"logit lens": summary["kl_logit_lens"],
                        f"tuned lens (step {int(history['eval_step'][-1])})": summary["kl_tuned_lens"]}, ax=ax,
                       yscale="log", ylabel="KL(final || lens) [nats]", title="Held-out KL to the model's output")
    page.figure(fig, "kl_by_layer", "Mean over held-out positions; faint lines: the tuned lens at earlier "
                "evaluations. Layer 0 reads the embeddings.")

    page.heading("Training")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    plots.curves(np.arange(1, len(history["loss"]) + 1), {"loss": history["loss"]}, ax=ax[0], lw=0.8, yscale="log",
                 ylabel="KL summed over layers", title="Training loss (one batch per step)")
    plots.curves(history["eval_step"], {"held-out KL": np.asarray(history["held_out_kl"]).mean(1)}, ax=ax[1],
                 marker="o", yscale="log", ylabel="mean KL over layers", title="Held-out KL (step 0: logit lens)")
    page.figure(fig, "training", "Left: the training objective on each step's batch. Right: the held-out score.")

    page.table(["layer", "logit lens KL", "tuned lens KL", "ratio"],
               [[int(i), a, b, b / a] for i, a, b in zip(layers, summary["kl_logit_lens"], summary["kl_tuned_lens"])],
               "Held-out mean KL(final || lens) in nats, by the residual stream read (entering layer i)")

    page.run_section(cfg, info, f"Training took {float(results['train_seconds']):.0f} s; "
                                f"this run took {info['seconds']:.1f} s")
    page.text(f"The trained translators are in {LENS_DIRECTORY}/ (jinterp.tuned_lens.load(directory, model)).")
    page.write(directory / "report.html")
    write_json(directory / "metrics.json", summary | {
        "steps": cfg.steps, "tokens": {k: int(v) for k, v in tokens.items()},
        "train_seconds": float(results["train_seconds"]), "seconds": info.get("seconds"),
        "lens_directory": LENS_DIRECTORY, "config_hash": info.get("config_hash")})


EXPERIMENT = Experiment("tuned_lens", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
