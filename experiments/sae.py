"""A sparse autoencoder on SmolLM2-135M's residual stream, trained on activations streamed from
the model through a shuffle buffer, evaluated by reconstruction, sparsity, dead latents and the
cross-entropy loss recovered when it stands in for the residual stream.

Text: docstrings of Python's standard library (``experiments/stdlib_text.py``), split into
training and held-out text by module. Training activations are computed inside the training
step from a few training sequences at a time (the model cut after the SAE's layer), mixed in a
shuffle buffer, and never all held; the BOS position (whose activations are outliers) is left
out. Everything is measured on held-out text: explained variance, L0 and latent firing
frequencies over its activations; the next-token loss clean, with the SAE's reconstruction
spliced in (error dropped) and with the site zeroed; and, for a sample of latents, the held-out
contexts where each fires most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jinterp
from experiments.stdlib_text import is_held_out, stdlib_documents, windows
from jinterp import plots
from jinterp import sae as saes
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option


@dataclass(frozen=True)
class Config:
    model: str = option("smollm2-135m", "registered name, .gguf file or HF-format directory")
    site: str = option("blocks.15.resid_post", "the site the SAE reads (one layer)")
    architecture: str = option("topk", "relu, topk, batchtopk or jumprelu")
    d_sae: int = option(2304, "latents")
    k: int = option(32, "latents per token (topk, batchtopk)")
    steps: int = option(1500, "optimizer steps")
    batch_size: int = option(1024, "activations per optimizer step, drawn from the shuffle buffer")
    sequences_per_step: int = option(2, "training sequences run through the model per step (fresh activations)")
    shuffle_buffer: int = option(16384, "activations in the shuffle buffer")
    lr: float = option(4e-4, "Adam learning rate")
    seq_len: int = option(64, "tokens per sequence (BOS included)")
    eval_every: int = option(250, "evaluate (and checkpoint) every this many steps")
    held_out: int = option(64, "held-out sequences the SAE is scored on")
    held_out_fraction: float = option(0.2, "share of standard-library modules held out")
    latents_shown: int = option(12, "latents whose top held-out contexts the report lists")
    seed: int = option(0, "seed of the training order, the initialisation and the held-out sample")


def make_data(tokenizer, cfg: Config) -> dict:
    """Training and held-out sequences, each starting with BOS (the SAE skips that position)."""
    documents = stdlib_documents()
    held = [name for name in documents if is_held_out(name, cfg.held_out_fraction)]
    kept = [name for name in documents if name not in held]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def with_bos(names):
        body = windows(tokenizer, [documents[n] for n in names], cfg.seq_len - 1)
        return np.concatenate([np.full((len(body), 1), bos, np.int32), body], axis=1)

    train, test = with_bos(kept), with_bos(held)
    if len(test) < cfg.held_out:
        raise ValueError(f"held_out={cfg.held_out} asks for more held-out sequences than the {len(test)} there are")
    chosen = np.sort(np.random.default_rng(cfg.seed).permutation(len(test))[: cfg.held_out])
    return {"train": train, "held_out": test[chosen]}


def top_contexts(latents: np.ndarray, tokens: np.ndarray, tokenizer, chosen, per_latent: int = 5,
                 before: int = 10) -> dict:
    """The ``per_latent`` strongest activations of each chosen latent on ``tokens`` (``latents``:
    ``[n_seq * (seq - 1), d_sae]``, the BOS position skipped): latent, value, the preceding text
    and the token it fires on, as flat lists."""
    per_seq = tokens.shape[1] - 1
    found = {"latent": [], "value": [], "before": [], "token": []}
    for latent in chosen:
        values = latents[:, latent]
        for flat in np.argsort(-values)[:per_latent]:
            if values[flat] <= 0:
                break
            seq, pos = divmod(int(flat), per_seq)
            pos += 1  # the skipped BOS
            found["latent"].append(int(latent))
            found["value"].append(float(values[flat]))
            found["before"].append(_visible(tokenizer.decode(tokens[seq, max(1, pos - before):pos].tolist())))
            found["token"].append(_visible(tokenizer.decode([int(tokens[seq, pos])])))
    return {"latent": np.asarray(found["latent"], np.int64), "value": np.asarray(found["value"]),
            "before": found["before"], "token": found["token"]}


def _visible(text: str) -> str:
    """Line breaks shown as ⏎, so a context reads on one line."""
    return text.replace("\n", "⏎")


def compute(run: Run) -> dict:
    cfg: Config = run.config
    model, tokenizer = jinterp.load(cfg.model, progress=not run.quiet)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} comes without a tokenizer; the SAE experiment needs one")
    data = run.step("data", lambda: make_data(tokenizer, cfg))
    train_tokens, held_out = jnp.asarray(data["train"]), np.asarray(data["held_out"])
    source = saes.ModelActivations(model, train_tokens, cfg.site, sequences_per_batch=cfg.sequences_per_step,
                                   skip=1, seed=cfg.seed)
    test = saes.ModelActivations(model, jnp.asarray(held_out), cfg.site, sequences_per_batch=min(8, len(held_out)),
                                 skip=1)
    activations = test.all()  # [held_out * (seq_len - 1), d_in], sequence by sequence

    trained = saes.train_sae(source, cfg.architecture, cfg.d_sae, k=cfg.k if "topk" in cfg.architecture else None,
                             steps=cfg.steps, batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                             lr=cfg.lr, seed=cfg.seed, eval_every=cfg.eval_every, run=run, name="sae",
                             progress=not run.quiet)
    sae = trained.sae
    saes.save_saelens(sae, run.directory / SAE_DIRECTORY, model_name=cfg.model)

    def evaluate():  # the held-out latents are encoded once, for the metrics and the top contexts
        x = np.asarray(activations)
        latents = sae.encode(activations)
        error = np.sum((np.asarray(sae.decode(latents)) - x) ** 2, axis=-1)
        variance = np.sum((x - x.mean(0)) ** 2, axis=-1)
        latents = np.asarray(latents)
        losses = saes.splice_losses(model, sae, held_out, skip=1, batch_size=8, progress=not run.quiet)
        alive = np.flatnonzero((latents > 0).any(0))
        chosen = np.sort(np.random.default_rng(cfg.seed).choice(alive, min(cfg.latents_shown, len(alive)), False))
        return {"explained_variance": np.float64(1 - error.sum() / variance.sum()),
                "l0": np.float64((latents > 0).sum(-1).mean()),
                "frequency": (latents > 0).mean(0), "losses": losses.as_dict(), "chosen": chosen,
                "max_activation": latents.max(0), "contexts": top_contexts(latents, held_out, tokenizer, chosen)}

    evaluation = dict(run.step("evaluation", evaluate))
    contexts = evaluation.pop("contexts")
    return {"history": trained.history, "evaluation": evaluation, "input_scale": np.float64(trained.input_scale),
            "contexts": contexts,
            "train_seconds": np.float64(run.timings["sae"]["seconds"]),
            "tokens": {"fresh": np.int64(cfg.steps * source.batch_size), "served": np.int64(cfg.steps * cfg.batch_size),
                       "held_out": np.int64(activations.shape[0]), "train_available": np.int64(source.n_tokens)}}


SAE_DIRECTORY = "sae"  # inside the run directory, in SAELens' layout (jinterp.sae.load_saelens)


# Report -------------------------------------------------------------------------------------------

def summarise(cfg: Config, results: dict) -> dict:
    evaluation, history = results["evaluation"], results["history"]
    frequency = np.asarray(evaluation["frequency"])
    return {"explained_variance": float(evaluation["explained_variance"]), "l0": float(evaluation["l0"]),
            "dead_fraction_held_out": float((frequency == 0).mean()),
            "dead_fraction_training": float(history["dead_fraction"][-1]),
            **{f"loss_{k}": float(evaluation["losses"][k]) for k in ("clean", "spliced", "zero_ablated")},
            "ce_loss_recovered": float(evaluation["losses"]["ce_loss_recovered"]),
            "train_seconds": float(results["train_seconds"]),
            "tokens": {k: int(v) for k, v in results["tokens"].items()}}


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    summary = summarise(cfg, results)
    history, evaluation = results["history"], results["evaluation"]
    page = Report(f"Sparse autoencoder on {cfg.model} {cfg.site}", directory / "plots")
    tokens = summary["tokens"]
    k = f", k = {cfg.k}" if "topk" in cfg.architecture else ""
    page.text(f"A {cfg.architecture} SAE with {cfg.d_sae} latents{k} at {cfg.site}: {cfg.steps} Adam steps (lr "
              f"{cfg.lr}) of {cfg.batch_size} activations drawn from a shuffle buffer of {cfg.shuffle_buffer}, "
              f"refilled with {cfg.sequences_per_step} fresh sequences per step ({tokens['fresh']} activations "
              f"computed in all, each served {tokens['served'] / tokens['fresh']:.1f} times on average; "
              f"{tokens['train_available']} training tokens available). Scored on {tokens['held_out']} held-out "
              f"activations: explained variance {summary['explained_variance']:.3f}, L0 {summary['l0']:.1f}, "
              f"{100 * summary['dead_fraction_held_out']:.1f}% of latents never fire; next-token loss "
              f"{summary['loss_clean']:.3f} clean, {summary['loss_spliced']:.3f} with the SAE spliced in, "
              f"{summary['loss_zero_ablated']:.3f} with the site zeroed: "
              f"{100 * summary['ce_loss_recovered']:.1f}% of the cross-entropy loss recovered.")

    page.heading("Training")
    fig, ax = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    plots.curves(np.arange(1, len(history["loss"]) + 1), {"loss": history["loss"]}, ax=ax[0], lw=0.6, yscale="log",
                 ylabel="loss (normalised units)", title="Training loss")
    plots.curves(history["eval_step"], {"explained variance": history["explained_variance"]}, ax=ax[1], marker="o",
                 ylabel="explained variance", title="Explained variance (training sample)")
    plots.curves(history["eval_step"], {"L0": history["l0"],
                                        "dead latents": np.asarray(history["dead_fraction"]) * cfg.d_sae},
                 ax=ax[2], marker="o", styles={"dead latents": {"marker": "x"}}, title="Sparsity")
    page.figure(fig, "training", "Evaluations use a fixed sample of training activations; 'dead' counts "
                "latents that have not fired within the last million training activations.")

    page.heading("Latent firing frequencies on held-out text")
    frequency = np.asarray(evaluation["frequency"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(np.log10(frequency[frequency > 0]), bins=50)
    ax.set(xlabel="log10 firing frequency", ylabel="latents",
           title=f"{int((frequency == 0).sum())} latents never fire on held-out text")
    page.figure(fig, "frequencies", "Fraction of held-out activations on which each latent is nonzero.")

    page.heading("Where sampled latents fire most (held-out text)")
    contexts = results["contexts"]
    rows = [[int(latent), f"{frequency[int(latent)]:.4f}", float(value), f"{before}[{token}]"]
            for latent, value, before, token in zip(contexts["latent"], contexts["value"], contexts["before"],
                                                    contexts["token"])]
    page.table(["latent", "frequency", "activation", "context [token]"], rows,
               f"{cfg.latents_shown} latents drawn at random among those that fire; each one's strongest "
               "held-out activations, the token it fires on in brackets")

    page.run_section(cfg, info, f"Training took {summary['train_seconds']:.0f} s; this run took "
                                f"{info['seconds']:.1f} s")
    page.text(f"The SAE is in {SAE_DIRECTORY}/ in SAELens' layout (jinterp.sae.load_saelens, or SAELens itself).")
    page.write(directory / "report.html")
    write_json(directory / "metrics.json", summary | {"seconds": info.get("seconds"), "sae_directory": SAE_DIRECTORY,
                                                      "config_hash": info.get("config_hash")})


EXPERIMENT = Experiment("sae", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
