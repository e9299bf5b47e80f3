"""Model diffing with a crosscoder: SmolLM2-135M fine-tuned on a narrow synthetic domain, then one
crosscoder over the base and fine-tuned models' residual streams, whose fine-tune-only latents
should say what the fine-tune added.

The domain: generated catalogue lines ("Item 17: the copper lantern costs 42 credits and ships from
Oslo."), a format and vocabulary the base model has to guess at. The fine-tune (``jinterp.train``,
Adam on every weight) sees the domain lines mixed with as many general-text sequences (standard-
library docstrings: replay, so that it changes the model on the domain only), and is measured by the
next-token loss on held-out domain lines (down) and on docstrings of held-out modules (general text:
about flat). The crosscoder then reads both models at one site on a mix of domain and general text:
both models' activations on the same tokens, computed once (``CrosscoderActivations.all``) and
trained on for many steps. The report shows the relative decoder norm histogram, the most
fine-tune-leaning latents that fire on held-out domain text (highest relative norm first) with their
contexts in a feature dashboard, latent scaling of those latents, and a steering check: on held-out
domain text, the base model with the latent's fine-tune decoder direction added at the site, at each
token times the latent's activation there, compared with the fine-tune by KL divergence (lower is
closer), for each latent and for all of them together.
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

import jinterp
from experiments.stdlib_text import is_held_out, stdlib_documents, windows
from jinterp import sae as saes
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option
from jinterp.sae.evaluation import next_token_loss
from jinterp.train import shuffled_batches, train

ITEMS = ["lantern", "compass", "kettle", "anchor", "violin", "teapot", "saddle", "helmet", "mirror", "ladder"]
MATERIALS = ["copper", "oak", "glass", "iron", "silver", "bamboo", "marble", "wool"]
CITIES = ["Oslo", "Lima", "Hanoi", "Quito", "Perth", "Dakar", "Riga", "Cusco"]


def domain_lines(n: int, seed: int) -> list[str]:
    """``n`` catalogue lines drawn with ``seed`` (the held-out lines use another seed)."""
    rng = np.random.default_rng(seed)
    return [f"Item {rng.integers(1, 100)}: the {rng.choice(MATERIALS)} {rng.choice(ITEMS)} costs "
            f"{rng.integers(2, 500)} credits and ships from {rng.choice(CITIES)}." for _ in range(n)]


@dataclass(frozen=True)
class Config:
    model: str = option("smollm2-135m", "registered name, .gguf file or HF-format directory")
    seq_len: int = option(64, "tokens per sequence (BOS included)")
    domain_lines: int = option(4000, "generated domain lines to fine-tune on")
    finetune_steps: int = option(150, "fine-tuning steps")
    finetune_batch: int = option(8, "sequences per fine-tuning step (half domain, half general text)")
    finetune_lr: float = option(3e-5, "fine-tuning Adam learning rate")
    site: str = option("blocks.25.resid_post", "the site the crosscoder reads in both models")
    sequences: int = option(1000, "sequences (half domain, half general) whose activations the crosscoder trains on")
    architecture: str = option("relu", "crosscoder variant: relu (L1 on decoder norms, Lindsey et al.) or batchtopk")
    d_sae: int = option(2304, "crosscoder latents")
    k: int = option(32, "latents per token (batchtopk)")
    l1_coefficient: float = option(3.0, "L1 penalty on latents times their decoder norms (relu)")
    steps: int = option(4000, "crosscoder steps")
    batch_size: int = option(1024, "activations per crosscoder step")
    lr: float = option(4e-4, "crosscoder Adam learning rate")
    held_out: int = option(32, "held-out sequences of each kind (domain, general)")
    latents_shown: int = option(8, "fine-tune-only latents reported")
    eval_every: int = option(50, "evaluate (and checkpoint) the fine-tune every this many steps")
    crosscoder_eval_every: int = option(500, "evaluate (and checkpoint) the crosscoder every this many steps")
    seed: int = option(0, "seed of the data, the training orders and the initialisations")


def make_data(tokenizer, cfg: Config) -> dict:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def with_bos(texts):
        body = windows(tokenizer, texts, cfg.seq_len - 1)
        return np.concatenate([np.full((len(body), 1), bos, np.int32), body], axis=1)

    documents = stdlib_documents()
    general = with_bos([documents[n] for n in documents if not is_held_out(n, 0.2)])
    general_held = with_bos([documents[n] for n in documents if is_held_out(n, 0.2)])
    domain = with_bos(domain_lines(cfg.domain_lines, cfg.seed))
    domain_held = with_bos(domain_lines(max(cfg.held_out * 8, 64), cfg.seed + 1))
    for name, array in {"domain": domain_held, "general": general_held}.items():
        if len(array) < cfg.held_out:
            raise ValueError(f"held_out={cfg.held_out}: only {len(array)} held-out {name} sequences")
    rng = np.random.default_rng(cfg.seed)
    mixed = np.concatenate([domain, general[rng.permutation(len(general))[:len(domain)]]])
    half = min(cfg.sequences // 2, len(domain))
    sample = np.concatenate([domain[rng.permutation(len(domain))[:half]],
                             general[rng.permutation(len(general))[:cfg.sequences - half]]])
    return {"mixed": mixed, "sample": sample, "domain_held_out": domain_held[:cfg.held_out],
            "general_held_out": general_held[rng.permutation(len(general_held))[:cfg.held_out]]}


class Sequences(eqx.Module):
    tokens: jax.Array
    batch_size: int = eqx.field(static=True)
    seed: int = eqx.field(static=True)

    def __call__(self, step):
        return self.tokens[shuffled_batches(len(self.tokens), self.batch_size, self.seed)(step)]


def lm_loss(model, tokens):
    logits, _ = jinterp.run(model, tokens)
    total, count = next_token_loss(logits, tokens)
    return total / count


@eqx.filter_jit
def _losses(model, tokens):
    logits, _ = jinterp.run(model, tokens)
    return next_token_loss(logits, tokens)


def mean_loss(model, tokens, batch: int = 8) -> float:
    total = count = 0.0
    for i in range(0, len(tokens), batch):
        t, c = _losses(model, jnp.asarray(tokens[i:i + batch]))
        total, count = total + float(t), count + float(c)
    return total / count


@eqx.filter_jit
def _kl(model, reference_logits, tokens, edits):
    logits, _ = jinterp.run(model, tokens, edits=edits)
    p = jax.nn.log_softmax(reference_logits[:, 1:].astype(jnp.float32), -1)
    q = jax.nn.log_softmax(logits[:, 1:].astype(jnp.float32), -1)
    return jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1))


def compute(run: Run) -> dict:
    cfg: Config = run.config
    base, tokenizer = jinterp.load(cfg.model, progress=not run.quiet)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} comes without a tokenizer; the diffing experiment needs one")
    data = run.step("data", lambda: make_data(tokenizer, cfg))
    domain_held, general_held = data["domain_held_out"], data["general_held_out"]

    tuned = train(base, lm_loss, optax.adam(cfg.finetune_lr),
                  Sequences(jnp.asarray(data["mixed"]), cfg.finetune_batch, cfg.seed), steps=cfg.finetune_steps,
                  eval_every=cfg.eval_every, run=run, name="finetune", progress=not run.quiet)
    fine_tuned = tuned.params
    losses = run.step("losses", lambda: {
        f"{model}_{kind}": np.float64(mean_loss(m, tokens)) for model, m in (("base", base), ("fine_tune", fine_tuned))
        for kind, tokens in (("domain", domain_held), ("general", general_held))})

    def both(tokens):  # [n_tokens, 2, d_model]: both models at the site, BOS left out
        return saes.CrosscoderActivations((base, fine_tuned), jnp.asarray(tokens), cfg.site,
                                          sequences_per_batch=min(8, len(tokens)), skip=1,
                                          tokenizers=(tokenizer, tokenizer)).all()

    activations = run.step("activations", lambda: {"both": np.asarray(both(data["sample"]))})["both"]
    options = dict(k=cfg.k) if cfg.architecture == "batchtopk" else dict(l1_coefficient=cfg.l1_coefficient)
    trained = saes.train_crosscoder(activations, cfg.architecture, cfg.d_sae, steps=cfg.steps,
                                    batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, site=cfg.site,
                                    eval_every=cfg.crosscoder_eval_every, run=run, name="crosscoder",
                                    progress=not run.quiet, **options)
    cc = trained.crosscoder
    saes.save_crosscoder(cc, run.directory / CROSSCODER_DIRECTORY, model_names=(cfg.model, f"{cfg.model}-fine-tune"))

    def analyse():
        held = both(domain_held)
        latents = np.asarray(cc.encode(held))
        relative = np.asarray(cc.relative_norms())
        frequency = (latents > 0).mean(0)
        # The most fine-tune-leaning latents among those firing on domain text (relative norm, highest first).
        firing = np.flatnonzero(frequency > 0)
        shown = firing[np.argsort(-relative[firing], kind="stable")][:cfg.latents_shown]
        scaling = saes.latent_scaling(cc, held, shown)
        # Steering: the base plus each latent's fine-tune decoder direction, at every token times the
        # latent's activation there (what the latent writes into the fine-tune), alone and all together.
        tokens = jnp.asarray(domain_held)
        reference, _ = jax.jit(lambda t: jinterp.run(fine_tuned, t))(tokens)
        per_token = latents.reshape(len(domain_held), cfg.seq_len - 1, -1)  # (BOS was left out)

        def steered(chosen):
            writes = np.einsum("bsl,ld->bsd", per_token[:, :, chosen], np.asarray(cc.W_dec[chosen, 1]))
            vector = np.concatenate([np.zeros_like(writes[:, :1]), writes], 1)
            return float(_kl(base, reference, tokens, (jinterp.Add(cfg.site, vector),)))

        return {"relative_norms": relative, "frequency_domain": frequency, "shown": shown.astype(np.int64),
                "nu_error": scaling.nu_error, "nu_reconstruction": scaling.nu_reconstruction,
                "kl_base": np.float64(_kl(base, reference, tokens, ())),
                "kl_steered": np.asarray([steered([latent]) for latent in shown], np.float64).reshape(-1),
                "kl_steered_all": np.float64(steered(list(shown)) if len(shown) else np.nan),
                "classes": {name: np.int64(len(v)) for name, v in saes.relative_norm_classes(cc).items()}}

    analysis = run.step("analysis", analyse)
    saes.dashboard(cc, (base, fine_tuned), domain_held, run.directory / "dashboard.html",
                   latents=np.asarray(analysis["shown"]) if len(analysis["shown"]) else None,
                   n_contexts=min(5, len(domain_held)), token_strings=tokenizer, window=12)
    return {"finetune_history": tuned.history, "crosscoder_history": trained.history, "losses": losses,
            "analysis": analysis}


CROSSCODER_DIRECTORY = "crosscoder"


def summarise(results: dict) -> dict:
    losses, analysis = results["losses"], results["analysis"]
    return {"losses": {k: float(v) for k, v in losses.items()},
            "explained_variance": float(results["crosscoder_history"]["explained_variance"][-1]),
            "classes": {k: int(v) for k, v in analysis["classes"].items()},
            "shown": [int(i) for i in analysis["shown"]], "kl_base": float(analysis["kl_base"]),
            "kl_steered": [float(v) for v in analysis["kl_steered"]],
            "kl_steered_all": float(analysis["kl_steered_all"])}


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    summary = summarise(results)
    losses, analysis = summary["losses"], results["analysis"]
    page = Report(f"Model diffing: {cfg.model} vs its fine-tune at {cfg.site}", directory / "plots")
    variant = f"BatchTopK (k = {cfg.k})" if cfg.architecture == "batchtopk" else f"L1 ({cfg.l1_coefficient})"
    page.text(f"Fine-tuned {cfg.finetune_steps} steps on generated catalogue lines mixed with general text: held-out "
              f"domain loss {losses['base_domain']:.3f} -> {losses['fine_tune_domain']:.3f} nats, general text "
              f"(standard-library docstrings of held-out modules) {losses['base_general']:.3f} -> "
              f"{losses['fine_tune_general']:.3f}. A {variant} crosscoder of {cfg.d_sae} latents ({cfg.steps} steps "
              f"on {cfg.sequences} sequences' activations) explains {summary['explained_variance']:.3f} of the "
              f"variance of both models' activations.")
    page.heading("Relative decoder norms")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(np.asarray(analysis["relative_norms"]), bins=40, range=(0, 1))
    ax.set(xlabel="|d_fine_tune| / (|d_base| + |d_fine_tune|)", ylabel="latents", yscale="log",
           title=", ".join(f"{k}: {v}" for k, v in summary["classes"].items()))
    page.figure(fig, "relative_norms", "0: base-only latents, 1/2: shared, 1: fine-tune-only")
    page.heading("Fine-tune-only latents on held-out domain text")
    rows = [[int(latent), float(analysis["relative_norms"][latent]), float(analysis["frequency_domain"][latent]),
             float(ne), float(nr), float(kl)]
            for latent, ne, nr, kl in zip(analysis["shown"], analysis["nu_error"], analysis["nu_reconstruction"],
                                         analysis["kl_steered"])]
    page.table(["latent", "relative norm", "domain frequency", "nu_error", "nu_reconstruction",
                "KL(fine-tune || steered base)"], rows,
               f"KL(fine-tune || base) without steering: {summary['kl_base']:.4f}; with all of these latents "
               f"together: {summary['kl_steered_all']:.4f}; their contexts: dashboard.html")
    page.run_section(cfg, info, f"This run took {info['seconds']:.1f} s")
    page.write(directory / "report.html")
    write_json(directory / "metrics.json", summary | {"seconds": info.get("seconds"),
                                                      "config_hash": info.get("config_hash")})


EXPERIMENT = Experiment("diffing", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
