"""The one intervention mechanism: pytrees applied at named sites of the forward pass.

An intervention's *structure* (its site kind and edit kind) is static; its *leaves* (values,
vectors, scales, and the layer/position/head indices it is restricted to) are arrays. So
``jax.jit`` compiles once per structure, ``jax.vmap`` sweeps over a batch of interventions,
and ``jax.grad`` with respect to the leaves is attribution.

The protocol is one method: ``intervention(value, at) -> value``, called at every site of its
kind, by every model (``SiteHook``). ``Edit`` subclasses implement ``edit(value, at)`` and get
layer and axis restriction (positions, heads, any named axis) for free; ``Capture`` records the
value. Interventions check themselves against the sites' specs (``check``), never against one
family's config, so every intervention works on every model. Interventions compose by listing
them: at a site they apply in order (``chain``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jinterp import names as S
from jinterp.specs import SiteSpec, layers_of


class At(NamedTuple):
    """Where an intervention is being applied: the site kind, its axes, and the layer; plus the
    run's records (captures) and the intervention's own state carried through the layers."""

    kind: str
    axes: tuple[str, ...]
    layer: Array | int | None  # traced inside the layer scan
    records: dict
    states: dict
    index: int  # this intervention's position in the run, which keys its state
    offset: Array | int = 0  # the sequence position of this call's first position (decoding, a cached prefix)

    @property
    def state(self):
        return self.states[self.index]

    def set_state(self, value) -> None:
        self.states[self.index] = value


class Intervention(eqx.Module):
    """Protocol: ``__call__(value, at)`` returns the value the forward continues with."""

    site: eqx.AbstractVar[str]  # the site kind, e.g. "resid_pre" or "attn.z"

    def __call__(self, value: Array, at: At) -> Array:
        raise NotImplementedError

    def kinds(self) -> tuple[str, ...]:
        """The site kinds this intervention acts at (one for most; several for stateful ones)."""
        return (self.site,)

    def check(self, specs: Sequence[SiteSpec]) -> None:
        """Raise a clear error if this intervention cannot apply at these sites (the model's sites of
        its kinds, at this run's inputs; values checked only when concrete)."""

    def initial_state(self, specs: Mapping[str, SiteSpec]):
        """State carried from site to site through the whole forward (None: stateless), given every
        site's spec at this run's inputs."""
        return None


def _indices(values, what: str) -> Int[Array, "n"] | None:
    if values is None:
        return None
    arr = values if hasattr(values, "dtype") else np.asarray(values)
    if arr.ndim == 0:
        arr = arr[None]
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{what} must be integer indices, got dtype {arr.dtype}")
    return jnp.asarray(arr, jnp.int32)


def _split_site(site, layers) -> tuple[str, Array | None]:
    """A site name (with or without its layer) plus optional layers -> (kind, layer indices). A kind
    jinterp does not know is a site of another model (jinterp.byo): checked against its specs when it runs."""
    parsed = S.site_key(site)
    known, in_block = parsed.kind in S.SITE_AXES, parsed.kind in S.BLOCK_KINDS
    if not known and not isinstance(site, str):
        raise ValueError(f"Unknown site {site!r}: no site kind {parsed.kind!r}. "
                         f"Valid kinds: {', '.join(S.SITE_AXES)}.")
    if known and parsed.layer is not None and not in_block:
        raise ValueError(f"Site {site!r}: {parsed.kind!r} is outside the blocks and has no layer")
    if isinstance(parsed.layer, int):
        if layers is not None:
            raise ValueError(f"Site {site!r} already names layer {parsed.layer}; do not pass layers= too")
        layers = [parsed.layer]
    elif in_block and parsed.layer is None and layers is None:
        raise ValueError(f"Site {site!r} is inside the blocks: name a layer (blocks.3.{parsed.kind}), "
                         f"every layer (blocks.*.{parsed.kind}), or pass layers=[...]")
    if known and layers is not None and not in_block:
        raise ValueError(f"Site {site!r} is outside the blocks; layers= does not apply")
    return parsed.kind, _indices(layers, f"layers of {site!r}")


def _axis_mask(indices: Array, axis_size: int, offset: Array | int = 0) -> Array:
    """Boolean mask over an axis holding entries ``offset..offset + axis_size`` of a longer one ending
    there, from indices into that one: negative ones count from its end, others out of range match
    nothing."""
    end = offset + axis_size
    indices = jnp.where(indices < 0, indices + end, indices)
    return jnp.any((offset + jnp.arange(axis_size))[:, None] == indices[None, :], axis=-1)


def axis_of(axes: tuple[str, ...], name: str) -> int | None:
    """The index of the axis ``name`` names: ``"pos"`` and ``"head"`` by role (either position or
    either head axis), any other axis by its own name."""
    return next((i for i, axis in enumerate(axes) if axis == name or S.role(axis) == name), None)


class Edit(Intervention):
    """An edit restricted to some layers and to some indices of the site's axes (None = all).

    ``positions`` index the ``pos`` axis (the query position for ``attn.scores`` and
    ``attn.pattern``); negative indices count from the end. ``heads`` index query heads, or
    key/value heads at the kv-head sites ``attn.k``, ``attn.v``, ``attn.rot_k``. ``experts`` index the
    experts of a mixture-of-experts block (``moe.*`` sites). ``indices`` restricts any named axis,
    ``{"channel": [3]}``; positions, heads and experts are its ``pos``, ``head`` and ``expert`` entries.
    """

    site: str = eqx.field(static=True)
    layers: Int[Array, "n"] | None
    indices: dict[str, Int[Array, "n"]]
    value_field: ClassVar[str | None] = None  # the field holding the edit's value (with ``per_layer``: one per layer)

    def _restrict(self, site, layers, positions=None, heads=None, indices=None, experts=None) -> None:
        """Set the site kind and the layer and axis restriction (call from ``__init__``)."""
        self.site, self.layers = _split_site(site, layers)
        named = {"pos": (positions, "positions"), "head": (heads, "heads"), "expert": (experts, "experts")}
        given = {axis: (i, f"indices[{axis!r}]") for axis, i in (indices or {}).items()}
        given |= {axis: found for axis, found in named.items() if found[0] is not None}
        self.indices = {axis: _indices(i, what) for axis, (i, what) in given.items() if i is not None}

    @property
    def positions(self) -> Int[Array, "n"] | None:
        return self.indices.get("pos")

    def edit(self, value: Array, at: At) -> Array:
        raise NotImplementedError

    def _given(self, value: Array, at: At) -> Array:
        """The edit's own value (``value_field``) for the layer being run, checked against the site's
        ``value`` and cast (``_value``); with ``per_layer``, its slice of the stack ``[n_layers, ...]``."""
        given = getattr(self, self.value_field)
        if getattr(self, "per_layer", False):
            if at.layer is None:
                raise ValueError(f"per_layer values apply to sites with a layer; {at.kind!r} has none")
            given = given[at.layer]
        return self._value(value, at, given, f"{type(self).__name__} {self.value_field}")

    def __call__(self, value: Array, at: At) -> Array:
        new = self.edit(value, at)
        mask = self._mask(value, at)
        return new if mask is None else jnp.where(mask, new, value)

    def _mask(self, value: Array, at: At) -> Array | None:
        mask = None
        if self.layers is not None and at.layer is not None:
            mask = jnp.any(self.layers == at.layer)
        for name, indices in self.indices.items():
            axis = axis_of(at.axes, name)
            shape = [1] * value.ndim
            shape[axis] = value.shape[axis]
            offset = at.offset if S.role(at.axes[axis]) == "pos" else 0
            axis_mask = _axis_mask(indices, value.shape[axis], offset).reshape(shape)
            mask = axis_mask if mask is None else mask & axis_mask
        return mask

    def check(self, specs: Sequence[SiteSpec]) -> None:
        where = f"edit at {self.site!r}"
        layers = sorted({spec.layer for spec in specs if spec.layer is not None})
        if self.layers is not None:
            _check_layers(self.layers, layers, f"{where}: layer")
        for spec in reached(self, specs):
            for name, indices in self.indices.items():
                axis = axis_of(spec.axes, name)
                if axis is None:
                    given = {"pos": "positions=", "head": "heads=", "expert": "experts="}.get(
                        name, f"indices[{name!r}]")
                    raise ValueError(f"edit at {spec.name!r}: {given} given but this site has no {name!r} axis (axes "
                                     f"{spec.axes}); a wrapped model names its sites' axes with "
                                     f"jinterp.byo.wrap(..., axes={{{spec.name!r}: (...)}})")
                one, many = _INDEX_WORDS.get(spec.axes[axis], (f"{name} index", f"{name} indices"))
                _check_range(indices, spec.shape[axis], f"{where}: {one}", many, negative=name == "pos")
        stacked = getattr(self, self.value_field) if getattr(self, "per_layer", False) else None
        if stacked is not None and layers and stacked.shape[:1] != (max(layers) + 1,):
            raise ValueError(f"{type(self).__name__} {self.value_field} at {self.site!r} is per-layer with leading "
                             f"axis {stacked.shape[:1]}; this model has {max(layers) + 1} layers (capture every layer "
                             f"of {self.site!r} for a full stack)")

    def _value(self, value: Array, at: At, given: Array, what: str) -> Array:
        """Check that ``given`` broadcasts to the site's value and has a float dtype; cast it."""
        if not jnp.issubdtype(given.dtype, jnp.floating):
            raise TypeError(f"{what} at {at.kind!r} must be a float array, got dtype {given.dtype}")
        try:
            shape = np.broadcast_shapes(given.shape, value.shape)
        except ValueError:
            shape = None
        if shape != value.shape:
            raise ValueError(
                f"{what} at {at.kind!r} has shape {given.shape}, which does not broadcast to the "
                f"site's shape {value.shape} (axes {at.axes})")
        return given.astype(value.dtype)


_INDEX_WORDS = {"pos": ("position", "positions"), "query_pos": ("position", "positions"), "head": ("head", "heads"),
                "kv_head": ("head", "kv heads"), "expert": ("expert", "experts")}


def reached(intervention: Intervention, specs: Sequence[SiteSpec]) -> list[SiteSpec]:
    """The sites among ``specs`` (of the intervention's kinds) it acts at: those of its layers when
    they are known now, else all of them."""
    return [spec for spec in specs if reaches(intervention, spec.layer)]


def reaches(intervention: Intervention, layer) -> bool:
    """Whether an intervention acts at a site at ``layer`` (an int, None, or traced inside a scan)."""
    layers = getattr(intervention, "layers", None)
    if layers is None:
        return True
    if layer is None:
        return False
    if not isinstance(layer, (int, np.integer)) or not concrete(layers):
        return True  # a traced layer or traced layers: the edit masks itself by layer
    return int(layer) in {int(x) for x in np.asarray(layers).ravel()}


def _check_layers(indices, layers: list[int], what: str) -> None:
    if not concrete(indices):
        return
    bad = [int(x) for x in np.asarray(indices).ravel() if int(x) not in layers]
    if bad:
        valid = f"0..{layers[-1]}" if layers == list(range(len(layers))) else ", ".join(map(str, layers))
        raise ValueError(f"{what} {bad[0]} is out of range: there are {len(layers)} layers (valid {valid})")


def _check_range(indices: Array, size: int | str, what: str, plural: str, negative: bool = False) -> None:
    if not concrete(indices) or not isinstance(size, (int, np.integer)):  # a symbolic size ("pos"): checked at run
        return
    values = np.asarray(indices)
    low = -size if negative else 0
    bad = values[(values < low) | (values >= size)]
    if bad.size:
        raise ValueError(f"{what} {int(bad[0])} is out of range: there are {size} {plural} "
                         f"(valid {low}..{size - 1})")


def concrete(x) -> bool:
    try:
        np.asarray(x)
        return True
    except Exception:  # a tracer: checked values are not available under jit
        return False


class Replace(Edit):
    """Replace the value with ``value`` (broadcast to the site's shape). With ``per_layer=True``
    the value has a leading ``n_layers`` axis and layer l takes ``value[l]`` (patching from a
    cache stack)."""

    value: Float[Array, "..."]
    per_layer: bool = eqx.field(static=True)
    value_field: ClassVar[str] = "value"

    def __init__(self, site, value, *, layers=None, positions=None, heads=None, indices=None, experts=None,
                 per_layer=False):
        self._restrict(site, layers, positions, heads, indices, experts)
        self.value, self.per_layer = jnp.asarray(value), per_layer

    def edit(self, value, at):
        return jnp.broadcast_to(self._given(value, at), value.shape)


class Add(Edit):
    """Add ``scale * vector`` (steering). ``per_layer=True``: a leading ``n_layers`` axis."""

    vector: Float[Array, "..."]
    scale: Float[Array, ""]
    per_layer: bool = eqx.field(static=True)
    value_field: ClassVar[str] = "vector"

    def __init__(self, site, vector, scale=1.0, *, layers=None, positions=None, heads=None, indices=None, experts=None,
                 per_layer=False):
        self._restrict(site, layers, positions, heads, indices, experts)
        self.vector, self.scale, self.per_layer = jnp.asarray(vector), jnp.asarray(scale, jnp.float32), per_layer

    def edit(self, value, at):
        return value + self.scale.astype(value.dtype) * self._given(value, at)


class Scale(Edit):
    """Multiply the value by ``factor`` (a scalar or anything that broadcasts)."""

    factor: Float[Array, "..."]
    value_field: ClassVar[str] = "factor"

    def __init__(self, site, factor, *, layers=None, positions=None, heads=None, indices=None, experts=None):
        self._restrict(site, layers, positions, heads, indices, experts)
        self.factor = jnp.asarray(factor, jnp.float32) if isinstance(factor, (int, float)) else jnp.asarray(factor)

    def edit(self, value, at):
        return value * self._given(value, at)


class Zero(Edit):
    """Set the value to zero (zero ablation)."""

    def __init__(self, site, *, layers=None, positions=None, heads=None, indices=None, experts=None):
        self._restrict(site, layers, positions, heads, indices, experts)

    def edit(self, value, at):
        return jnp.zeros_like(value)


def _orthonormal(basis: Array, value: Array, at: At, what: str) -> Array:
    """Orthonormal columns spanning ``basis`` ([d, k], d the site's last axis); differentiable (QR)."""
    if basis.ndim != 2 or basis.shape[0] != value.shape[-1]:
        raise ValueError(f"{what} at {at.kind!r} has shape {basis.shape}; expected "
                         f"[{value.shape[-1]}, k] for the site's last axis ({at.axes[-1]})")
    return jnp.linalg.qr(basis.astype(value.dtype))[0]


class Project(Edit):
    """Project out (``keep=False``) or keep only (``keep=True``) the subspace spanned by the
    columns of ``basis`` ``[d, k]``, on the site's last axis (d_model, d_head or d_mlp)."""

    basis: Float[Array, "d k"]
    keep: bool = eqx.field(static=True)

    def __init__(self, site, basis, *, keep=False, layers=None, positions=None, heads=None, indices=None, experts=None):
        self._restrict(site, layers, positions, heads, indices, experts)
        basis = jnp.asarray(basis)
        self.basis, self.keep = basis[:, None] if basis.ndim == 1 else basis, keep

    def edit(self, value, at):
        q = _orthonormal(self.basis, value, at, "Project basis")
        inside = (value @ q) @ q.T
        return inside if self.keep else value - inside


class Interchange(Edit):
    """Distributed interchange (DAS): in the subspace spanned by ``rotation``'s k orthonormalised
    columns (``[d, k]``, a learnable parameter), take the coordinates from ``source``:
    ``x + Q (Q^T s - Q^T x)``. ``per_layer=True``: ``source`` has a leading ``n_layers`` axis."""

    rotation: Float[Array, "d k"]
    source: Float[Array, "..."]
    per_layer: bool = eqx.field(static=True)
    value_field: ClassVar[str] = "source"

    def __init__(self, site, source, rotation, *, layers=None, positions=None, heads=None, indices=None, experts=None,
                 per_layer=False):
        self._restrict(site, layers, positions, heads, indices, experts)
        self.source, self.rotation, self.per_layer = jnp.asarray(source), jnp.asarray(rotation), per_layer

    def edit(self, value, at):
        q = _orthonormal(self.rotation, value, at, "Interchange rotation")
        source = jnp.broadcast_to(self._given(value, at), value.shape)
        return value + ((source - value) @ q) @ q.T


class Capture(Intervention):
    """Record the value at a site, e.g. ``Capture("blocks.3.attn.z")`` or ``Capture("blocks.*.resid_pre")``.

    ``jinterp.run(capture=[...])`` records after the run's edits; listed among the edits, a
    Capture records the value at that point of the chain (before an edit that follows it).
    """

    site: str = eqx.field(static=True)
    layers: tuple[int, ...] | None = eqx.field(static=True)  # None: every layer (or not a block site)

    def __init__(self, site, layers=None):
        parsed = S.site_key(site)
        self.site = parsed.kind
        if isinstance(parsed.layer, int):
            layers = (parsed.layer,) if layers is None else layers
        self.layers = None if layers is None else tuple(int(layer) for layer in layers)

    def __call__(self, value, at):
        if at.kind in at.records:
            raise ValueError(f"Site {at.kind!r} is captured twice in one run")
        at.records[at.kind] = value
        return value

    def names(self, specs: Mapping[str, SiteSpec]) -> list[str]:
        """The names of the sites this capture records, in forward order."""
        return [spec.name for spec in specs.values() if spec.kind == self.site and reaches(self, spec.layer)]

    def check(self, specs: Sequence[SiteSpec]) -> None:
        if self.layers is not None:
            _check_layers(self.layers, sorted(layers_of({s.name: s for s in specs}, self.site)),
                          f"capture of {self.site!r}: layer")


def captures(specs: Mapping[str, SiteSpec], names: Iterable[str]) -> tuple[Capture, ...]:
    """Capture interventions recording the sites ``names`` (concrete names): one per kind."""
    by_kind: dict[str, list] = {}
    for name in names:
        by_kind.setdefault(specs[name].kind, []).append(specs[name].layer)
    return tuple(Capture(kind, None if None in layers else sorted(layers)) for kind, layers in by_kind.items())


def chain(*interventions) -> tuple[Intervention, ...]:
    """Compose interventions: at each site they apply in the order given."""
    return flatten(interventions)


def flatten(interventions) -> tuple[Intervention, ...]:
    """Interventions given as one, a list, or nested lists/chains -> a flat tuple."""
    if interventions is None:
        return ()
    if isinstance(interventions, Intervention):
        return (interventions,)
    if isinstance(interventions, Iterable) and not isinstance(interventions, (str, bytes)):
        return tuple(i for item in interventions for i in flatten(item))
    raise TypeError(f"Expected an Intervention (Replace, Add, Scale, Zero, Capture, ...) or a list of "
                    f"them (jinterp.run and generate also take a recipe's .json path, see jinterp.save_edits), got "
                    f"{type(interventions).__name__}: {interventions!r}")


class SiteHook:
    """What a model's forward calls at each of its sites: the run's interventions of that site's
    kind, in order, each at the sites it reaches. jinterp's transformer calls it inside its layer
    scan as ``hook(kind, value)`` (the layer traced); a wrapped model's adapter (``jinterp.byo``) calls
    ``at_site`` with each site's own layer and axes. Built during tracing only: ``records`` collects
    captured values, ``states`` stateful interventions' state (threaded through the forward).
    """

    def __init__(self, grouped: Mapping[str, Sequence[tuple[int, Intervention]]], states: dict, layer=None,
                 offset: Array | int = 0):
        self.grouped, self.states, self.layer, self.offset = grouped, states, layer, offset
        self.records: dict[str, Array] = {}
        self.applied: set[int] = set()
        self.misfits: dict[int, Exception] = {}

    @classmethod
    def of(cls, interventions: Sequence[Intervention], specs: Mapping[str, SiteSpec]) -> SiteHook:
        """The hook of a run: the interventions grouped by kind, stateful ones with their initial state."""
        grouped: dict[str, list[tuple[int, Intervention]]] = {}
        for index, intervention in enumerate(interventions):
            for kind in intervention.kinds():
                grouped.setdefault(kind, []).append((index, intervention))
        states = {i: x.initial_state(specs) for i, x in enumerate(interventions)}
        return cls(grouped, {i: state for i, state in states.items() if state is not None})

    def at_layer(self, layer, states: dict) -> SiteHook:
        """This run's hook for one layer of a scan over layers (fresh records, the carried states)."""
        return SiteHook(self.grouped, states, layer, self.offset)

    def __call__(self, kind: str, value: Array) -> Array:
        return self.at_site(kind, value, self.layer, S.SITE_AXES[kind])

    def at_site(self, kind: str, value: Array, layer, axes: tuple[str, ...], records: dict | None = None) -> Array:
        """The value the forward continues with at a site of ``kind`` at ``layer`` with ``axes``."""
        records = self.records if records is None else records
        for index, intervention in self.grouped.get(kind, ()):
            at = At(kind, axes, layer, records, self.states, index, self.offset)
            if reaches(intervention, layer) and self._fits(index, intervention, value, at):
                value = intervention(value, at)
                self.applied.add(index)
        return value

    def _fits(self, index: int, intervention: Intervention, value: Array, at: At) -> bool:
        """At a site of a known layer, an edit whose layers are traced (built inside jit or vmap) may be
        meant for another layer of the kind, of another shape: it acts only where it can."""
        if not isinstance(at.layer, int) or concrete(getattr(intervention, "layers", None)):
            return True
        try:
            jax.eval_shape(lambda v: intervention(v, at._replace(records={}, states=dict(self.states))), value)
            return True
        except (ValueError, TypeError) as error:
            self.misfits.setdefault(index, error)
            return False

    def finish(self) -> None:
        """After the forward: an edit with traced layers that fitted no site raises why."""
        for index, error in self.misfits.items():
            if index not in self.applied:
                raise error

    def wants(self, kind: str) -> bool:
        return kind in self.grouped
