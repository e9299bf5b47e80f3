"""``run`` and ``sites`` for wrapped models (``jinterp.run`` / ``jinterp.sites`` call these)."""

from __future__ import annotations

import difflib
import functools

import equinox as eqx
import jax
import numpy as np

from jinterp import interventions as iv
from jinterp._compile import jit
from jinterp.byo.hook import Hook, Wrapped, captured, reaches
from jinterp.cache import Cache, _names


def run(model: Wrapped, inputs, *, capture=(), edits=()):
    """Run a wrapped model on ``inputs`` with ``edits`` applied, recording the ``capture`` sites
    (exact names or globs such as ``"blocks.*.mlp"``; ``"all"`` for every site).

    Returns ``(output, cache)``; the cache is keyed by site name. Unknown sites raise an error
    listing the closest names.
    """
    patterns = tuple(_names(capture))
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"capture= for a wrapped model takes site names (strings), got {patterns!r}")
    edits = iv.flatten(edits)
    reach = _validate(site_info(model, inputs), edits, patterns)
    output, records = _run(model, inputs, edits, patterns, reach)
    return output, Cache(records, ())


@jit
def _run(model: Wrapped, inputs, edits, patterns=(), reach=None):
    hook = Hook(model, edits, patterns, reach)
    output = model.forward(inputs, hook)
    hook.finish()
    return output, hook.records


def site_info(model: Wrapped, inputs) -> dict[str, tuple]:
    """Every site in forward order -> (shape, dtype, axes), from an abstract trace (no compute),
    memoised on the model's and the inputs' structure and shapes."""
    try:
        return _memoised_info(_structure(model), _structure(inputs), model, inputs)
    except TypeError:  # something unhashable in the structure: trace without the memo
        return _info(model, inputs)


def _structure(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((leaf.shape, leaf.dtype) if hasattr(leaf, "shape") else leaf for leaf in leaves)


class _Ignored:
    """Holds an argument the memo must not key on (the structure key stands for it)."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Ignored)


def _memoised_info(model_key, inputs_key, model, inputs):
    return _memo(model_key, inputs_key, _Ignored((model, inputs)))


@functools.lru_cache(maxsize=64)
def _memo(model_key, inputs_key, arguments: _Ignored):
    found = _info(*arguments.value)
    arguments.value = None  # the memo's key must not hold on to the model's weights
    return found


def _info(model, inputs) -> dict[str, tuple]:
    found = {}

    def trace(model, inputs):
        hook = Hook(model)
        output = model.forward(inputs, hook)
        found.update(hook.shapes)
        return output

    eqx.filter_eval_shape(trace, model, inputs)
    return found


def sites(model: Wrapped, inputs) -> dict[str, tuple]:
    """Every site of a wrapped model with its shape at ``inputs`` (an array, or a
    ``jax.ShapeDtypeStruct``: nothing is computed)."""
    return {name: shape for name, (shape, _, _) in site_info(model, inputs).items()}


def _validate(info: dict[str, tuple], interventions, patterns) -> tuple:
    """Raise a clear error for an intervention or capture that reaches no site, or indices out
    of range; return each intervention's reach for the hook (see ``Hook``)."""
    names = list(info)
    parsed = {name: iv.site_key(name) for name in names}
    reach = []
    for intervention in interventions:
        kind = intervention.site
        of_kind = [name for name in names if parsed[name].kind == kind]
        matched = [name for name in of_kind if reaches(intervention, parsed[name].layer, None, name)]
        if not matched:
            raise ValueError(_unknown(_spelled(intervention), names))
        for name in matched:
            _check(intervention, name, *info[name])
        layers = getattr(intervention, "layers", None)
        # A layer-restricted edit must not meet other layers' values when their shapes differ.
        differ = len({info[name][0] for name in of_kind}) > 1
        reach.append(tuple(matched) if differ and layers is not None and iv._concrete(layers) else None)
    for pattern in patterns:
        if not any(captured(name, (pattern,)) for name in names):
            raise ValueError(_unknown(pattern, names))
    return tuple(reach)


def _check(intervention, name: str, shape, dtype, axes: tuple[str, ...]) -> None:
    for what, wanted in (("positions", ("pos", "query_pos")), ("heads", ("head", "kv_head"))):
        indices = getattr(intervention, what, None)
        if indices is None:
            continue
        axis = next((i for i, a in enumerate(axes) if a in wanted), None)
        if axis is None:
            raise ValueError(f"edit at {name!r}: {what}= given but this site has no {wanted[0]!r} axis (axes {axes}); "
                             f"name its axes with jinterp.byo.wrap(..., axes={{{name!r}: (...)}})")
        iv._check_range(indices, shape[axis], f"edit at {name!r}: {what[:-1]}", what, negative=True)


def _spelled(intervention) -> str:
    """The site an intervention names, spelled back from its kind and layers."""
    kind, layers = intervention.site, getattr(intervention, "layers", None)
    family = kind if "*" in kind else f"blocks.*.{kind}"
    if layers is None:
        return kind
    if not iv._concrete(layers):
        return family
    layers = [int(x) for x in np.asarray(layers).ravel()]
    return family.replace("*", str(layers[0] if len(layers) == 1 else layers), 1)


def _unknown(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    listed = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return (f"Unknown site {name!r}: this model has no such site.{hint} Its sites: {listed or 'none'}. "
            f"jinterp.sites(model, inputs) lists every name with its shape.")
