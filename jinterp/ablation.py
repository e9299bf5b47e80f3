"""Edits built from another run's cache: activation patching, mean and resample ablation.

Each returns an ordinary ``Replace`` edit, so it composes, jits, vmaps and differentiates like
any other. For block sites the source must hold every layer the edit may touch
(``capture="blocks.*.<kind>"``); the edit then reads the layer it is applied at.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinterp import names as S
from jinterp.cache import Cache
from jinterp.interventions import Replace


def _source(cache: Cache, site) -> tuple[jnp.ndarray, bool, str]:
    """(values, per_layer, site to edit) for ``site`` from ``cache``."""
    parsed = S.site_key(site)
    if parsed.layer != "*" and (parsed.layer is not None or not cache.captured_layers(parsed.kind)):
        return cache[S.site_name(*parsed)], False, site
    captured = cache.captured_layers(parsed.kind)
    if not captured:
        raise KeyError(f"The source cache holds no layer of {parsed.kind!r}; capture "
                       f"{S.site_name(parsed.kind, '*')!r}")
    if captured != tuple(range(len(captured))):
        raise KeyError(f"Patching {parsed.kind!r} at several layers needs every layer in the source cache; "
                       f"it holds layers {captured}. Capture {S.site_name(parsed.kind, '*')!r}")
    return cache.stack(parsed.kind), True, site


def patch(source: Cache, site, *, layers=None, positions=None, heads=None) -> Replace:
    """Replace ``site`` with its value in ``source``: clean into corrupted (denoising) or
    corrupted into clean (noising), depending on which run ``source`` came from.

    ``site`` may name a layer (``"blocks.3.attn.z"``) or every layer (``"blocks.*.attn.z"``,
    restricted with ``layers=``); the source batch must match the run it is patched into.
    """
    values, per_layer, site = _source(source, site)
    return Replace(site, values, layers=layers, positions=positions, heads=heads, per_layer=per_layer)


def mean_ablate(reference: Cache, site, *, over_positions: bool = False, layers=None, positions=None,
                heads=None) -> Replace:
    """Replace ``site`` with its mean over a reference batch (and over positions if asked)."""
    values, per_layer, site = _source(reference, site)
    batch_axis = 1 if per_layer else 0
    axes = (batch_axis, batch_axis + 1) if over_positions else (batch_axis,)
    axes_named = S.SITE_AXES.get(S.site_key(site).kind, ())
    if over_positions and axes_named[1:2] != ("pos",):
        raise ValueError(f"over_positions needs a site whose second axis is the position; {site!r} is "
                         f"{axes_named or 'not one of jinterp transformer sites'}")
    mean = values.mean(axis=axes, keepdims=True)
    return Replace(site, mean, layers=layers, positions=positions, heads=heads, per_layer=per_layer)


def resample_ablate(source: Cache, site, key: jax.Array, *, layers=None, positions=None, heads=None) -> Replace:
    """Replace ``site`` with its value from a random other example of ``source``'s batch
    (a permutation with no fixed points when the batch has more than one example)."""
    values, per_layer, site = _source(source, site)
    batch_axis = 1 if per_layer else 0
    n = values.shape[batch_axis]
    shift = jax.random.randint(key, (), 1, n) if n > 1 else 0
    order = (jnp.arange(n) + shift) % n  # a cyclic shift: nobody keeps its own activation
    return Replace(site, jnp.take(values, order, axis=batch_axis), layers=layers, positions=positions, heads=heads,
                   per_layer=per_layer)
