"""``Cache``: the values a run recorded, by site name."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from jinterp import names as S
from jinterp.interventions import Capture


class Cache(eqx.Module, Mapping):
    """Captured site values by name. Any accepted spelling of a name works as a key
    (``cache["blocks.3.attn.z"]``, ``cache["blocks.3.attn.hook_z"]``, ``cache["z", 3]``).

    A kind recorded at several layers is held stacked over them (no per-layer copies);
    ``cache.stack(kind)`` returns that stack, ``[n_layers_captured, batch, ...]``. Other values are
    held under their own name.

    Some sites are views or functions of others, and a model may leave them to the cache
    (``derived``): jinterp's transformer does for ``attn.result`` (``z_h @ W_O[h]``), ``attn.q_input``
    / ``k_input`` / ``v_input`` (the residual stream once per head), ``mlp_in``, ``resid_post`` (the
    next layer's ``resid_pre``), ``resid_mid`` (``resid_pre + attn_out``), ``ln1.normalized`` /
    ``ln2.normalized`` (from the norm's input and ``scale``), ``attn.scores`` (from the rotated
    queries and keys, masked), ``attn.pattern`` (its softmax) and ``mlp.post`` (the activation of
    ``mlp.pre``, times ``mlp.pre_linear`` when gated), whenever this run does not edit them. They are
    computed on access with the forward's own formula (``formula``), so capturing them costs the
    forward nothing. The recomputed sums, norms, softmaxes and activations equal the forward's to
    float rounding (the compiled forward may fuse an edit's multiply into its sum); everything else
    is bit for bit the forward's.
    """

    stacked: dict[str, Array]  # name -> value, or kind -> [captured layers, ...]
    layers: tuple[tuple[str, tuple[int, ...]], ...] = eqx.field(static=True)  # stacked kind -> its layers
    # (kind, its sources, their layer offset, the layers derived), as the model planned them
    derived: tuple[tuple[str, tuple[str, ...], int, tuple[int, ...]], ...] = eqx.field(static=True, default=())
    formula: Callable | None = eqx.field(static=True, default=None)  # (kind, values, layer, extras) -> value
    extras: Any = None  # arrays the formula reads (the transformer's W_O and attention masks)

    def _derived(self, site: S.Site) -> Array | None:
        for kind, sources, offset, layers in self.derived:
            if site.kind == kind and site.layer in layers:
                values = [self[S.site_name(source, site.layer + offset)] for source in sources]
                return self.formula(kind, values, site.layer, self.extras)
        return None

    def _locate(self, site: S.Site) -> tuple[str, int | None] | None:
        """(key, index into its stack) of a stored value."""
        if site.kind not in self.stacked:
            return None
        if site.layer is None:
            return (site.kind, None) if site.kind not in dict(self.layers) else None
        layers = dict(self.layers).get(site.kind, ())
        return (site.kind, layers.index(site.layer)) if site.layer in layers else None

    def __getitem__(self, name) -> Array:
        if isinstance(name, str) and name in self.stacked and name not in dict(self.layers):
            return self.stacked[name]  # a value stored under its own name
        site = S.site_key(name)
        derived = self._derived(site)
        if derived is not None:
            return derived
        where = self._locate(site)
        if where is not None:
            key, index = where
            return self.stacked[key] if index is None else self.stacked[key][index]
        names = list(self)
        close = difflib.get_close_matches(S.site_name(*site), names, n=5, cutoff=0.5)
        hint = f" Closest captured: {', '.join(close)}." if close else ""
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise KeyError(f"Site {name!r} was not captured.{hint} Captured: {shown or 'nothing'}; "
                       f"pass it in capture=[...] to jinterp.run")

    def __iter__(self):
        layers = dict(self.layers)
        for key in self.stacked:
            if key in layers:
                yield from (S.site_name(key, layer) for layer in layers[key])
            else:
                yield key
        for kind, _, _, derived_layers in self.derived:
            yield from (S.site_name(kind, layer) for layer in derived_layers)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name) -> bool:
        if isinstance(name, str) and name in self.stacked and name not in dict(self.layers):
            return True
        try:
            site = S.site_key(name)
        except (ValueError, TypeError):
            return False
        derived = any(site.kind == kind and site.layer in layers for kind, _, _, layers in self.derived)
        return derived or self._locate(site) is not None

    def stack(self, kind) -> Array:
        """One kind over the captured layers: ``[n_layers_captured, ...]``."""
        kind = S.site_key(kind).kind
        layers = self.captured_layers(kind)
        if kind in dict(self.layers) and not any(derived == kind for derived, *_ in self.derived):
            return self.stacked[kind]
        if not layers:
            raise KeyError(f"No layer of {kind!r} was captured; captured: {', '.join(self)}")
        return jnp.stack([self[S.site_name(kind, layer)] for layer in layers])

    def captured_layers(self, kind) -> tuple[int, ...]:
        """The layers a stacked kind holds, in order."""
        kind = S.site_key(kind).kind
        derived = {k: layers for k, _, _, layers in self.derived}
        stored = dict(self.layers).get(kind, ()) + tuple(  # and values stored under their own names
            site.layer for site in map(S.site_key, self.stacked) if site.kind == kind and isinstance(site.layer, int))
        return tuple(sorted(derived.get(kind, ()) + stored))

    def __treescope_repr__(self, path, subtree_renderer):
        from jinterp.treescope_views import render_cache  # display code stays out of the forward's imports

        return render_cache(self, path, subtree_renderer)


def from_records(interventions, top: Mapping[str, Array], blocks: Mapping[str, Array], n_layers: int) -> Cache:
    """The cache of a forward that recorded ``top`` (outside a scan over layers) and ``blocks`` (each
    kind stacked over every layer), for the ``Capture`` interventions among ``interventions``."""
    stacked, layers = {}, []
    for capture in interventions:
        if not isinstance(capture, Capture):
            continue
        if capture.site in top:
            stacked[capture.site] = top[capture.site]
            continue
        chosen = tuple(range(n_layers)) if capture.layers is None else capture.layers
        every = chosen == tuple(range(n_layers))
        stacked[capture.site] = blocks[capture.site] if every else blocks[capture.site][jnp.asarray(chosen)]
        layers.append((capture.site, chosen))
    return Cache(stacked, tuple(layers))
