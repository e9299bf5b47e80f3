"""Activation patching sweeps and attribution patching for wrapped models.

``patching.sweep`` and ``attribution.attribution_patching`` call these for a model from
``jinterp.byo.wrap``. Every patch is a ``Replace`` at one site, with the source run's value on
one slice (one position, one unit, ...) and the base run's value elsewhere; a site's patches are
``jax.vmap``-ed in chunks inside one ``jit``. Attribution is ``jax.grad`` with respect to an
``Add`` at every swept site: ``(source - base) . d metric / d value``, summed the way the sweep
slices the site, so the two results compare entry for entry (attribution estimates the change
from the unpatched run's metric).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jinterp._compile import jit
from jinterp.byo.hook import Wrapped
from jinterp.byo.run import _run, run, site_info
from jinterp.interventions import Add, Capture, Replace, site_key
from jinterp.models.config import choose

DIRECTIONS = ("denoise", "noise")
_PER_ALIASES = {"position": "pos", "site": (), "layer": ()}


def sweep(model: Wrapped, clean, corrupt, metric: Callable, site, *, per=None, direction: str = "denoise",
          chunk_size: int = 256, progress: bool = True):
    """Activation patching of ``site`` of a wrapped model, one slice at a time.

    Args:
        clean, corrupt: the two inputs (same shapes).
        metric: the patched model's output -> scalar.
        site: a site name, a glob (``"blocks.*.mlp"``) or a list of names.
        per: the axis (or tuple of axes) patched one index at a time; the other axes (batch
            included) are patched together. Default ``"pos"`` if the site has one, else its last
            axis; ``()`` (or ``"site"``) patches the whole site at once.
        direction: ``"denoise"`` (run corrupt, patch in clean) or ``"noise"``.
        chunk_size: patches per vmapped chunk.

    Returns ``[*per sizes]`` for one site name, ``[n_sites, *per sizes]`` for a glob or a list.
    The layers of one site kind (``blocks.{l}.mlp``) with equal shapes are patched by one
    compiled program, the layer a traced index, as for jinterp's transformers.
    """
    names, kept, base, source = _inputs(model, clean, corrupt, site, per, direction)
    _, base_cache = run(model, base, capture=names)
    _, source_cache = run(model, source, capture=names)
    results = {}
    groups = _groups(names, kept, site_info(model, base))
    for group in tqdm(groups, desc="Patching", unit="site kind", disable=not progress):
        shape, axes, per_axes = kept[group[0]]
        positions = tuple(axes.index(a) for a in per_axes)
        sizes = (len(group), *(shape[i] for i in positions))
        grid = np.indices(sizes).reshape(len(sizes), int(np.prod(sizes))).T  # [n patches, 1 + n per axes]
        edit_site, layers = group[0], None
        if len(group) > 1:  # one program for every layer: the layer is a traced index
            kind = site_key(group[0]).kind
            edit_site = kind if "*" in kind else f"blocks.*.{kind}"
            layers = jnp.asarray([site_key(name).layer for name in group], jnp.int32)
        base_values, source_values = ([cache[name] for name in group] for cache in (base_cache, source_cache))
        base_values, source_values = jnp.stack(base_values), jnp.stack(source_values)
        scores = [_patch_chunk(model, base, edit_site, layers, positions, metric, base_values, source_values,
                               jnp.asarray(grid[i:i + chunk_size], jnp.int32))
                  for i in range(0, len(grid), chunk_size)]
        results.update(zip(group, jnp.concatenate(scores).reshape(sizes)))
    return _stack([results[name] for name in names], names, site)


def _groups(names, kept, info) -> list[list[str]]:
    """Sites patched by one program: the layers of a kind (``layers.{l}.mlp``) when every layer of
    that kind in the model has one shape (an edit at a traced layer meets all of them); any other
    site alone."""
    shapes: dict = {}
    for name, (shape, _, _) in info.items():
        shapes.setdefault(site_key(name).kind, set()).add(shape)
    groups: dict = {}
    for name in names:
        parsed = site_key(name)
        uniform = isinstance(parsed.layer, int) and len(shapes[parsed.kind]) == 1
        groups.setdefault((parsed.kind, kept[name][2]) if uniform else name, []).append(name)
    return list(groups.values())


def attribution_patching(model: Wrapped, clean, corrupt, metric: Callable, site, *, per=None,
                         direction: str = "denoise"):
    """First-order estimate of ``sweep`` (same arguments, same shape): the change of the metric
    from the unpatched run, ``(source - base) . grad``, summed over each patched slice."""
    names, kept, base, source = _inputs(model, clean, corrupt, site, per, direction)
    _, source_cache = run(model, source, capture=names)
    grads, values = _gradients(model, base, tuple(names), metric)
    results = []
    for name in names:
        shape, axes, per_axes = kept[name]
        contribution = (source_cache[name] - values[name]) * grads[name]
        summed = contribution.sum(tuple(i for i, a in enumerate(axes) if a not in per_axes))
        kept_order = [a for a in axes if a in per_axes]
        results.append(summed.transpose([kept_order.index(a) for a in per_axes]))
    return _stack(results, names, site)


def _inputs(model, clean, corrupt, site, per, direction):
    """(site names, name -> (shape, axes, per axes), base inputs, source inputs)."""
    choose(direction, DIRECTIONS, "patching direction")
    shapes = jax.tree.map(jnp.shape, (clean, corrupt))
    if shapes[0] != shapes[1]:
        raise ValueError(f"clean inputs {shapes[0]} and corrupted inputs {shapes[1]} must have the same shapes")
    base, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    info = site_info(model, base)
    patterns = [site] if isinstance(site, str) else list(site)
    names = [name for name in info if any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not names:
        run(model, base, capture=patterns)  # raises the unknown-site error with the closest names
    kept = {}
    for name in names:
        shape, _, axes = info[name]
        per_axes = _per_axes(per, axes, name)
        kept[name] = (shape, axes, per_axes)
    return names, kept, base, source


def _per_axes(per, axes: tuple[str, ...], name: str) -> tuple[str, ...]:
    if per is None:
        return ("pos",) if "pos" in axes else axes[-1:]
    per = _PER_ALIASES.get(per, per) if isinstance(per, str) else per
    per = (per,) if isinstance(per, str) else tuple(per)
    for axis in per:
        choose(axis, tuple(a for a in axes if a != "batch"), f"per axis of site {name!r}")
    return per


def _stack(results, names, site):
    if isinstance(site, str) and names == [site]:
        return results[0]
    if len({r.shape for r in results}) > 1:
        shapes = ", ".join(f"{n}: {tuple(r.shape)}" for n, r in zip(names, results))
        raise ValueError(f"The sites matched by {site!r} give results of different shapes ({shapes}); "
                         f"sweep them one at a time")
    return jnp.stack(results)


@jit
def _patch_chunk(model, inputs, site, layers, axis_positions, metric, base_values, source_values, indices):
    """The metric for each patch (member of the group, then an index per patched axis), vmapped."""

    def one(index):
        base_value, source_value = base_values[index[0]], source_values[index[0]]
        mask = jnp.ones(base_value.shape, bool)
        for axis, i in zip(axis_positions, index[1:]):
            shape = [1] * base_value.ndim
            shape[axis] = base_value.shape[axis]
            mask = mask & (jnp.arange(base_value.shape[axis]) == i).reshape(shape)
        patch = Replace(site, jnp.where(mask, source_value, base_value),
                        layers=None if layers is None else layers[index[0]][None])
        # One site: its edit reaches it alone. A layer group: every layer of the kind, masked by the traced layer.
        reach = (None,) if layers is not None else ((site,),)
        return metric(_run(model, inputs, (patch,), (), reach)[0])

    return jax.vmap(one)(indices)


@jit
def _gradients(model, inputs, names, metric):
    """d metric / d value at each named site, and the values: one forward, one backward."""
    shapes = {name: (shape, dtype) for name, (shape, dtype, _) in site_info(model, inputs).items() if name in names}

    def scored(deltas):
        # Each Capture comes before its Add, so it records the unedited value (delta is zero anyway).
        edits = tuple(e for name in names for e in (Capture(name), Add(name, deltas[name])))
        output, records = _run(model, inputs, edits, (), tuple((name,) for name in names for _ in range(2)))
        return metric(output), records

    zeros = {name: jnp.zeros(*shapes[name]) for name in names}
    return jax.grad(scored, has_aux=True)(zeros)
