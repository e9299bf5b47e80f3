"""How jinterp's objects look in treescope (notebooks: ``treescope.basic_interactive_setup()``, or
``treescope.show(x)`` / ``render_to_text`` / ``render_to_html``).

- A ``Transformer`` opens with a summary (architecture, sizes, parameter counts per part) and a
  foldable list of its site kinds with their shapes, then its fields as usual.
- A ``Cache`` shows each captured site by the name it is indexed with, its shape, dtype and value
  summary; sites the cache computes on access are shown by shape without being computed.
- ``sweep_view(result, ...)`` labels a sweep result's axes (layer, head, position with the
  prompt's tokens) and draws it as treescope's interactive heatmap.

``Transformer.__treescope_repr__`` and ``Cache.__treescope_repr__`` call into this module.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import numpy as np
import treescope
from treescope import rendering_parts

from jinterp.models import declaration


def parameter_counts(model) -> dict[str, int]:
    """Parameters (array elements) of each top-level field of ``model`` that holds any."""
    counts = {}
    for field in dataclasses.fields(model):
        leaves = jax.tree.leaves(eqx.filter(getattr(model, field.name), eqx.is_array))
        if leaves:
            counts[field.name] = sum(math.prod(leaf.shape) for leaf in leaves)
    return counts


def model_summary(cfg) -> str:
    """One line: the architecture and its sizes."""
    heads = f"{cfg.n_heads} heads" + (f" ({cfg.n_kv_heads} kv)" if cfg.n_kv_heads != cfg.n_heads else "")
    kind = ("decoder" if cfg.unembed else "encoder") + ("" if cfg.causal else " (bidirectional)")
    parts = [f"{cfg.n_layers} layers", f"d_model {cfg.d_model}", f"{heads} x d_head {cfg.d_head}"]
    if cfg.attn_only:
        parts += ["attention only"]
    elif cfg.n_experts:
        parts += [f"{cfg.n_experts} experts (top {cfg.n_experts_per_token}) x d_expert {cfg.d_expert}"
                  + (f" + shared d_mlp {cfg.d_mlp}" if cfg.d_mlp else "")]
    else:
        parts += [f"d_mlp {cfg.d_mlp}"]
    parts += [f"vocab {cfg.d_vocab}", f"context {cfg.n_ctx}", f"{cfg.positional} positions",
              f"{cfg.norm or 'no'} norm", cfg.dtype]
    return f"{cfg.architecture} {kind}: " + ", ".join(parts)


def render_model(model, path, subtree_renderer):
    """The ``__treescope_repr__`` of a ``Transformer``."""
    counts = parameter_counts(model)
    total = sum(counts.values())
    per_part = ", ".join(f"{name} {n:,}" for name, n in counts.items())
    found = declaration.kinds(model.cfg)
    top, block = found.top, found.block
    shape = lambda kind: "[" + ", ".join(map(str, declaration.shape(model.cfg, kind))) + "]"  # noqa: E731
    site_lines = [f"blocks.{{0..{model.cfg.n_layers - 1}}}.{kind}: {shape(kind)}" for kind in block]
    site_lines += [f"{kind}: {shape(kind)}" for kind in top]
    sites = rendering_parts.build_custom_foldable_tree_node(
        label=_comment(f"# {len(top) + len(block)} site kinds, {len(model.site_specs())} sites "
                       "(jinterp.sites(model) lists each with its shape)"),
        contents=rendering_parts.fold_condition(expanded=rendering_parts.indented_children(
            [_comment(f"#   {line}") for line in site_lines])),
        path=None, expand_state=rendering_parts.ExpandState.COLLAPSED)
    children = [
        _comment(f"# {model_summary(model.cfg)}"),
        _comment(f"# {total:,} parameters: {per_part}"),
        sites.renderable,
        *rendering_parts.build_field_children(model, path, subtree_renderer, dataclasses.fields(model)),
    ]
    return rendering_parts.build_foldable_tree_node_from_children(
        prefix=rendering_parts.siblings(rendering_parts.maybe_qualified_type_name(type(model)), "("),
        children=children, suffix=")", path=path)


def render_cache(cache, path, subtree_renderer):
    """The ``__treescope_repr__`` of a ``Cache``: one entry per site name, in capture order."""
    derived = {f"blocks.{layer}.{kind}": sources
               for kind, sources, _, layers in cache.derived for layer in layers}
    stored_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(cache.stacked))
    header = f"# {len(cache)} sites; stored arrays {_bytes(stored_bytes)}"
    if derived:
        header += f"; {len(derived)} computed on access from other sites (not computed to show them)"
    children = [_comment(header)]
    for name in cache:
        key = subtree_renderer(name)
        if name in derived:
            value = jax.eval_shape(lambda name=name: cache[name])  # the shape, without computing it
            shown = rendering_parts.siblings(
                rendering_parts.abbreviation_color(rendering_parts.text(
                    f"<{value.dtype}{list(value.shape)} from {', '.join(derived[name])}, on access>")))
        else:
            shown = subtree_renderer(cache[name], path=None if path is None else f"{path}[{name!r}]")
        children.append(rendering_parts.build_full_line_with_annotations(
            rendering_parts.siblings_with_annotations(key, ": ", shown, ",")))
    return rendering_parts.build_foldable_tree_node_from_children(
        prefix=rendering_parts.siblings(rendering_parts.maybe_qualified_type_name(type(cache)), "({"),
        children=children, suffix="})", path=path, child_type_single_and_plural=("site", "sites"))


# Sweep results ------------------------------------------------------------------------------------

AXES_BY_PER = {"position": ("layer", "position"), "layer": ("layer",), "head": ("layer", "head"),
               "head_position": ("layer", "head", "position")}


@dataclasses.dataclass(frozen=True)
class SweepView:
    """A sweep result with named, labelled axes; treescope draws it as a heatmap under a summary
    line (shape, the extreme cells by their labels)."""

    values: np.ndarray
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    title: str = ""

    def cell(self, index) -> str:
        """A cell's index as labels: ``layer 3, position 5 ' Mary'``."""
        parts = []
        for axis, i in zip(self.axes, index):
            label = self.labels[axis][i]
            parts.append(f"{axis} {label}" if axis != "position" else f"position {i} {label!r}")
        return ", ".join(parts)

    def summary(self) -> str:
        finite = np.isfinite(self.values)
        shape = " x ".join(f"{n} {axis}s" for axis, n in zip(self.axes, self.values.shape))
        if not finite.any():
            return f"{self.title or 'sweep'}: {shape}, no finite values"
        masked = np.where(finite, self.values, np.nan)
        low = np.unravel_index(np.nanargmin(masked), masked.shape)
        high = np.unravel_index(np.nanargmax(masked), masked.shape)
        return (f"{self.title or 'sweep'}: {shape}; max {masked[high]:.4g} at {self.cell(high)}; "
                f"min {masked[low]:.4g} at {self.cell(low)}")

    def heatmap(self):
        """treescope's heatmap of the values: layers as rows, the other axes as columns."""
        dims = list(range(self.values.ndim))
        rows, columns = ([0], dims[1:]) if self.values.ndim > 1 else ([], [0])
        return treescope.render_array(
            self.values, rows=rows, columns=columns, around_zero=True,
            axis_labels=dict(enumerate(self.axes)),
            axis_item_labels={i: [_unclosing(label) for label in self.labels[axis]]
                              for i, axis in enumerate(self.axes)})

    def __treescope_repr__(self, path, subtree_renderer):
        return rendering_parts.build_foldable_tree_node_from_children(
            prefix=rendering_parts.siblings(rendering_parts.maybe_qualified_type_name(type(self)), "("),
            children=[_comment(f"# {self.summary()}"), self.heatmap().treescope_part],
            suffix=")", path=path)


def sweep_view(values, *, per: str | None = None, tokens=None, layers=None, heads=None,
               title: str = "") -> SweepView:
    """Label a sweep result for treescope.

    Args:
        values: ``patching.sweep`` / ``path_patch`` / ``attribution_patching`` output.
        per: the sweep's ``per`` (``"position"``, ``"layer"``, ``"head"``, ``"head_position"``);
            default from the shape: 1-D per layer, 2-D per position, 3-D per head and position.
            Pass ``per="head"`` for a 2-D per-head result.
        tokens: the prompt's tokens as strings, one per position.
        layers: the layer number of each row (a sweep run with ``layers=``).
        heads: head labels (default 0, 1, ...).
    """
    values = np.asarray(values, np.float64)
    if per is None:
        per = {1: "layer", 2: "position", 3: "head_position"}.get(values.ndim)
        if per is None:
            raise ValueError(f"sweep_view: a sweep result has 1 to 3 axes, got shape {values.shape}")
    if per not in AXES_BY_PER:
        raise ValueError(f"sweep_view: per={per!r} is not one of {', '.join(AXES_BY_PER)}")
    axes = AXES_BY_PER[per]
    if values.ndim != len(axes):
        raise ValueError(f"sweep_view: per={per!r} means axes {axes}, but values have shape {values.shape}")
    sizes = dict(zip(axes, values.shape))
    given = {"layer": layers, "head": heads, "position": tokens}
    labels = {}
    for axis in axes:
        labels[axis] = [str(v) for v in (given[axis] if given[axis] is not None else range(sizes[axis]))]
        if len(labels[axis]) != sizes[axis]:
            raise ValueError(f"sweep_view: {len(labels[axis])} {axis} labels for {sizes[axis]} {axis}s "
                             f"(values shape {values.shape})")
    return SweepView(values, axes, labels, title)


def _unclosing(label: str) -> str:
    """treescope 0.1.10 puts axis labels into a <script> unescaped: a token holding "</script>" ends it
    and breaks the heatmap. A zero-width space after "<" looks the same and closes nothing."""
    return label.replace("</", "<\u200b/")


def _comment(text: str):
    return rendering_parts.comment_color(rendering_parts.text(text))


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
