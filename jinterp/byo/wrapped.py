"""A model that is not a jinterp ``Transformer``, adapted to the site protocol.

A wrapped model's forward calls ``hook(name, value)`` at each of its sites and continues with
what comes back, exactly like the transformer's forward. ``Wrapped`` implements the protocol
(``jinterp.protocol.Model``) around that forward: its site specs come from an abstract trace, and
its ``apply`` hands each site to the same ``interventions.SiteHook`` as the transformer's. A site
name's first integer part is its layer (``names.site_key``): ``"layers.2.mlp"`` is kind
``"layers.*.mlp"`` at layer 2, so ``"layers.*.mlp"``, ``layers=`` and ``per_layer=True`` work as
they do for the transformer.
"""

from __future__ import annotations

import abc
import fnmatch
import functools

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array

from jinterp import interventions as iv
from jinterp import names as S
from jinterp.cache import Cache
from jinterp.protocol import Model
from jinterp.specs import SiteSpec, Specs

# Axis names by rank when a site does not declare its own: "pos" is the axis ``positions=`` indexes.
DEFAULT_AXES = {0: (), 1: ("batch",), 2: ("batch", "d"), 3: ("batch", "pos", "d"),
                4: ("batch", "height", "width", "channel")}


def default_axes(ndim: int) -> tuple[str, ...]:
    return DEFAULT_AXES.get(ndim) or ("batch", *(f"axis{i}" for i in range(1, ndim)))


class Wrapped(Model):
    """A model whose forward calls ``hook(name, value)`` at its sites (see ``jinterp.byo.wrap``).

    Subclasses implement ``forward(inputs, hook) -> output``. ``axes`` holds (site name glob,
    axis names) pairs for sites whose axes are not the defaults (``DEFAULT_AXES`` by rank).
    """

    axes: tuple[tuple[str, tuple[str, ...]], ...] = eqx.field(static=True, kw_only=True, default=())

    @abc.abstractmethod
    def forward(self, inputs, hook):
        """The output; ``hook`` (None for the plain forward) is called at each site."""

    def __call__(self, inputs):
        """The plain forward: no site does anything."""
        return self.forward(inputs, None)

    @property
    def cfg(self):
        # Transformer-only tools read model.cfg first: say so instead of a bare AttributeError.
        raise AttributeError(f"A wrapped {type(self).__name__} model has no transformer Config: this function "
                             f"takes jinterp transformers only. Wrapped models support jinterp.run, jinterp.sites, "
                             f"jinterp.collect, patching.sweep and attribution.attribution_patching")

    def site_axes(self, name: str, ndim: int) -> tuple[str, ...]:
        for pattern, axes in self.axes:
            if fnmatch.fnmatchcase(name, pattern):
                if len(axes) != ndim:
                    raise ValueError(f"axes {axes} given for site {name!r} (pattern {pattern!r}), but its value "
                                     f"has {ndim} axes")
                return tuple(axes)
        return default_axes(ndim)

    def site_specs(self, inputs=None, **options) -> Specs:
        """Every site in forward order at ``inputs`` (arrays or ``jax.ShapeDtypeStruct``s), from an
        abstract trace (no compute), memoised on the model's and the inputs' structure and shapes."""
        self.check_inputs(inputs, **options)
        if inputs is None:
            raise TypeError(f"A wrapped {type(self).__name__} model's sites depend on its inputs: pass them "
                            f"(arrays or jax.ShapeDtypeStruct), e.g. jinterp.sites(model, inputs)")
        try:
            return _memoised_specs(_structure(self), _structure(inputs), _Ignored((self, inputs)))
        except TypeError:  # something unhashable in the structure: trace without the memo
            return _specs(self, inputs)

    def apply(self, inputs, interventions=(), **options) -> tuple[Array, Cache]:
        interventions = iv.flatten(interventions)
        hook = SiteCalls(self, iv.SiteHook.of(interventions, self.site_specs(inputs, **options)))  # (checks inputs)
        output = self.forward(inputs, hook)
        hook.site_hook.finish()
        return output, Cache(hook.records, ())


class SiteCalls:
    """What a wrapped model's forward calls at each site, ``hook(name, value, axes=None)``: it lists
    the sites in forward order with their specs and hands each value to the run's ``SiteHook``
    (None: list only). Captured values are recorded by site name."""

    def __init__(self, model: Wrapped, site_hook: iv.SiteHook | None = None):
        self.model, self.site_hook = model, site_hook
        self.specs: dict[str, SiteSpec] = {}
        self.records: dict[str, Array] = {}

    def __call__(self, name: str, value: Array, axes: tuple[str, ...] | None = None) -> Array:
        if not hasattr(value, "shape"):
            raise TypeError(f"Site {name!r}: the value is a {type(value).__name__}, not an array")
        if name in self.specs:
            raise ValueError(f"Site {name!r} is reached twice in one forward; give each site its own name "
                             f"(jinterp.byo.scope(hook, prefix) prefixes a submodule's names)")
        axes = self.model.site_axes(name, value.ndim) if axes is None else tuple(axes)
        site = S.site_key(name)
        self.specs[name] = SiteSpec(name, site.kind, site.layer, tuple(value.shape), np.dtype(value.dtype), axes)
        if self.site_hook is None:
            return value
        records: dict[str, Array] = {}
        value = self.site_hook.at_site(site.kind, value, site.layer, axes, records)
        if site.kind in records:
            self.records[name] = records[site.kind]
        return value


def site(name: str, value: Array, hook, axes: tuple[str, ...] | None = None) -> Array:
    """Mark ``value`` as the site ``name`` in your own model's forward: returns the value the
    forward continues with (``value`` itself when ``hook`` is None, the plain forward)."""
    return value if hook is None else hook(name, value, axes)


def scope(hook, prefix: str):
    """A hook that prefixes site names with ``prefix.`` (for a submodule used several times)."""
    return None if hook is None else lambda name, value, axes=None: hook(f"{prefix}.{name}", value, axes)


def _specs(model: Wrapped, inputs) -> Specs:
    calls = SiteCalls(model)
    eqx.filter_eval_shape(lambda m, x: m.forward(x, calls), model, inputs)
    return Specs(calls.specs.values())


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


@functools.lru_cache(maxsize=64)
def _memoised_specs(model_key, inputs_key, arguments: _Ignored) -> Specs:
    found = _specs(*arguments.value)
    arguments.value = None  # the memo's key must not hold on to the model's weights
    return found
