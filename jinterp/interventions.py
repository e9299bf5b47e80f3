"""The one intervention mechanism: pytrees applied at named sites of the forward pass.

An intervention's *structure* (its site kind and edit kind) is static; its *leaves* (values,
vectors, scales, and the layer/position/head indices it is restricted to) are arrays. So
``jax.jit`` compiles once per structure, ``jax.vmap`` sweeps over a batch of interventions,
and ``jax.grad`` with respect to the leaves is attribution.

The protocol is one method: ``intervention(value, at) -> value``, called at every site of its
kind. ``Edit`` subclasses implement ``edit(value, at)`` and get layer/position/head
restriction for free; ``Capture`` records the value. Interventions compose by listing them:
at a site they apply in order (``chain``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jinterp import names as S


class At(NamedTuple):
    """Where an intervention is being applied: the site kind, its axes, and the layer; plus the
    run's records (captures) and the intervention's own state carried through the layers."""

    kind: str
    axes: tuple[str, ...]
    layer: Array | int | None  # traced inside the layer scan
    records: dict
    states: dict
    index: int  # this intervention's position in the run, which keys its state

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

    def check(self, cfg, seq_len: int) -> None:
        """Raise a clear error if this intervention cannot apply to a model (eager values only)."""

    def initial_state(self, cfg, batch: int, seq: int):
        """State carried from site to site through the whole forward (None: stateless)."""
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


def site_key(site) -> S.Site:
    """The (kind, layer) a site name is keyed by. jinterp's own names parse as usual
    (``blocks.3.attn.z``: kind ``attn.z``, layer 3). Any other name is a site of a wrapped model
    (``jinterp.byo``), checked when it runs: its first integer path part (or ``*``) is its layer
    (``layers.3.mlp``: kind ``layers.*.mlp``, layer 3)."""
    parsed = S.parse(site)
    if parsed.kind in S.SITE_AXES or not isinstance(site, str):
        return parsed
    parts = site.split(".")
    for i, part in enumerate(parts):
        if part == "*" or part.isdigit():
            return S.Site(".".join([*parts[:i], "*", *parts[i + 1:]]), part if part == "*" else int(part))
    return S.Site(site, None)


def _split_site(site, layers) -> tuple[str, Array | None]:
    """A site name (with or without its layer) plus optional layers -> (kind, layer indices)."""
    parsed = site_key(site)
    if parsed.kind not in S.SITE_AXES:
        if not isinstance(site, str):
            raise ValueError(f"Unknown site {site!r}: no site kind {parsed.kind!r}. "
                             f"Valid kinds: {', '.join(S.SITE_AXES)}.")
        # A site of a user's own model: the wrapped model checks it when it runs.
        layer = [parsed.layer] if isinstance(parsed.layer, int) else None
        if layer is not None and layers is not None:
            raise ValueError(f"Site {site!r} already names layer {parsed.layer}; do not pass layers= too")
        return parsed.kind, _indices(layer if layers is None else layers, f"layers of {site!r}")
    in_block = parsed.kind in S.BLOCK_KINDS
    if parsed.layer is not None and not in_block:
        raise ValueError(f"Site {site!r}: {parsed.kind!r} is outside the blocks and has no layer")
    if isinstance(parsed.layer, int):
        if layers is not None:
            raise ValueError(f"Site {site!r} already names layer {parsed.layer}; do not pass layers= too")
        layers = [parsed.layer]
    elif in_block and parsed.layer is None and layers is None:
        raise ValueError(f"Site {site!r} is inside the blocks: name a layer (blocks.3.{parsed.kind}), "
                         f"every layer (blocks.*.{parsed.kind}), or pass layers=[...]")
    if layers is not None and not in_block:
        raise ValueError(f"Site {site!r} is outside the blocks; layers= does not apply")
    return parsed.kind, _indices(layers, f"layers of {site!r}")


def _axis_mask(indices: Array, axis_size: int) -> Array:
    """Boolean mask over an axis from (possibly negative) indices."""
    return jnp.any(jnp.arange(axis_size)[:, None] == (indices % axis_size)[None, :], axis=-1)


class Edit(Intervention):
    """An edit restricted to some layers, positions and heads (None = all of them).

    ``positions`` index the ``pos`` axis (the query position for ``attn.scores`` and
    ``attn.pattern``); negative indices count from the end. ``heads`` index query heads, or
    key/value heads at the kv-head sites ``attn.k``, ``attn.v``, ``attn.rot_k``.
    """

    site: str = eqx.field(static=True)
    layers: Int[Array, "n"] | None
    positions: Int[Array, "n"] | None
    heads: Int[Array, "n"] | None

    def _restrict(self, site, layers, positions, heads) -> None:
        """Set the site kind and the layer/position/head restriction (call from ``__init__``)."""
        self.site, self.layers = _split_site(site, layers)
        self.positions = _indices(positions, "positions")
        self.heads = _indices(heads, "heads")

    def edit(self, value: Array, at: At) -> Array:
        raise NotImplementedError

    def _layer_value(self, stacked: Array, at: At) -> Array:
        """The slice of a per-layer stack ``[n_layers, ...]`` for the layer being run."""
        if at.layer is None:
            raise ValueError(f"per_layer values apply to block sites; {at.kind!r} is outside the blocks")
        return stacked[at.layer]

    def __call__(self, value: Array, at: At) -> Array:
        new = self.edit(value, at)
        mask = self._mask(value, at)
        return new if mask is None else jnp.where(mask, new, value)

    def _mask(self, value: Array, at: At) -> Array | None:
        mask = None
        if self.layers is not None and at.layer is not None:
            mask = jnp.any(self.layers == at.layer)
        for indices, axis_names in ((self.positions, ("pos", "query_pos")), (self.heads, ("head", "kv_head"))):
            if indices is None:
                continue
            axis = next(i for i, a in enumerate(at.axes) if a in axis_names)
            shape = [1] * value.ndim
            shape[axis] = value.shape[axis]
            axis_mask = _axis_mask(indices, value.shape[axis]).reshape(shape)
            mask = axis_mask if mask is None else mask & axis_mask
        return mask

    def check(self, cfg, seq_len: int) -> None:
        axes = S.SITE_AXES[self.site]
        where = f"edit at {self.site!r}"
        if self.heads is not None:
            head_axis = next((a for a in axes if a in ("head", "kv_head")), None)
            if head_axis is None:
                raise ValueError(f"{where}: heads= given but this site has no head axis (axes {axes})")
            n = cfg.n_heads if head_axis == "head" else cfg.n_kv_heads
            _check_range(self.heads, n, f"{where}: head", "kv heads" if head_axis == "kv_head" else "heads")
        if self.positions is not None:
            _check_range(self.positions, seq_len, f"{where}: position", "positions", negative=True)
        if self.layers is not None:
            _check_range(self.layers, cfg.n_layers, f"{where}: layer", "layers")

    def _check_per_layer(self, stacked: Array, cfg, what: str) -> None:
        if getattr(self, "per_layer", False) and stacked.shape[:1] != (cfg.n_layers,):
            raise ValueError(f"{what} at {self.site!r} is per-layer with leading axis {stacked.shape[:1]}; this "
                             f"model has {cfg.n_layers} layers (capture 'blocks.*.{self.site}' for a full stack)")

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


def _check_range(indices: Array, size: int, what: str, plural: str, negative: bool = False) -> None:
    if not _concrete(indices):
        return
    values = np.asarray(indices)
    low = -size if negative else 0
    bad = values[(values < low) | (values >= size)]
    if bad.size:
        raise ValueError(f"{what} {int(bad[0])} is out of range: there are {size} {plural} "
                         f"(valid {low}..{size - 1})")


def _concrete(x) -> bool:
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

    def __init__(self, site, value, *, layers=None, positions=None, heads=None, per_layer=False):
        self._restrict(site, layers, positions, heads)
        self.value, self.per_layer = jnp.asarray(value), per_layer

    def edit(self, value, at):
        given = self._layer_value(self.value, at) if self.per_layer else self.value
        return jnp.broadcast_to(self._value(value, at, given, "Replace value"), value.shape)

    def check(self, cfg, seq_len: int) -> None:
        super().check(cfg, seq_len)
        self._check_per_layer(self.value, cfg, "Replace value")


class Add(Edit):
    """Add ``scale * vector`` (steering). ``per_layer=True``: a leading ``n_layers`` axis."""

    vector: Float[Array, "..."]
    scale: Float[Array, ""]
    per_layer: bool = eqx.field(static=True)

    def __init__(self, site, vector, scale=1.0, *, layers=None, positions=None, heads=None, per_layer=False):
        self._restrict(site, layers, positions, heads)
        self.vector, self.scale, self.per_layer = jnp.asarray(vector), jnp.asarray(scale, jnp.float32), per_layer

    def edit(self, value, at):
        given = self._layer_value(self.vector, at) if self.per_layer else self.vector
        return value + self.scale.astype(value.dtype) * self._value(value, at, given, "Add vector")

    def check(self, cfg, seq_len: int) -> None:
        super().check(cfg, seq_len)
        self._check_per_layer(self.vector, cfg, "Add vector")


class Scale(Edit):
    """Multiply the value by ``factor`` (a scalar or anything that broadcasts)."""

    factor: Float[Array, "..."]

    def __init__(self, site, factor, *, layers=None, positions=None, heads=None):
        self._restrict(site, layers, positions, heads)
        self.factor = jnp.asarray(factor, jnp.float32) if isinstance(factor, (int, float)) else jnp.asarray(factor)

    def edit(self, value, at):
        return value * self._value(value, at, self.factor, "Scale factor")


class Zero(Edit):
    """Set the value to zero (zero ablation)."""

    def __init__(self, site, *, layers=None, positions=None, heads=None):
        self._restrict(site, layers, positions, heads)

    def edit(self, value, at):
        return jnp.zeros_like(value)


def _orthonormal(basis: Array) -> Array:
    """Orthonormal columns spanning ``basis`` ([d, k]); differentiable (QR)."""
    return jnp.linalg.qr(basis)[0]


class Project(Edit):
    """Project out (``keep=False``) or keep only (``keep=True``) the subspace spanned by the
    columns of ``basis`` ``[d, k]``, on the site's last axis (d_model, d_head or d_mlp)."""

    basis: Float[Array, "d k"]
    keep: bool = eqx.field(static=True)

    def __init__(self, site, basis, *, keep=False, layers=None, positions=None, heads=None):
        self._restrict(site, layers, positions, heads)
        basis = jnp.asarray(basis)
        self.basis, self.keep = basis[:, None] if basis.ndim == 1 else basis, keep

    def edit(self, value, at):
        q = self._basis(value, at)
        inside = (value @ q) @ q.T
        return inside if self.keep else value - inside

    def _basis(self, value, at):
        if self.basis.ndim != 2 or self.basis.shape[0] != value.shape[-1]:
            raise ValueError(f"Project basis at {at.kind!r} has shape {self.basis.shape}; expected "
                             f"[{value.shape[-1]}, k] for the site's last axis ({at.axes[-1]})")
        return _orthonormal(self.basis.astype(value.dtype))


class Interchange(Edit):
    """Distributed interchange (DAS): in the subspace spanned by ``rotation``'s k orthonormalised
    columns (``[d, k]``, a learnable parameter), take the coordinates from ``source``:
    ``x + Q (Q^T s - Q^T x)``. ``per_layer=True``: ``source`` has a leading ``n_layers`` axis."""

    rotation: Float[Array, "d k"]
    source: Float[Array, "..."]
    per_layer: bool = eqx.field(static=True)

    def __init__(self, site, source, rotation, *, layers=None, positions=None, heads=None, per_layer=False):
        self._restrict(site, layers, positions, heads)
        self.source, self.rotation, self.per_layer = jnp.asarray(source), jnp.asarray(rotation), per_layer

    def edit(self, value, at):
        if self.rotation.ndim != 2 or self.rotation.shape[0] != value.shape[-1]:
            raise ValueError(f"Interchange rotation at {at.kind!r} has shape {self.rotation.shape}; expected "
                             f"[{value.shape[-1]}, k]")
        q = _orthonormal(self.rotation.astype(value.dtype))
        source = self._layer_value(self.source, at) if self.per_layer else self.source
        source = jnp.broadcast_to(self._value(value, at, source, "Interchange source"), value.shape)
        return value + ((source - value) @ q) @ q.T

    def check(self, cfg, seq_len: int) -> None:
        super().check(cfg, seq_len)
        self._check_per_layer(self.source, cfg, "Interchange source")


class Capture(Intervention):
    """Record the value at a site, e.g. ``Capture("blocks.3.attn.z")`` or ``Capture("blocks.*.resid_pre")``.

    ``jinterp.run(capture=[...])`` records after the run's edits; listed among the edits, a
    Capture records the value at that point of the chain (before an edit that follows it).
    """

    site: str = eqx.field(static=True)
    layers: tuple[int, ...] | None = eqx.field(static=True)  # None: every layer (or not a block site)

    def __init__(self, site, layers=None):
        parsed = site_key(site)
        self.site = parsed.kind
        if isinstance(parsed.layer, int):
            layers = (parsed.layer,) if layers is None else layers
        self.layers = None if layers is None else tuple(int(layer) for layer in layers)

    def __call__(self, value, at):
        if at.kind in at.records:
            raise ValueError(f"Site {at.kind!r} is captured twice in one run")
        at.records[at.kind] = value
        return value

    def entries(self, n_layers: int) -> list[tuple[str, int | None]]:
        """(cache name, layer) pairs this capture produces."""
        if self.site not in S.BLOCK_KINDS:
            return [(self.site, None)]
        layers = range(n_layers) if self.layers is None else self.layers
        return [(f"blocks.{layer}.{self.site}", layer) for layer in layers]

    def check(self, cfg, seq_len: int) -> None:
        if self.layers is not None:
            _check_range(np.asarray(self.layers), cfg.n_layers, f"capture of {self.site!r}: layer", "layers")


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
                    f"them, got {type(interventions).__name__}: {interventions!r}")


class SiteHook:
    """What the forward calls at each site: the interventions of that kind, in order.

    Built during tracing only; ``records`` collects captured values for this layer and
    ``states`` holds stateful interventions' state (the forward threads it through the layers).
    """

    def __init__(self, by_kind: dict[str, Sequence[tuple[int, Intervention]]], layer, states: dict):
        self.by_kind = by_kind
        self.layer = layer
        self.records: dict[str, Array] = {}
        self.states = states

    def __call__(self, kind: str, value: Array) -> Array:
        for index, intervention in self.by_kind.get(kind, ()):
            value = intervention(value, At(kind, S.SITE_AXES[kind], self.layer, self.records, self.states, index))
        return value

    def wants(self, kind: str) -> bool:
        return kind in self.by_kind


def by_kind(interventions: Sequence[Intervention]) -> dict[str, list[tuple[int, Intervention]]]:
    """Interventions grouped by the site kind they act at, with their position in the run."""
    grouped: dict[str, list[tuple[int, Intervention]]] = {}
    for index, intervention in enumerate(interventions):
        for kind in intervention.kinds():
            grouped.setdefault(kind, []).append((index, intervention))
    return grouped


def initial_states(interventions: Sequence[Intervention], cfg, batch: int, seq: int) -> dict:
    states = {i: x.initial_state(cfg, batch, seq) for i, x in enumerate(interventions)}
    return {i: state for i, state in states.items() if state is not None}
