"""Indirect object identification (Wang et al. 2022) on a pretrained decoder, end to end with
jinterp's public API: generated prompts, logit differences, residual and head activation
patching, attribution patching against it, the logit lens, direct logit attribution, path
patching into the name movers, and ranked name-mover and S-inhibition candidates.

Prompts follow ``template`` with single-token names: the clean prompt's answer is the indirect
object (IO), ``When Mary and John went to the store, John gave a drink to`` -> `` Mary``. The
corrupted prompt swaps the second-clause subject (S2) for the IO, ``..., Mary gave a drink to``,
which flips the answer to `` John``: everything that carries "who is the subject" differs
between the two. The metric is the logit difference IO - S at the last position, averaged over
prompts; patching results are normalised so that 0 is the corrupted run and 1 the clean run.
Sweeps denoise (TransformerLens' convention: clean activation patched into the corrupted run);
path patching noises (as the IOI paper: corrupted sender into the clean run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jinterp
from jinterp import attribution, lens, patching, plots
from jinterp.report import Report, write_json
from jinterp.runs import Experiment, Run, option

NAMES = ("Mary", "John", "Tom", "James", "Anna", "Lisa", "David", "Paul", "Sarah", "Emma", "Mark", "Peter", "Laura",
         "Kate", "Steve", "Mike", "Alice", "Daniel", "Robert", "Jessica", "Emily", "Rachel", "Andrew", "Chris",
         "Jennifer", "Matthew", "Susan", "Thomas", "George", "Charles", "Henry", "Jack", "Sam", "Ben", "Amy",
         "Jane", "Grace", "Lucy", "Claire", "Martin", "Eric", "Ryan", "Adam", "Kevin", "Brian", "Richard")
PLACES = ("store", "park", "school", "beach", "office", "garden", "hospital", "restaurant", "station", "library",
          "market", "church", "house", "river", "zoo")
OBJECTS = ("drink", "book", "ball", "gift", "letter", "ring", "key", "bag", "phone", "pen", "ticket", "bottle",
           "cake", "flower", "computer", "basketball", "snack")


@dataclass(frozen=True)
class Config:
    model: str = option("smollm2-135m", "registered name, .gguf file or HF-format directory")
    n_prompts: int = option(32, "number of prompt pairs")
    seed: int = option(0, "seed of the names, places and objects drawn")
    template: str = option("When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to",
                           "prompt with {IO} once, {S} twice, {PLACE} and {OBJECT}")
    layers: tuple[int, ...] | None = option(None, "sweep only these layers (default: all)")
    chunk_size: int | None = option(None, "patches per sweep chunk, each checkpointed (default: as many as make "
                                          "full-size matrix products within the memory budget)")
    name_movers: int = option(3, "path patching receivers: the top name-mover candidates' queries")
    min_attention: float = option(0.1, "a candidate head attends from the end at least this much to IO / S2")
    path_prompts: int = option(8, "prompts used for path patching (its cost grows with the number of heads)")
    top_heads: int = option(10, "rows of the ranked head tables")


# Prompts ------------------------------------------------------------------------------------------

def single_tokens(tokenizer, words) -> list[str]:
    """The words that are one token with a leading space."""
    return [w for w in words if len(tokenizer.encode(" " + w, prepend_bos=False)) == 1]


def make_prompts(tokenizer, cfg: Config) -> dict:
    """Clean and corrupted prompts, token ids, answers and the positions of IO, S1, S2 and END."""
    for placeholder in ("{IO}", "{S}", "{PLACE}", "{OBJECT}"):
        if placeholder not in cfg.template:
            raise ValueError(f"template must contain {placeholder} (and {{S}} twice): {cfg.template!r}")
    if cfg.template.count("{IO}") != 1 or cfg.template.count("{S}") != 2:
        raise ValueError(f"template must contain {{IO}} once and {{S}} twice: {cfg.template!r}")
    names, places, objects = (single_tokens(tokenizer, w) for w in (NAMES, PLACES, OBJECTS))
    if len(names) < 2 or not places or not objects:
        raise ValueError("this tokenizer has too few single-token names, places or objects for IOI prompts")
    rng = np.random.default_rng(cfg.seed)
    clean, corrupt, io, s = [], [], [], []
    for _ in range(cfg.n_prompts):
        a, b = rng.choice(len(names), 2, replace=False)
        fill = {"PLACE": places[rng.integers(len(places))], "OBJECT": objects[rng.integers(len(objects))]}
        clean.append(cfg.template.format(IO=names[a], S=names[b], **fill))
        first, _, second = cfg.template.rpartition("{S}")  # corrupted: S2 becomes the IO
        corrupt.append((first + "{IO}" + second).format(IO=names[a], S=names[b], **fill))
        io.append(tokenizer.encode(" " + names[a], prepend_bos=False)[0])
        s.append(tokenizer.encode(" " + names[b], prepend_bos=False)[0])
    tokens = [tokenizer.encode(t) for t in clean], [tokenizer.encode(t) for t in corrupt]
    lengths = {len(t) for t in tokens[0] + tokens[1]}
    if len(lengths) != 1:
        raise ValueError(f"prompts from template {cfg.template!r} tokenise to different lengths {sorted(lengths)}; "
                         "positions must align across prompts for the sweeps")
    clean_tokens, corrupt_tokens = (np.array(t, np.int32) for t in tokens)
    io, s = np.array(io, np.int32), np.array(s, np.int32)
    s_positions = np.argwhere(clean_tokens == s[:, None])  # S1 and S2 of every prompt, in order
    positions = {"IO": np.argmax(clean_tokens == io[:, None], 1), "S1": s_positions[::2, 1],
                 "S2": s_positions[1::2, 1], "END": np.full(cfg.n_prompts, clean_tokens.shape[1] - 1)}
    aligned = len(s_positions) == 2 * cfg.n_prompts and all(len(set(p)) == 1 for p in positions.values())
    if not aligned or len({int(p[0]) for p in positions.values()}) != 4:
        raise ValueError(f"template {cfg.template!r}: IO, S1, S2 and the last token (END) must sit at four "
                         "different positions, the same in every prompt")
    tokens = tokenizer.to_str_tokens(clean_tokens[0])
    labels = list(tokens)
    for role, at in positions.items():
        labels[at[0]] = f"{role}"
    return {"clean": clean, "corrupt": corrupt, "clean_tokens": clean_tokens, "corrupt_tokens": corrupt_tokens,
            "io": io, "s": s, "positions": {k: int(v[0]) for k, v in positions.items()}, "labels": labels,
            "tokens": tokens}


def logit_diff_metric(io, s):
    """Mean logit(IO) - logit(S) at the last of the given logit positions."""
    io, s = jnp.asarray(io), jnp.asarray(s)

    def metric(logits):
        last = logits[:, -1]
        return (jnp.take_along_axis(last, io[:, None], 1) - jnp.take_along_axis(last, s[:, None], 1)).mean()

    return metric


# Computation --------------------------------------------------------------------------------------

def compute(run: Run) -> dict:
    cfg: Config = run.config
    model, tokenizer = jinterp.load(cfg.model, progress=not run.quiet)
    if tokenizer is None:
        raise ValueError(f"model {cfg.model!r} comes without a tokenizer; IOI needs one to build prompts")
    prompts = make_prompts(tokenizer, cfg)
    clean, corrupt = prompts["clean_tokens"], prompts["corrupt_tokens"]
    io, s = prompts["io"], prompts["s"]
    metric = logit_diff_metric(io, s)
    end = [-1]
    layers = None if cfg.layers is None else list(cfg.layers)
    sweep_options = dict(logit_positions=end, layers=layers, chunk_size=cfg.chunk_size, mesh=run.mesh)

    def baseline():
        clean_logits, corrupt_logits = model(clean)[:, -1], model(corrupt)[:, -1]

        def diff(logits):
            return jnp.take_along_axis(logits, io[:, None], 1)[:, 0] - jnp.take_along_axis(logits, s[:, None], 1)[:, 0]

        probs = jax.nn.softmax(clean_logits, -1)
        return {"clean_logit_diff": diff(clean_logits), "corrupt_logit_diff": diff(corrupt_logits),
                "clean_p_io": jnp.take_along_axis(probs, io[:, None], 1)[:, 0],
                "clean_p_s": jnp.take_along_axis(probs, s[:, None], 1)[:, 0]}

    base = run.step("baseline", baseline)
    resid = run.chunked("resid_pre", patching.sweep_chunks(model, clean, corrupt, metric, "resid_pre",
                                                           **sweep_options))
    heads = run.chunked("z", patching.sweep_chunks(model, clean, corrupt, metric, "z", **sweep_options))
    estimates = run.step("attribution", lambda: {
        site: attribution.attribution_patching(model, clean, corrupt, metric, site, logit_positions=end)
        for site in ("resid_pre", "z")})

    def clean_components():
        _, cache = jinterp.run(model, clean, capture=lens.site_names(model) + ["blocks.*.attn.pattern"])
        stack, _ = lens.stack_head_results(model, cache)
        direction = lens.logit_directions(model, io, s)
        lens_logits = lens.logit_lens(model, cache)  # [n_layers + 1, batch, vocab]
        lens_diff = (jnp.take_along_axis(lens_logits, io[None, :, None], 2)
                     - jnp.take_along_axis(lens_logits, s[None, :, None], 2))[..., 0]
        probs = jax.nn.softmax(lens_logits, -1)
        pattern = cache.stack("attn.pattern")[:, :, :, -1]  # [layer, batch, head, key] from END
        at = prompts["positions"]
        return {"dla": lens.direct_logit_attribution(model, cache, stack, direction).mean(1).reshape(
                    model.cfg.n_layers, model.cfg.n_heads),
                "lens_logit_diff": lens_diff.mean(1),
                "lens_p_io": jnp.take_along_axis(probs, io[None, :, None], 2)[..., 0].mean(1),
                "lens_p_s": jnp.take_along_axis(probs, s[None, :, None], 2)[..., 0].mean(1),
                "attention": {role: pattern[..., at[role]].mean(1) for role in ("IO", "S1", "S2")},
                "example_pattern": cache.stack("attn.pattern")[:, 0]}  # [layer, head, query, key], prompt 0

    components = run.step("components", clean_components)

    # Path patching into the name movers' queries: the S-inhibition heads (IOI paper, section 3.2).
    movers = name_mover_candidates(components, cfg.name_movers, cfg.min_attention) or _top_heads(
        components["dla"], cfg.name_movers)  # no head qualifies (an untrained model): the top heads by DLA
    n = min(cfg.path_prompts, cfg.n_prompts)
    receivers = [(f"blocks.{layer}.attn.q", [head]) for layer, head in movers]
    path = run.chunked("path_to_name_movers", patching.path_patch_chunks(
        model, clean[:n], corrupt[:n], logit_diff_metric(io[:n], s[:n]), receivers, direction="noise",
        logit_positions=end, mesh=run.mesh))
    path_base = run.step("path_baseline", lambda: {
        "clean": metric_of(model, clean[:n], io[:n], s[:n]), "corrupt": metric_of(model, corrupt[:n], io[:n], s[:n])})

    return {"prompts": {"clean": prompts["clean"], "corrupt": prompts["corrupt"], "labels": prompts["labels"],
                        "tokens": prompts["tokens"], "positions": prompts["positions"]},
            "baseline": base, "resid_pre": resid, "z": heads, "attribution": estimates, "components": components,
            "name_movers": np.array(movers, np.int32), "path": path, "path_baseline": path_base,
            "sweep_layers": np.arange(model.cfg.n_layers) if layers is None else np.array(sorted(layers)),
            "architecture": model.cfg.architecture}


def metric_of(model, tokens, io, s):
    return logit_diff_metric(io, s)(model(tokens)[:, -1:])


def _top_heads(scores, k: int) -> list[tuple[int, int]]:
    order = np.argsort(-np.asarray(scores), axis=None)[:k]
    return [tuple(int(i) for i in np.unravel_index(o, np.shape(scores))) for o in order]


# Report -------------------------------------------------------------------------------------------

def summarise(results: dict) -> dict:
    """Normalised patching results (0 = corrupted, 1 = clean) and correlations, for the report and metrics."""
    base = results["baseline"]
    clean, corrupt = float(base["clean_logit_diff"].mean()), float(base["corrupt_logit_diff"].mean())

    def normalised(values):
        return (np.asarray(values) - corrupt) / (clean - corrupt)

    layers = np.asarray(results["sweep_layers"])
    estimates = results["attribution"]
    correlation = {site: float(np.corrcoef(np.asarray(estimates[site])[layers].ravel(),
                                           (np.asarray(results[site]) - corrupt).ravel())[0, 1])
                   for site in ("resid_pre", "z")}
    comp = results["components"]
    path_clean, path_corrupt = float(results["path_baseline"]["clean"]), float(results["path_baseline"]["corrupt"])
    path = (np.asarray(results["path"]) - path_clean) / (path_clean - path_corrupt)
    z = np.full_like(np.asarray(comp["dla"]), np.nan)
    z[layers] = normalised(results["z"])
    return {"clean_logit_diff": clean, "corrupt_logit_diff": corrupt, "resid_pre": normalised(results["resid_pre"]),
            "z": z, "correlation": correlation, "path": path, "layers": layers}


def head_rows(summary: dict, results: dict, order: list[tuple[int, int]]) -> list[list]:
    comp = results["components"]
    attention = comp["attention"]
    return [[f"L{layer}H{head}", float(comp["dla"][layer, head]), float(attention["IO"][layer, head]),
             float(attention["S2"][layer, head]), float(summary["z"][layer, head]),
             float(summary["path"][layer, head])] for layer, head in order]


def name_mover_candidates(components: dict, k: int, min_attention: float) -> list[tuple[int, int]]:
    """Heads that attend from END to the IO (at least ``min_attention``, and more than to S2),
    by direct logit attribution (positive only)."""
    attention = components["attention"]
    qualifies = (np.asarray(attention["IO"]) >= min_attention) & (np.asarray(attention["IO"]) > attention["S2"])
    score = np.where(qualifies & (np.asarray(components["dla"]) > 0), components["dla"], -np.inf)
    return [h for h in _top_heads(score, k) if np.isfinite(score[h])]


def s_inhibition_candidates(components: dict, path, k: int, min_attention: float) -> list[tuple[int, int]]:
    """Heads that attend from END to S2 (at least ``min_attention``, and more than to the IO), by
    how much corrupting them lowers the logit difference through the name movers' queries."""
    attention = components["attention"]
    qualifies = (np.asarray(attention["S2"]) >= min_attention) & (np.asarray(attention["S2"]) > attention["IO"])
    score = np.where(qualifies & (np.nan_to_num(path) < 0), -np.nan_to_num(path), -np.inf)
    return [h for h in _top_heads(score, k) if np.isfinite(score[h])]


def report(cfg: Config, results: dict, directory: Path, info: dict) -> None:
    summary = summarise(results)
    heads = {"name_movers": name_mover_candidates(results["components"], cfg.top_heads, cfg.min_attention),
             "s_inhibition": s_inhibition_candidates(results["components"], summary["path"], cfg.top_heads,
                                                     cfg.min_attention)}
    labels = list(results["prompts"]["labels"])
    page = Report(f"Indirect object identification: {cfg.model}", directory / "plots")

    page.heading("Prompts and logit difference")
    page.text(f"{cfg.n_prompts} prompts from the template '{cfg.template}' (seed {cfg.seed}). The corrupted "
              "prompt swaps the second subject (S2) for the indirect object, which flips the answer.")
    page.table(["clean prompt", "corrupted prompt"],
               [[c, k] for c, k in zip(results["prompts"]["clean"][:5], results["prompts"]["corrupt"][:5])],
               "The first five prompts")
    base = results["baseline"]
    page.table(["", "clean", "corrupted"],
               [["logit(IO) - logit(S), mean", summary["clean_logit_diff"], summary["corrupt_logit_diff"]],
                ["prompts with IO ahead", float((base["clean_logit_diff"] > 0).mean()),
                 float((base["corrupt_logit_diff"] > 0).mean())],
                ["P(IO), mean (clean)", float(base["clean_p_io"].mean()), ""],
                ["P(S), mean (clean)", float(base["clean_p_s"].mean()), ""]])

    page.heading("Activation patching (clean into corrupted)")
    fig = plots.patching_heatmap(summary["resid_pre"], tokens=labels, layers=summary["layers"],
                                 title="resid_pre patching, normalised logit difference (1 = clean)").figure
    page.figure(fig, "resid_pre_patching", "Each cell patches the clean residual stream into the corrupted run at one "
                "layer and position. Information about the subject moves from S2 to END in the middle layers.")
    fig = plots.head_heatmap(summary["z"], title="Head output (z) patching, normalised logit difference").figure
    page.figure(fig, "z_patching", "Each cell patches one head's clean output, at every position, into the "
                "corrupted run.")

    page.heading("Attribution patching against activation patching")
    corrupt = summary["corrupt_logit_diff"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, site in zip(axes, ("resid_pre", "z")):
        actual = (np.asarray(results[site]) - corrupt).ravel()
        estimate = np.asarray(results["attribution"][site])[summary["layers"]].ravel()
        ax.scatter(actual, estimate, s=8, alpha=0.6)
        bound = max(np.abs(actual).max(), np.abs(estimate).max())
        ax.plot([-bound, bound], [-bound, bound], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="activation patching: change in logit difference", ylabel="attribution patching estimate",
               title=f"{site}: r = {summary['correlation'][site]:.3f}")
    page.figure(fig, "attribution_vs_patching", "One point per patch; the dashed line is equality. Attribution "
                "patching needs one forward and backward pass for every patch at once.")

    comp = results["components"]
    page.heading("Logit lens and direct logit attribution")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    plots.layer_curves({"logit(IO) - logit(S)": comp["lens_logit_diff"]}, ax=ax[0], ylabel="logit(IO) - logit(S)",
                       xlabel="residual stream entering layer (last: final)", title="Logit lens at END")
    plots.layer_curves({"P(IO)": comp["lens_p_io"], "P(S)": comp["lens_p_s"]}, ax=ax[1], ylabel="probability",
                       title="Logit lens: answer probability")
    page.figure(fig, "logit_lens", "The residual stream at END after each layer, read out through the final norm "
                "and unembedding.")
    fig = plots.head_heatmap(comp["dla"], title="Direct logit attribution of each head to logit(IO) - logit(S)").figure
    page.figure(fig, "direct_logit_attribution", "Each head's output at END through the final norm (cached scale) "
                "onto the IO - S unembedding direction, mean over clean prompts.")

    page.heading("Path patching into the name movers")
    movers = ", ".join(f"L{layer}H{head}" for layer, head in results["name_movers"])
    fig = plots.head_heatmap(summary["path"], title=f"Path patching: sender heads -> queries of {movers}").figure
    page.figure(fig, "path_patching", f"Each sender head's corrupted output reaching only the queries of {movers} "
                "(other heads frozen), as a change of the logit difference relative to clean - corrupted "
                f"(first {min(cfg.path_prompts, cfg.n_prompts)} prompts).")

    columns = ["head", "DLA", "attn END->IO", "attn END->S2", "z patching", "path to name movers"]
    page.heading("Candidate heads")
    page.table(columns, head_rows(summary, results, heads["name_movers"]),
               f"Name-mover candidates: largest direct logit attribution among heads attending from END to the IO "
               f"(at least {cfg.min_attention}, more than to S2)")
    page.table(columns, head_rows(summary, results, heads["s_inhibition"]),
               "S-inhibition candidates: most negative path patching effect on the name movers' queries among "
               f"heads attending from END to S2 (at least {cfg.min_attention}, more than to the IO)")

    if "example_pattern" in comp:  # runs saved before the viewer was added lack it
        page.heading("Attention patterns")
        start = tuple(int(i) for i in (heads["name_movers"] or [tuple(results["name_movers"][0])])[0])
        page.attention(list(results["prompts"]["tokens"]), comp["example_pattern"], start=start,
                       caption=f"Every head's attention on the first clean prompt, '{results['prompts']['clean'][0]}'"
                       f" (opening on L{start[0]}H{start[1]}, from END). Choose a layer and head; hover a token to "
                       "see where it attends from.")

    page.run_section(cfg, info, f"Computed in {info['steps']['results']['seconds']:.0f} s; "
                                f"this run took {info['seconds']:.1f} s")
    page.write(directory / "report.html")

    metrics = {"clean_logit_diff": summary["clean_logit_diff"], "corrupt_logit_diff": summary["corrupt_logit_diff"],
               "clean_p_io": float(base["clean_p_io"].mean()),
               "attribution_vs_patching_correlation": summary["correlation"],
               "name_movers": [_head_metrics(summary, results, h) for h in heads["name_movers"]],
               "s_inhibition": [_head_metrics(summary, results, h) for h in heads["s_inhibition"]],
               "path_patching_receivers": [f"L{layer}H{head}" for layer, head in results["name_movers"]],
               "config_hash": info.get("config_hash"), "seconds": info.get("seconds")}
    write_json(directory / "metrics.json", metrics)


def _head_metrics(summary, results, head) -> dict:
    row = head_rows(summary, results, [head])[0]
    return dict(zip(["head", "dla", "attention_io", "attention_s2", "z_patching", "path_patching"], row))


EXPERIMENT = Experiment("ioi", __doc__.split("\n\n")[0].replace("\n", " "), Config, compute, report)
