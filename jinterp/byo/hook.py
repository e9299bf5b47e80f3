"""Sites in a model that is not a jinterp ``Transformer``: the ``Wrapped`` protocol and its hook.

A wrapped model's forward calls ``hook(name, value)`` at each of its sites and continues with
what comes back, exactly like the transformer's forward. The hook applies the same
interventions (``Replace``, ``Add``, ``Zero``, ``Capture``, ... ) the same way: they are grouped
by site kind (``iv.by_kind``) and called as ``intervention(value, At(...))``. A site name's first integer
part is its layer (``iv.site_key``): ``"layers.2.mlp"`` is kind ``"layers.*.mlp"`` at layer 2, so
``"layers.*.mlp"``, ``layers=`` and ``per_layer=True`` work as they do for the transformer.
"""

from __future__ import annotations

import fnmatch

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array

from jinterp import interventions as iv

# Axis names by rank when a site does not declare its own: "pos" is the axis ``positions=`` indexes.
DEFAULT_AXES = {0: (), 1: ("batch",), 2: ("batch", "d"), 3: ("batch", "pos", "d"),
                4: ("batch", "height", "width", "channel")}


def default_axes(ndim: int) -> tuple[str, ...]:
    return DEFAULT_AXES.get(ndim) or ("batch", *(f"axis{i}" for i in range(1, ndim)))


class Wrapped(eqx.Module):
    """A model whose forward calls ``hook(name, value)`` at its sites (see ``jinterp.byo.wrap``).

    Subclasses implement ``forward(inputs, hook) -> output``. ``axes`` holds (site name glob,
    axis names) pairs for sites whose axes are not the defaults (``DEFAULT_AXES`` by rank).
    """

    axes: tuple[tuple[str, tuple[str, ...]], ...] = eqx.field(static=True, kw_only=True, default=())

    def forward(self, inputs, hook: Hook):
        raise NotImplementedError

    def __call__(self, inputs):
        """The plain forward: no site does anything."""
        return self.forward(inputs, None)

    @property
    def cfg(self):
        # Transformer-only tools read model.cfg first: say so instead of a bare AttributeError.
        raise AttributeError(f"A wrapped {type(self).__name__} model has no transformer Config: this function "
                             f"takes jinterp transformers only. Wrapped models support jinterp.run, jinterp.sites, "
                             f"patching.sweep and attribution.attribution_patching")

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        for pattern, axes in self.axes:
            if fnmatch.fnmatchcase(name, pattern):
                if len(axes) != ndim:
                    raise ValueError(f"axes {axes} given for site {name!r} (pattern {pattern!r}), but its value "
                                     f"has {ndim} axes")
                return tuple(axes)
        return default_axes(ndim)


def site(name: str, value: Array, hook: Hook | None, axes: tuple[str, ...] | None = None) -> Array:
    """Mark ``value`` as the site ``name`` in your own model's forward: returns the value the
    forward continues with (``value`` itself when ``hook`` is None, the plain forward)."""
    return value if hook is None else hook(name, value, axes)


def scope(hook: Hook | None, prefix: str) -> Hook | None:
    """A hook that prefixes site names with ``prefix.`` (for a submodule used several times)."""
    return None if hook is None else _Scoped(hook, prefix)


class _Scoped:
    def __init__(self, hook, prefix: str):
        self.hook, self.prefix = hook, prefix

    def __call__(self, name, value, axes=None):
        return self.hook(f"{self.prefix}.{name}", value, axes)


class Hook:
    """What a wrapped model calls at each site: the run's interventions for that site, in order.

    Built during tracing only. ``records`` collects captured values by site name; ``shapes``
    lists every site the forward passed, in order, with (shape, dtype, axes). ``reach`` (from
    ``jinterp.byo.run``) names, per intervention, the sites it acts at when that is known before
    tracing (None: every site of its kind, masked by layer).
    """

    def __init__(self, model: Wrapped, interventions=(), capture: tuple[str, ...] = (), reach=None):
        self.model = model
        self.interventions = iv.flatten(interventions)
        self.grouped = iv.by_kind(self.interventions)
        self.states = iv.initial_states(self.interventions, None, None, None)
        self.capture = capture
        self.reach = reach or (None,) * len(self.interventions)
        self.records: dict[str, Array] = {}
        self.shapes: dict[str, tuple] = {}
        self.applied: set[int] = set()
        self.misfits: dict[int, Exception] = {}

    def __call__(self, name: str, value: Array, axes: tuple[str, ...] | None = None) -> Array:
        if not hasattr(value, "shape"):
            raise TypeError(f"Site {name!r}: the value is a {type(value).__name__}, not an array")
        if name in self.shapes:
            raise ValueError(f"Site {name!r} is reached twice in one forward; give each site its own name "
                             f"(jinterp.byo.scope(hook, prefix) prefixes a submodule's names)")
        axes = self.model.site_axes(name, value.ndim) if axes is None else tuple(axes)
        self.shapes[name] = (value.shape, value.dtype, axes)
        site = iv.site_key(name)
        records: dict[str, Array] = {}
        for index, intervention in self.grouped.get(site.kind, ()):
            if not reaches(intervention, site.layer, self.reach[index], name):
                continue
            at = iv.At(site.kind, axes, site.layer, records, self.states, index)
            if _traced_layers(intervention, self.reach[index]) and not self._fits(index, intervention, value, at):
                continue
            self.applied.add(index)
            value = intervention(value, at)
        if site.kind in records:
            self.records[name] = records[site.kind]
        if captured(name, self.capture):
            if name in self.records:
                raise ValueError(f"Site {name!r} is captured twice in one run")
            self.records[name] = value
        return value


    def _fits(self, index: int, intervention, value: Array, at: iv.At) -> bool:
        """Whether an edit whose layers are traced (built inside jit or vmap) can act here: the layer
        it masks to is unknown while tracing, so a site whose shape it cannot take is not its site."""
        try:
            jax.eval_shape(lambda v: intervention(v, at._replace(records={}, states=dict(self.states))), value)
            return True
        except (ValueError, TypeError) as error:
            self.misfits.setdefault(index, error)
            return False

    def finish(self) -> None:
        """After the forward: an edit with traced layers that fitted no site raises its error."""
        for index, error in self.misfits.items():
            if index not in self.applied:
                raise error


def _traced_layers(intervention, reach) -> bool:
    layers = getattr(intervention, "layers", None)
    return reach is None and layers is not None and not isinstance(intervention, iv.Capture) and \
        not iv._concrete(layers)


def captured(name: str, patterns) -> bool:
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def reaches(intervention, layer, reach: tuple[str, ...] | None, name: str) -> bool:
    """Whether an intervention of this site's kind acts at this site (at ``layer``)."""
    if reach is not None:
        return name in reach
    layers = getattr(intervention, "layers", None)
    if layers is None:
        return True
    if layer is None or layer == "*":
        return False
    if isinstance(intervention, iv.Capture) or iv._concrete(layers):
        return int(layer) in {int(x) for x in np.asarray(layers).ravel()}
    return True  # traced layers (a vmap over layers): the edit masks itself by layer
