"""Linear probes for the parity of a number, layer by layer: where does a pretrained decoder
hold "the number just written is odd", and is a probe reading it or memorising numbers?

Prompts end in a number and a counted object, ``She bought 37 apples``; the label is the
number's parity. SmolLM2's tokenizer writes a number digit by digit, so at the number's last
token (``7``) parity is a function of the token itself: a probe on the embeddings reads it
perfectly. At the next token (`` apples``) the embedding knows nothing of the number: whatever a
probe finds there, attention moved there.

Each site gets three probes, each at both positions, all with the same split of prompts:
``parity``; ``control``, the Hewitt & Liang (2019) control task: every number gets a random
label of its own (half of the numbers each way), which a probe can only fit by telling numbers
apart and memorising them, so the gap between the two (the *selectivity*) is what parity adds
over number identity; and ``parity, unseen numbers``: parity with whole numbers held out, which
a probe memorising numbers cannot do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import jinterp
from jinterp import plots, probes
from jinterp.patching import Chunks
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option

TEMPLATES = ("I counted {number} {object}", "There were {number} {object}", "She bought {number} {object}",
             "In the old box we found {number} {object}", "Yesterday the farmer sold {number} {object}",
             "He has {number} {object}", "On the shelf there are {number} {object}", "They lost {number} {object}")
OBJECTS = ("apples", "books", "cars", "birds", "coins", "chairs", "boxes", "eggs", "cats", "dogs", "trees", "stones",
           "cups", "shirts", "bottles", "cookies", "pens", "flowers", "tickets", "houses", "horses", "letters",
           "rings", "keys", "bags", "phones", "cakes", "balls")
POSITIONS = ("number", "next")  # the number's last token; the token after it
PROBES = ("parity", "control", "parity_unseen_numbers")
PROBE_TITLES = {"parity": "parity", "control": "control task (random label per number)",
                "parity_unseen_numbers": "parity, unseen numbers held out"}
SPLITS = ("train", "held_out")


@dataclass(frozen=True)
class Config:
    model: str = option("smollm2-135m", "registered name, .gguf file or HF-format directory")
    n_prompts: int = option(900, "number of prompts")
    low: int = option(10, "smallest number written")
    high: int = option(99, "largest number written (numbers repeat across prompts: the control task needs that)")
    site: str = option("resid_post", "block site probed at every layer (the embeddings are probed too)")
    layers: tuple[int, ...] | None = option(None, "probe only these layers (default: all)")
    held_out: float = option(0.2, "fraction of prompts (or, for unseen numbers, of numbers) held out")
    steps: int = option(300, "Adam steps per probe")
    learning_rate: float = option(1e-2, "Adam learning rate")
    batch_size: int = option(256, "prompts per probe training step")
    weight_decay: float = option(1e-3, "L2 penalty on the standardised probe weights")
    collect_batch: int = option(32, "prompts per forward pass when collecting activations")
    seed: int = option(0, "seed of the prompts, the control labels and the splits")


# Prompts ------------------------------------------------------------------------------------------

def make_prompts(tokenizer, cfg: Config) -> dict:
    """Prompts ``... {number} {object}``, their tokens (right-padded) and mask, the numbers, the
    parity and control labels, and the positions probed (``[n, 2]``: last digit, object)."""
    if not 0 <= cfg.low < cfg.high:
        raise ValueError(f"need 0 <= low < high, got low={cfg.low}, high={cfg.high}")
    if cfg.n_prompts < 10:
        raise ValueError(f"n_prompts must be at least 10 to train and hold out probes, got {cfg.n_prompts}")
    objects = [o for o in OBJECTS if len(tokenizer.encode(" " + o, prepend_bos=False)) == 1]
    if not objects:
        raise ValueError("this tokenizer has no single-token object among " + ", ".join(OBJECTS))
    rng = np.random.default_rng(cfg.seed)
    numbers = rng.integers(cfg.low, cfg.high + 1, cfg.n_prompts)
    texts = [TEMPLATES[rng.integers(len(TEMPLATES))].format(number=n, object=objects[rng.integers(len(objects))])
             for n in numbers]
    batch = tokenizer(texts)
    for text, number, row, mask in zip(texts, numbers, batch.tokens, batch.attention_mask):
        last_digit, after = tokenizer.to_str_tokens(row[mask][-2:])
        if last_digit != str(number)[-1] or after != " " + text.rsplit(" ", 1)[1]:
            raise ValueError(f"{text!r} does not end in a last-digit token and an object token "
                             f"(its last tokens are {last_digit!r}, {after!r}); this probe needs a tokenizer "
                             "that writes numbers digit by digit")
    # The control task: a random label per number, half of the numbers each way.
    distinct = np.arange(cfg.low, cfg.high + 1)
    control = rng.permutation(np.arange(len(distinct)) % 2)[numbers - cfg.low]
    return {"texts": texts, "tokens": batch.tokens, "attention_mask": batch.attention_mask,
            "numbers": numbers, "labels": {"parity": numbers % 2, "control": control},
            "positions": np.tile([-2, -1], (cfg.n_prompts, 1))}


# Computation --------------------------------------------------------------------------------------

def compute(run: Run) -> dict:
    cfg: Config = run.config
    model, tokenizer = jinterp.load(cfg.model, progress=not run.quiet)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} comes without a tokenizer; the probing prompts need one")
    prompts = make_prompts(tokenizer, cfg)
    layers = range(model.cfg.n_layers) if cfg.layers is None else cfg.layers
    wanted = ["embed"] + [f"blocks.{layer}.{cfg.site}" for layer in layers]
    sites = list(jinterp.specs.match(jinterp.sites(model), wanted))

    @functools.cache  # collected on first need only: a resumed run whose probes are all saved skips it
    def features():
        return probes.collect(model, prompts["tokens"], sites, prompts["positions"],
                              attention_mask=prompts["attention_mask"], batch_size=cfg.collect_batch,
                              progress=not run.quiet)

    def fit(x, task: str):
        labels = prompts["labels"]["control" if task == "control" else "parity"]
        groups = prompts["numbers"] if task == "parity_unseen_numbers" else None
        return probes.train_probe(x.reshape(len(x), -1), labels, n_classes=2, held_out=cfg.held_out, groups=groups,
                                  steps=cfg.steps, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                                  weight_decay=cfg.weight_decay, seed=cfg.seed, progress=False)

    def probe_site(i: int) -> np.ndarray:
        """Accuracies ``[position, probe, split]`` of one site."""
        x = features()[sites[i]]  # [n, 2 positions, ...]
        return np.array([[[(t := fit(x[:, p], task)).train_accuracy, t.held_out_accuracy] for task in PROBES]
                         for p in range(len(POSITIONS))], np.float32)

    accuracy = run.chunked("probes", Chunks(len(sites), probe_site, np.stack, "probes by site"))

    def chance():
        """The majority label's share of each probe's held-out set (the splits do not depend on the site)."""
        n = cfg.n_prompts
        groups = {"parity_unseen_numbers": prompts["numbers"]}
        rates = []
        for task in PROBES:
            labels = prompts["labels"]["control" if task == "control" else "parity"]
            held = probes.split(n, cfg.held_out, cfg.seed, groups.get(task))[1]
            rates.append(max(labels[held].mean(), 1 - labels[held].mean()))
        return np.array(rates, np.float32)

    return {"texts": prompts["texts"], "numbers": prompts["numbers"], "control": prompts["labels"]["control"],
            "sites": sites, "accuracy": accuracy,
            "chance": run.step("chance", chance), "architecture": model.cfg.architecture}


# Report -------------------------------------------------------------------------------------------

def site_labels(sites) -> list[str]:
    return ["emb" if s == "embed" else s.split(".")[1] for s in sites]


def _site_ticks(ax, labels: list[str]) -> None:
    step = max(1, len(labels) // 12)
    ax.set_xticks(range(0, len(labels), step), labels[::step])


def summarise(results: dict) -> dict:
    """Per position: each probe's train and held-out accuracy by site, the selectivity, the best site."""
    accuracy = np.asarray(results["accuracy"], float)  # [site, position, probe, split]
    sites = list(results["sites"])
    summary = {}
    for p, position in enumerate(POSITIONS):
        by_probe = {task: {split: accuracy[:, p, k, s].tolist() for s, split in enumerate(SPLITS)}
                    for k, task in enumerate(PROBES)}
        selectivity = accuracy[:, p, 0, 1] - accuracy[:, p, 1, 1]
        best = int(np.argmax(accuracy[:, p, 0, 1]))
        summary[position] = {**by_probe, "selectivity": selectivity.tolist(),
                             "best_site": sites[best], "best_parity_held_out": float(accuracy[best, p, 0, 1]),
                             "best_selectivity_site": sites[int(np.argmax(selectivity))],
                             "best_selectivity": float(selectivity.max())}
    return summary


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    summary = summarise(results)
    labels = site_labels(results["sites"])
    chance = dict(zip(PROBES, np.asarray(results["chance"], float).tolist()))
    page = Report(f"Linear probes for number parity: {cfg.model}", directory / "plots")

    page.heading("Task")
    page.text(f"{cfg.n_prompts} prompts, each ending in a number from {cfg.low} to {cfg.high} and a counted "
              "object. Label: the number's parity. Probes read the model's "
              f"{cfg.site} at every layer (and the embeddings) at two positions: the number's last digit, where "
              "parity is the token's own identity, and the object token after it, where the embedding knows "
              "nothing of the number. Probes: softmax regression on standardised features, "
              f"{cfg.steps} Adam steps (rate {cfg.learning_rate}, L2 {cfg.weight_decay}); {cfg.held_out:.0%} of "
              "the prompts held out (for 'unseen numbers', that share of the numbers).")
    page.table(["prompt", "number", "parity", "control label"],
               [[t, int(n), "odd" if n % 2 else "even", int(c)] for t, n, c in
                zip(results["texts"][:6], results["numbers"][:6], results["control"][:6])],
               "The first prompts; the control label is fixed per number and random")

    page.heading("Accuracy by layer")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colours = {"parity": "C0", "control": "C3", "parity_unseen_numbers": "C2"}
    for ax, position in zip(axes, POSITIONS):
        for task in PROBES:
            held_out, train = f"{PROBE_TITLES[task]}: held out", f"{PROBE_TITLES[task]}: train"
            plots.layer_curves({held_out: summary[position][task]["held_out"], train: summary[position][task]["train"]},
                               ax=ax, legend=False, styles={held_out: {"color": colours[task]},
                                                            train: {"ls": "--", "lw": 0.8, "color": colours[task],
                                                                    "marker": None}})
            ax.axhline(chance[task], color=colours[task], lw=0.7, ls=":", label="majority label")
        where = "the number's last digit" if position == "number" else "the token after the number"
        ax.set(title=f"At {where}", xlabel=f"{cfg.site} of layer (emb: embeddings)", ylim=(0.3, 1.02))
        _site_ticks(ax, labels)
    axes[0].set_ylabel("accuracy")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8,
               bbox_to_anchor=(0.5, -0.12))
    page.figure(fig, "accuracy_by_layer", "Held-out (solid) and training (dashed) accuracy of each probe; dotted: "
                "the share of the majority label in its held-out set. The control task measures how well a probe "
                "fits number identity alone.")

    fig, ax = plt.subplots(figsize=(8, 3.8))
    plots.layer_curves({f"at {position} token": summary[position]["selectivity"] for position in POSITIONS}, ax=ax,
                       xlabel=f"{cfg.site} of layer", ylabel="parity - control (held out)", title="Selectivity")
    ax.axhline(0, color="grey", lw=0.8)
    _site_ticks(ax, labels)
    page.figure(fig, "selectivity", "Held-out accuracy on parity minus that on the control task (Hewitt & Liang "
                "2019): high where the representation makes parity linear without making every number's identity so.")

    page.table(["site"] + [f"{position}: {name}" for position in POSITIONS
                           for name in ("parity", "control", "selectivity", "unseen numbers")],
               [[label] + [summary[position][key]["held_out"][i] if key in PROBES else summary[position][key][i]
                           for position in POSITIONS
                           for key in ("parity", "control", "selectivity", "parity_unseen_numbers")]
                for i, label in enumerate(labels)], "Held-out accuracy by site")
    page.table(["probe", "majority label share (held out)"], [[PROBE_TITLES[t], chance[t]] for t in PROBES])

    page.run_section(cfg, info, f"This run took {info.get('seconds', 0):.1f} s")
    page.write(directory / "report.html")

    write_json(directory / "metrics.json", {
        "sites": list(results["sites"]), "positions": summary, "chance": chance,
        "architecture": str(results["architecture"]), "config_hash": info.get("config_hash"),
        "seconds": info.get("seconds")})


EXPERIMENT = Experiment("probes", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
