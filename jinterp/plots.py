"""The common interpretability figures in matplotlib: patching heatmaps with token labels,
layer x head heatmaps and per-head bars, logit-lens grids, curves and estimates over training.

Each function draws into ``ax`` (a new figure when None) and returns the axes, so figures
compose: ``fig, axes = plt.subplots(1, 2)``, then one helper per panel. ``Report.figure``
saves and embeds the figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt  # the backend is the caller's: inline in a notebook, Agg in reports
import numpy as np

MAX_TICKS = 40  # beyond this, label every n-th row or column so the labels stay readable


def head_name(layer: int, head: int) -> str:
    """``L3H7``: the usual short name of a head."""
    return f"L{layer}H{head}"


def heatmap(values, *, ax=None, xlabel: str = "", ylabel: str = "", title: str = "", xticklabels=None,
            yticklabels=None, centred: bool = False, cmap: str | None = None, vmin=None, vmax=None,
            annotate: bool | str = False, colorbar: bool = True, rotate_xticks: bool = False, aspect: str = "auto"):
    """``values [rows, columns]`` as an image, row 0 at the top.

    Args:
        centred: a diverging colour map symmetric around 0 (patching effects, attributions);
            otherwise sequential (``viridis``) from ``vmin`` to ``vmax``.
        xticklabels, yticklabels: one label per column / row (None: the indices).
        annotate: write each value in its cell (a format such as ``"{:.2f}"``; True: ``"{:.2f}"``).
        aspect: ``"auto"`` fills the axes; ``"equal"`` keeps cells square (attention patterns).
    """
    values = np.asarray(values, float)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array [rows, columns], got shape {values.shape}")
    ax = ax if ax is not None else plt.subplots(figsize=_size(values.shape))[1]
    if centred:
        bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
        bound = bound or 1.0
        vmin, vmax = -bound if vmin is None else vmin, bound if vmax is None else vmax
    image = ax.imshow(values, cmap=cmap or ("RdBu" if centred else "viridis"), vmin=vmin, vmax=vmax,
                      aspect=aspect, interpolation="nearest")
    if colorbar:
        ax.figure.colorbar(image, ax=ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    _ticks(ax.set_xticks, values.shape[1], xticklabels, rotation=90 if rotate_xticks else 0)
    _ticks(ax.set_yticks, values.shape[0], yticklabels)
    if annotate:
        form = annotate if isinstance(annotate, str) else "{:.2f}"
        for (row, column), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(column, row, form.format(value), ha="center", va="center", fontsize=8,
                        color=_text_colour(image, value))
    return ax


def patching_heatmap(values, *, tokens: Sequence[str] | None = None, layers=None, ax=None, title: str = "",
                     xlabel: str = "position", ylabel: str = "layer", centred: bool = True, **options):
    """A layer x position sweep result (``patching.sweep(..., per="position")``) with the prompt's
    tokens along x and the layer numbers along y.

    Args:
        values: ``[n_layers, seq]``.
        tokens: one label per position (e.g. ``tokenizer.to_str_tokens(tokens[0])``).
        layers: the layer number of each row (a sweep over ``layers=``); default 0, 1, ...
    """
    values = np.asarray(values, float)
    _check_labels("tokens", tokens, values.shape[-1])
    _check_labels("layers", layers, values.shape[0])
    ax = ax if ax is not None else plt.subplots(figsize=_size(values.shape, labelled_columns=tokens is not None))[1]
    return heatmap(values, ax=ax, xlabel=xlabel, ylabel=ylabel, title=title,
                   xticklabels=None if tokens is None else [_show(t) for t in tokens],
                   yticklabels=None if layers is None else [str(int(layer)) for layer in layers],
                   centred=centred, rotate_xticks=tokens is not None, **options)


def head_heatmap(values, *, layers=None, ax=None, title: str = "", xlabel: str = "head", ylabel: str = "layer",
                 centred: bool = True, **options):
    """A per-head score ``[n_layers, n_heads]`` (head patching, direct logit attribution, attention
    scores) as a layer x head grid; ``layers`` labels the rows (default 0, 1, ...)."""
    values = np.asarray(values, float)
    _check_labels("layers", layers, values.shape[0])
    return heatmap(values, ax=ax, xlabel=xlabel, ylabel=ylabel, title=title, centred=centred,
                   yticklabels=None if layers is None else [str(int(layer)) for layer in layers], **options)


def head_bars(values, *, heads: Sequence[tuple[int, int]] | None = None, highlight: Mapping | None = None,
              ax=None, title: str = "", ylabel: str = "", colour: str = "tab:grey"):
    """One bar per head, labelled ``L{layer}H{head}``.

    Args:
        values: ``[n_layers, n_heads]`` (every head, in order) or ``[len(heads)]``.
        heads: the (layer, head) of each bar when ``values`` is 1-D; default every head of a 2-D ``values``.
        highlight: ``{(layer, head): colour}`` for heads to pick out; the others get ``colour``.
    """
    values = np.asarray(values, float)
    if heads is None:
        if values.ndim != 2:
            raise ValueError(f"head_bars: pass heads= for 1-D values (got shape {values.shape}), or a "
                             "[n_layers, n_heads] array")
        heads = [(layer, head) for layer in range(values.shape[0]) for head in range(values.shape[1])]
    heights = values.reshape(-1) if values.ndim == 2 else values
    _check_labels("heads", heads, len(heights))
    highlight = {tuple(int(i) for i in h): c for h, c in (highlight or {}).items()}
    ax = ax if ax is not None else plt.subplots(figsize=(max(6.0, 0.35 * len(heads) + 2), 3.5))[1]
    ax.bar(range(len(heads)), heights, color=[highlight.get(tuple(int(i) for i in h), colour) for h in heads])
    _ticks(ax.set_xticks, len(heads), [head_name(*h) for h in heads], rotation=90 if len(heads) > 12 else 0)
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="head", ylabel=ylabel, title=title)
    return ax


def grouped_bars(groups: Mapping[str, Sequence[float]], labels: Sequence[str], *, colours=None, ax=None,
                 title: str = "", xlabel: str = "", ylabel: str = "", **axes_settings):
    """Bars side by side per label: ``groups`` maps a series name (the legend) to one value per label.
    ``colours``: per series, a colour or a list of one colour per bar."""
    n = len(groups)
    for name, heights in groups.items():
        _check_labels(f"series {name!r}", labels, len(heights), what="labels")
    ax = ax if ax is not None else plt.subplots(figsize=(max(6.0, 0.9 * len(labels) * max(1, n / 2)), 4))[1]
    width = 0.8 / max(n, 1)
    x = np.arange(len(labels))
    for i, (name, heights) in enumerate(groups.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, heights, width, label=name, color=(colours or {}).get(name))
    _ticks(ax.set_xticks, len(labels), list(labels), most=MAX_TICKS // 2)  # bar labels run wider than cells
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, **axes_settings)
    if n > 1:
        ax.legend()
    return ax


def lens_grid(values, *, tokens: Sequence[str] | None = None, layers=None, cell_text=None, ax=None,
              title: str = "", value_label: str = "", centred: bool = False, **options):
    """A logit-lens (or tuned-lens) grid: rows are the residual stream read (entering each layer,
    the last the final one), columns the positions, colour ``values [n_rows, seq]`` (e.g. the
    probability of the answer, or a logit difference), and optionally text in each cell
    (``cell_text [n_rows, seq]``: the top predicted token)."""
    values = np.asarray(values, float)
    _check_labels("tokens", tokens, values.shape[-1])
    layers = list(range(values.shape[0] - 1)) + ["final"] if layers is None else layers
    _check_labels("layers", layers, values.shape[0])
    ax = ax if ax is not None else plt.subplots(figsize=_size(values.shape, labelled_columns=True))[1]
    heatmap(values, ax=ax, xlabel="position", ylabel="residual stream entering layer", title=title,
            xticklabels=None if tokens is None else [_show(t) for t in tokens],
            yticklabels=[str(layer) for layer in layers], centred=centred, rotate_xticks=tokens is not None,
            **options)
    if cell_text is not None:
        cell_text = np.asarray(cell_text, object)
        if cell_text.shape != values.shape:
            raise ValueError(f"cell_text has shape {cell_text.shape}, values {values.shape}: they must match")
        image = ax.images[-1]
        for (row, column), text in np.ndenumerate(cell_text):
            ax.text(column, row, _show(str(text))[:8], ha="center", va="center", fontsize=7,
                    color=_text_colour(image, values[row, column]))
    if value_label and ax.images and ax.images[-1].colorbar is not None:
        ax.images[-1].colorbar.set_label(value_label)
    return ax


def layer_curves(series: Mapping[str, Sequence[float]], *, layers=None, ax=None, title: str = "",
                 xlabel: str = "residual stream entering layer", ylabel: str = "", yscale: str = "linear", **options):
    """Values per layer (a logit lens at one position, probe accuracy by layer): one line each, x the
    layer number (``layers``, default 0, 1, ...). ``options`` as for ``curves``."""
    first = next(iter(series.values()))
    x = np.arange(len(first)) if layers is None else np.asarray(layers)
    return curves(x, series, ax=ax, title=title, xlabel=xlabel, ylabel=ylabel, yscale=yscale,
                  **{"marker": ".", **options})


def curves(x, series: Mapping[str, Sequence[float]], *, ax=None, title: str = "", xlabel: str = "step",
           ylabel: str = "", yscale: str = "linear", marks: Mapping[str, float] | None = None,
           styles: Mapping[str, dict] | None = None, legend: bool = True, **line):
    """Lines over training (or any shared x): ``series`` maps a legend label to its values.

    Args:
        x: the shared x values, or a mapping label -> x for series measured at other steps
            (e.g. every-step training loss next to periodic evaluations).
        marks: ``{label: x}`` dashed vertical lines (a phase change, the step a threshold is reached).
        styles: ``{label: matplotlib line keywords}`` per series.
    """
    ax = ax if ax is not None else plt.subplots(figsize=(8, 4))[1]
    for label, values in series.items():
        xs = x[label] if isinstance(x, Mapping) else x
        values = np.asarray(values, float)
        if len(xs) != len(values):
            raise ValueError(f"curve {label!r}: {len(values)} values for {len(xs)} x values")
        ax.plot(xs, values, label=label, **{**line, **(styles or {}).get(label, {})})
    for label, at in (marks or {}).items():
        if at is not None:
            ax.axvline(at, ls="--", lw=1, color="red", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, yscale=yscale)
    if legend and (len(series) > 1 or marks):
        ax.legend(fontsize=8)
    return ax


def estimates_over_training(x, mean, std, *, label: str, ylabel: str, beside: Mapping[str, tuple] | None = None,
                            beside_ylabel: str = "", beside_yscale: str = "linear",
                            marks: Mapping[str, tuple] | None = None, xlabel: str = "step", title: str = "", ax=None):
    """Estimates with error bars over training (an LLC per snapshot), and the curves they explain
    (``beside``: ``{label: (x, y)}``, losses say) on a second y axis.

    Args:
        marks: ``{label: (x, colour)}`` dashed vertical lines (None x values are left out).
    """
    ax = ax if ax is not None else plt.subplots(figsize=(9, 4.5))[1]
    ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color="tab:purple", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if beside:
        twin = ax.twinx()
        for (name, (bx, by)), colour in zip(beside.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            twin.plot(bx, by, color=colour, alpha=0.5, label=name)
        twin.set(ylabel=beside_ylabel, yscale=beside_yscale)
    for name, (at, colour) in (marks or {}).items():
        if at is not None:
            ax.axvline(at, color=colour, ls="--", lw=0.8, label=name)
    ax.figure.legend(loc="upper right", fontsize=8)
    return ax


# Helpers ------------------------------------------------------------------------------------------

def _size(shape, labelled_columns: bool = False) -> tuple[float, float]:
    rows, columns = shape
    width = max(6.0, min(22.0, (0.45 if labelled_columns else 0.3) * columns + 2))
    return width, max(3.0, min(16.0, 0.22 * rows + 2))


def _ticks(set_ticks, n: int, labels, rotation: float = 0, most: int = MAX_TICKS) -> None:
    step = max(1, -(-n // most))
    where = list(range(0, n, step))
    shown = [str(i) for i in where] if labels is None else [labels[i] for i in where]
    set_ticks(where, shown, rotation=rotation)


def _check_labels(name: str, labels, n: int, what: str = "rows or columns") -> None:
    if labels is not None and len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries for {n} {what}")


def _show(token: str) -> str:
    """A token as a tick label: whitespace made visible, mathtext's $ kept literal."""
    return token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")


def _text_colour(image, value) -> str:
    """White on dark cells, black on light ones."""
    r, g, b, _ = image.cmap(image.norm(value))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def circuit_graph(circuit, graph, effects=None, *, ax=None, title: str = ""):
    """A circuit of ``jinterp.circuits`` / ``jinterp.acdc`` as a graph: nodes by layer (the input at the
    bottom, the logits at the top), one arrow per kept edge from writer to reader, its width and colour by
    ``|effect|`` (e.g. ``ACDCResult.effects``; equal widths without).

    A writer and the readers of the same head or MLP share one node (``L1H2`` for ``L1H2`` and its
    ``.q``/``.k``/``.v``; a key/value reader of several query heads is drawn at its kv head's node).
    """
    circuit = np.asarray(circuit, bool)
    edges = list(zip(*np.nonzero(circuit)))
    ax = ax if ax is not None else plt.subplots(figsize=(8, 6))[1]

    def node(name: str) -> str:
        return name.split(".")[0]

    def level(name: str) -> float:
        if name == "input":
            return -1.0
        if name == "logits":
            return math.inf
        layer = int(name[1:].split("H")[0].split("K")[0].split("M")[0])
        return layer + (0.5 if name.endswith("MLP") else 0.0)

    names = sorted({node(graph.upstream[u]) for u, _ in edges} | {node(graph.downstream[d]) for _, d in edges},
                   key=lambda n: (level(n), n))
    levels = sorted({level(n) for n in names})
    top = (max(level for level in levels if math.isfinite(level)) + 1) if any(map(math.isfinite, levels)) else 0
    position = {}
    for lv in levels:
        row = [n for n in names if level(n) == lv]
        for i, name in enumerate(row):
            position[name] = (i - (len(row) - 1) / 2, top if math.isinf(lv) else lv)
    weights = np.ones(len(edges)) if effects is None else np.nan_to_num(
        np.abs(np.asarray(effects, float)[tuple(np.asarray(edges).T)]) if edges else np.zeros(0))
    scale = weights.max() if len(weights) and weights.max() > 0 else 1.0
    cmap = plt.get_cmap("viridis")
    for (u, d), w in zip(edges, weights):
        (x0, y0), (x1, y1) = position[node(graph.upstream[u])], position[node(graph.downstream[d])]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(
            arrowstyle="->", lw=0.5 + 3.5 * w / scale, color=cmap(0.15 + 0.8 * w / scale), shrinkA=10, shrinkB=10,
            connectionstyle="arc3,rad=0.1"))
        label = graph.downstream[d].partition(".")[2]
        if label:
            ax.text(x0 + 0.55 * (x1 - x0), y0 + 0.55 * (y1 - y0), label, fontsize=7, color="0.3")
    for name, (x, y) in position.items():
        ax.text(x, y, name, ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.5"))
    xs = [x for x, _ in position.values()] or [0]
    ys = [y for _, y in position.values()] or [0]
    ax.set(xlim=(min(xs) - 1, max(xs) + 1), ylim=(min(ys) - 0.7, max(ys) + 0.7), ylabel="layer", xticks=[],
           title=title or f"circuit: {len(edges)} edges")
    return ax
