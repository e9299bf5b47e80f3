"""Activation patching sweeps and path patching, each one compiled program, for every model.

Conventions. The two inputs of a contrast are ``clean`` and ``corrupted``. ``direction="denoise"``
(TransformerLens' convention, the default everywhere) runs the *corrupted* input (the base run) and
patches in the *clean* activation (the source): the metric measures how much of the clean behaviour
one component restores. ``direction="noise"`` runs the clean input and patches in the corrupted
activation: how much one component's corruption breaks it.

What a sweep iterates over. ``site`` names the sites (a kind such as ``"resid_pre"`` or ``"z"``:
every layer; a name, a glob or a list). ``per`` names the axes patched one index at a time (the
others, batch included, are patched together): ``"pos"``, ``"head"`` (either head axis), any axis of
the site, or a tuple of them; the presets ``"position"``, ``"head"``, ``"head_position"`` and
``"layer"`` (the whole site at each layer) are aliases. The default is ``"head"`` at a site with a
head axis, else ``"pos"``, else its last axis.

How a sweep runs. Every patch is one ``Replace`` edit on the standard intervention mechanism; a
batch of patches is ``jax.vmap``-ed inside one ``jit``, the layer a traced index, so all the layers
of a kind are one compiled program. A patch whose source value equals the base value changes
nothing: it scores as the unpatched base run without being computed. Patches are processed in
chunks of whole sites, as many as make matrix products of about ``ROWS`` rows within a memory budget,
with a progress bar. A model may offer more (``protocol.Model``): jinterp's transformer resumes a
chunk's patched forwards from the cached residual stream at the chunk's first layer, and, causal
models, computes only the positions from the first token where the two inputs differ, attending to
the base run's cached keys and values for the earlier ones.

Chunks. ``sweep_chunks`` and ``path_patch_chunks`` return the same computation as a ``Chunks``:
each chunk can be computed on its own (and checkpointed: ``jinterp.runs.Run.chunked`` does), and
``assemble`` turns the chunk results into the array ``sweep`` returns, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jinterp import memory, sharding
from jinterp import names as S
from jinterp._compile import jit
from jinterp.core import apply, run
from jinterp.interventions import Capture, Replace, axis_of
from jinterp.models.config import choose
from jinterp.protocol import Model
from jinterp.specs import Specs, canonical, match, of_kind

DIRECTIONS = ("denoise", "noise")
SHORT_NAMES = {"z": "attn.z", "q": "attn.q", "k": "attn.k", "v": "attn.v", "pattern": "attn.pattern"}
ROWS = 1024  # XLA:CPU's matrix products run far below the machine's peak with fewer rows than this
PER_PRESETS = {"position": ("pos",), "head": ("head",), "head_position": ("head", "pos"), "layer": (), "site": ()}


@dataclass(frozen=True)
class Chunks:
    """A computation split into chunks: ``compute(i)`` for ``i in range(n)``, then ``assemble``."""

    n: int
    compute: Callable[[int], jax.Array]
    assemble: Callable[[list], jax.Array]
    description: str
    layout: str = ""  # a digest of what each chunk holds, where that can change (``runs.Run.chunked`` checks it)

    def run(self, progress: bool = True) -> jax.Array:
        """Every chunk in order, with a progress bar."""
        return self.assemble([self.compute(i) for i in tqdm(range(self.n), desc=self.description, unit="chunk",
                                                            disable=not progress)])


class Target(NamedTuple):
    """Sites one compiled program patches: one kind's sites of one shape (a traced layer picks one)."""

    kind: str
    names: tuple[str, ...]
    layers: tuple  # each site's layer (None: the kind has none)
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    per: tuple[int, ...]  # the positions of the per axes among ``axes``
    stacked: bool  # every layer of the kind is here: values are [all layers, ...], indexed by layer

    @property
    def sizes(self) -> tuple[int, ...]:
        """A result's shape for this target: one row per site, then the per axes."""
        return (len(self.names), *(self.shape[a] for a in self.per))


def pair(model: Model, clean, corrupted, direction: str, **options):
    """(base, source) inputs of a contrast, checked: base is patched, source gives the values."""
    choose(direction, DIRECTIONS, "patching direction")
    shapes = jax.tree.map(np.shape, (clean, corrupted))
    if shapes[0] != shapes[1]:
        raise ValueError(f"clean inputs {shapes[0]} and corrupted inputs {shapes[1]} must have the same shape (pad "
                         f"token ids to the same length, with one attention_mask)")
    for inputs in (clean, corrupted):
        model.check_inputs(inputs, **options)
    return (corrupted, clean) if direction == "denoise" else (clean, corrupted)


def targets(specs: Specs, site, per=None, layers=None) -> tuple[list[Target], bool]:
    """The sites ``site`` names (a kind means every layer of it; ``layers`` restricts), grouped into
    what one program patches, with the axes ``per`` patches one index at a time; and whether
    ``site`` names one site (its result has no site axis)."""
    names, single = _site_names(specs, site, layers)
    groups: dict = {}
    for name in names:
        spec = specs[name]
        kind = of_kind(specs, spec.kind)
        # One program for a kind's layers (a traced index into a stack of them all) when they are 0..n-1, of one shape.
        uniform = [s.layer for s in kind] == list(range(len(kind))) and len({s.shape for s in kind}) == 1
        groups.setdefault((spec.kind, spec.shape) if uniform else name, []).append(spec)
    found = []
    for key, group in groups.items():
        first = group[0]
        stacked = isinstance(key, tuple)
        found.append(Target(first.kind, tuple(s.name for s in group), tuple(s.layer for s in group), first.axes,
                            first.shape, _per_axes(per, first.axes, first.name), stacked))
    return found, single


def _site_names(specs: Specs, site, layers) -> tuple[list[str], bool]:
    one = isinstance(site, (str, tuple))
    patterns = [site] if one else list(site)
    names, single = [], one
    for pattern in patterns:
        pattern = SHORT_NAMES.get(pattern, pattern) if isinstance(pattern, str) else pattern
        key = S.site_key(canonical(pattern))
        if key.layer is None and any(s.layer is not None for s in of_kind(specs, key.kind)):
            pattern = S.site_name(key.kind, "*")  # a kind alone: every layer of it
        single = single and not any(ch in canonical(pattern) for ch in "*?[")
        names += match(specs, pattern)
    if layers is not None:
        wanted = {int(layer) for layer in np.atleast_1d(layers)}
        known = {specs[n].layer for n in names}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"layers={sorted(wanted)}: layer {missing[0]} is not among the swept sites' layers "
                             f"({', '.join(str(x) for x in sorted(k for k in known if k is not None))})")
        names = [n for n in names if specs[n].layer in wanted]
    return list(dict.fromkeys(names)), single


def _per_axes(per, axes: tuple[str, ...], site: str) -> tuple[int, ...]:
    """The positions among ``axes`` of the axes ``per`` names."""
    if per is None:
        roles = [S.role(a) for a in axes]
        per = ("head",) if "head" in roles else ("pos",) if "pos" in roles else (axes[-1],)
    per = PER_PRESETS.get(per, (per,)) if isinstance(per, str) else tuple(per)
    found = []
    for name in per:
        axis = axis_of(axes, name)
        if axis is None or axes[axis] == "batch":
            presets = [p for p, named in PER_PRESETS.items() if all(axis_of(axes, n) is not None for n in named)]
            valid = [a for a in axes if a != "batch"] + presets
            raise ValueError(f"Unknown per axis {name!r} for site {site!r} (axes {axes}); valid choices: "
                             f"{', '.join(map(repr, valid))}")
        found.append(axis)
    return tuple(found)


def _grid(target: Target) -> np.ndarray:
    """Every patch of a target: [n patches, 1 + per axes] (site index, then an index per axis)."""
    sizes = target.sizes
    return np.indices(sizes).reshape(len(sizes), -1).T.astype(np.int32)


def _chunk_size(specs: Specs, budget: float, per_site: int, rows_per_patch: int, devices: int, exact: bool) -> int:
    """Patches per chunk: whole sites' worth, enough that each product has about ``ROWS`` rows (a
    chunk resumes from its first site's layer, so later sites' patches recompute a few layers: a
    small cost next to products too short for the matrix kernels), one site's worth when ``exact``
    (each patch runs alone); fewer if the activations would not fit ``budget`` bytes."""
    batch = next(iter(specs.values())).shape[0]
    patch = memory.run_bytes(specs)  # a patch runs every input of the batch
    fits = memory.how_many_fit(budget * devices, patch, unit=f"patch (a run of the {batch} inputs)",
                               hint="use fewer or shorter inputs, or logit_positions to unembed fewer positions")
    wanted = per_site * (1 if exact else math.ceil(ROWS / (per_site * rows_per_patch)))
    return wanted if fits >= wanted else math.ceil(wanted / math.ceil(wanted / fits))


def sweep(model: Model, clean, corrupted, metric: Callable, site="resid_pre", *, progress: bool = True, **options):
    """Activation patching of ``site``, one index of the ``per`` axes at a time.

    Args:
        clean, corrupted: the two inputs (a transformer's token ids ``[batch, seq]``), of one shape.
        metric: the patched run's output -> scalar (e.g. the mean logit difference).
        site: a kind (``"resid_pre"``, ``"z"``: every layer), a site name, a glob or a list of names.
        per: the axes patched one index at a time (see the module docstring); default ``"head"`` at a
            site with a head axis, else ``"pos"``, else the site's last axis.
        direction: ``"denoise"`` (clean into corrupted, the default) or ``"noise"``.
        layers: only these layers of the swept kind (the result keeps one row per given layer).
        memory_budget: bytes of activations a chunk of patches may use (on each device of ``mesh``'s
            data axis); ``chunk_size`` overrides it.
        exact: False (default) ``vmap``s a chunk's patches into one wide batch (about 3x faster on
            CPU) and skips patches that change nothing and (a transformer) the shared leading
            positions; XLA's matrix products then round differently in the last bits (about 1e-6
            relative) from a single patched forward. True runs every patch, one after another inside
            the compiled program: every result is bit for bit what a single patched run gives.
        mesh: a ``jax.sharding.Mesh`` (``jinterp.sharding.mesh()``): each chunk's patches are split
            over its ``"data"`` axis. Results equal the single-device ones.
        options: the model's own: for a transformer ``attention_mask`` (shared by both inputs: same
            padding) and ``logit_positions`` (unembed only the positions the metric reads).

    Returns ``[*per sizes]`` for one site, ``[n_sites, *per sizes]`` for a kind (one row per layer), a
    glob or a list.
    """
    return sweep_chunks(model, clean, corrupted, metric, site, **options).run(progress)


def sweep_chunks(model: Model, clean, corrupted, metric: Callable, site="resid_pre", *, per=None,
                 direction: str = "denoise", layers=None, memory_budget: float = 2**30, chunk_size: int | None = None,
                 exact: bool = False, mesh=None, **options) -> Chunks:
    """``sweep`` as ``Chunks`` (same arguments): the base and source runs are computed now, the
    patches chunk by chunk."""
    base, source = pair(model, clean, corrupted, direction, **options)
    specs = model.site_specs(base, **options)
    found, single = targets(specs, site, per, layers)
    first = 0 if exact else model.reusable_prefix(clean, corrupted, **options)
    if mesh is not None:  # the inputs on every device: a chunk's patches are what is split
        model, base, source, options = sharding.replicate((model, base, source, options), sharding.check_mesh(mesh))
    capture = [n for t in found for n in _captured(specs, t)] + list(model.resume_sites(first))
    base_output, base_cache = run(model, base, capture=capture, **options)
    _, source_cache = run(model, source, capture=capture, **options)
    check_metric(metric, base_output)
    unpatched = sharding.to_host(metric(base_output))

    pieces = []  # (target, patch indices, site values: base, source)
    for target in found:
        grid = _grid(target)
        base_values, source_values = (_values(cache, target) for cache in (base_cache, source_cache))
        if exact:
            todo = np.arange(len(grid))
        else:  # a patch whose source equals the base value changes nothing: it scores as the base run
            todo = np.flatnonzero(_changed(base_values, source_values, target)[tuple(grid.T)])
        pieces.append((target, grid, todo, source_values))
    if first and any(_touches_before(t, grid[todo], first, _values(base_cache, t), source_values)
                     for t, grid, todo, source_values in pieces):
        first = 0  # a patch before the first differing token changes something: run every position
    devices = 1 if mesh is None else sharding.axis_size(mesh, sharding.DATA)  # a chunk's patches spread over them

    chunks = []  # (piece index, patch rows)
    for i, (target, _, todo, _) in enumerate(pieces):
        per_site = int(np.prod(target.sizes[1:], dtype=int))
        size = chunk_size or _chunk_size(specs, memory_budget, per_site, _rows(target, first), devices, exact)
        size = sharding.pad_to(max(1, min(size, max(len(todo), 1))), mesh)  # a chunk splits evenly over the mesh
        for start in range(0, len(todo), size):
            rows = todo[start:start + size]
            chunks.append((i, rows[np.minimum(np.arange(size), len(rows) - 1)], len(rows)))

    def compute(c):
        i, rows, _ = chunks[c]
        target, grid, _, source_values = pieces[i]
        patches = grid[rows]
        index = {"site": patches[:, 0]} | {f"axis{a}": patches[:, 1 + k] for k, a in enumerate(target.per)}
        layer = jnp.int32(target.layers[int(patches[0, 0])]) if target.stacked else None  # traced: one compile
        run_options = model.resumed(base, base_cache, base_output, layer, first, **options)
        return _patched(model, base, target, metric, _on_device(index, mesh), _suffix(source_values, target, first),
                        exact, mesh, run_options)

    def assemble(results):
        out = [np.full(int(np.prod(t.sizes)), unpatched) for t, *_ in pieces]
        for (i, rows, n), result in zip(chunks, results):  # a chunk's first n rows are its own patches
            target, grid, *_ = pieces[i]
            out[i][np.ravel_multi_index(tuple(grid[rows[:n]].T), target.sizes)] = sharding.to_host(result)[:n]
        return _stack([o.reshape(t.sizes) for o, (t, *_) in zip(out, pieces)], found, single)

    n = sum(len(grid) for _, grid, _, _ in pieces)
    skipped = n - sum(len(todo) for _, _, todo, _ in pieces)
    kinds = ", ".join(dict.fromkeys(t.kind for t in found))
    # Which sites' patches each chunk holds: another budget, chunk size or version cuts them otherwise.
    layout = json.dumps([[pieces[i][0].names, grid[rows].tolist(), n] for i, rows, n in chunks])
    return Chunks(len(chunks), compute, assemble,
                  f"Patching {kinds} ({n} patches{f', {skipped} change nothing' if skipped else ''})",
                  hashlib.sha256(layout.encode()).hexdigest())


def _rows(target: Target, first: int) -> int:
    """Rows a patched run's products have: the batch, times the positions it computes (from ``first``;
    one at a site without positions)."""
    computed = next((n - first for a, n in zip(target.axes, target.shape) if S.role(a) == "pos"), 1)
    return target.shape[0] * computed


def _captured(specs: Specs, target: Target) -> list[str]:
    """What a target's patches read from the two runs: its sites, or every layer of a stacked kind."""
    return [s.name for s in of_kind(specs, target.kind)] if target.stacked else list(target.names)


def _values(cache, target: Target):
    """A target's values in one run: ``[all layers, ...]`` (stacked) or ``[sites, ...]``."""
    if target.stacked:
        return cache.stack(target.kind)
    return jnp.stack([cache[name] for name in target.names])


def _changed(base_values, source_values, target: Target) -> np.ndarray:
    """For every patch of a target ``[sites, *per]``: whether its source value differs anywhere."""
    differs = base_values != source_values
    if target.stacked:
        differs = differs[np.asarray(target.layers)]
    return sharding.to_host(reduce_site(differs, target, jnp.any))


def reduce_site(values, target: Target, reduction=jnp.sum):
    """``[sites, *site axes]`` reduced over every axis but the per axes: ``[sites, *per]``, per axes in order."""
    keep = [1 + a for a in target.per]
    reduced = reduction(values, axis=tuple(a for a in range(1, values.ndim) if a not in keep))
    order = sorted(keep)
    return reduced.transpose(0, *(1 + order.index(a) for a in keep))


def _touches_before(target: Target, patches: np.ndarray, first: int, base_values, source_values) -> bool:
    """Whether any of these patches changes a value at a position before ``first``: one patched at
    such a position, or (a patch of every position at once) a source value there that differs from the base."""
    pos = [k for k, a in enumerate(target.per) if S.role(target.axes[a]) == "pos"]
    axis = next((i for i, a in enumerate(target.axes) if S.role(a) == "pos"), None)
    if axis is None or not len(patches):
        return False
    if pos:
        return bool((patches[:, 1 + pos[0]] < first).any())
    before = lambda values: jax.lax.slice_in_dim(values, 0, first, axis=1 + axis)  # noqa: E731
    return bool(sharding.to_host((before(base_values) != before(source_values)).any()))


def _suffix(values, target: Target, first: int):
    """Site values from position ``first`` on (what a forward computing those positions only sees)."""
    if not first:
        return values
    axis = 1 + next(i for i, a in enumerate(target.axes) if S.role(a) == "pos")
    return jax.lax.slice_in_dim(values, first, values.shape[axis], axis=axis)


def _on_device(index: dict, mesh):
    """One chunk's patch indices, split over the mesh's data axis."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in index.items()}
    return {k: sharding.put(v, mesh, sharding.P(sharding.DATA)) for k, v in index.items()}


@jit
def _patched(model, inputs, target: Target, metric, index, source_values, exact, mesh, options):
    """The metric of every patch in ``index`` (site row, then an index per per-axis), vmapped."""

    def one(patch):
        site = target.kind if target.stacked else target.names[0]
        layer = jnp.asarray(target.layers, jnp.int32)[patch["site"]][None] if target.stacked else None
        value = source_values if target.stacked else source_values[0]
        indices = {target.axes[a]: patch[f"axis{a}"][None] for a in target.per}  # (positions from 0, whatever first)
        edit = Replace(site, value, per_layer=target.stacked, layers=layer, indices=indices)
        return metric(apply(model, inputs, (edit,), **options)[0])

    if not exact:
        return sharding.constrain(jax.vmap(one)(index), mesh)
    run_in_order = lambda patches: jax.lax.map(one, patches)
    if mesh is not None:  # each device runs its share of the patches one after another
        run_in_order = jax.shard_map(run_in_order, mesh=mesh, in_specs=sharding.P(sharding.DATA),
                                     out_specs=sharding.P(sharding.DATA), check_vma=False)
    return sharding.constrain(run_in_order(index), mesh)


def check_metric(metric: Callable, output) -> None:
    """A metric must map the output to one number (a vector would be scattered into the grid wrongly)."""
    shape = jax.eval_shape(metric, output).shape
    if shape != ():
        raise ValueError(f"metric must return a scalar, got shape {shape} from an output of shape "
                         f"{np.shape(output)}; reduce over the batch (e.g. .mean())")


def _stack(results: list, found: list[Target], single: bool):
    """``[*per]`` for one named site, else every target's rows stacked: ``[sites, *per]``."""
    rows = [row for result in results for row in result]
    if single:
        return jnp.asarray(rows[0])
    if len({np.shape(r) for r in rows}) > 1:
        shapes = ", ".join(f"{n}: {np.shape(r)}" for t, result in zip(found, results) for n, r in zip(t.names, result))
        raise ValueError(f"The sites swept give results of different shapes ({shapes}); sweep them one at a time")
    return jnp.asarray(np.stack(rows))


# --- path patching -------------------------------------------------------------------------------

def path_patch(model, clean, corrupted, metric: Callable, receivers, *, progress: bool = True, **options):
    """Path patching (Wang et al. 2022): the effect of each sender head's output reaching the
    ``receivers`` only through the direct paths (other heads frozen). A jinterp transformer's.

    For every sender head (l, h): (1) run the base input with every head's ``z`` frozen to its
    base value, except the sender's, which takes its value from the source run (MLPs recompute
    unless ``freeze_mlps``); record the receivers; (2) run the base input again with only the
    receivers patched to the values from (1); score with ``metric``.

    ``receivers``: a list of site names: ``"blocks.{l}.attn.q"`` / ``.k`` / ``.v`` (all heads) or a
    pair ``("blocks.{l}.attn.q", [heads])``, or a residual site such as ``"blocks.{l}.resid_pre"``
    or ``"blocks.{L-1}.resid_post"`` (what the final norm and unembedding read).
    ``direction``: ``"denoise"`` (the default everywhere: base = corrupted, senders clean) or
    ``"noise"`` (as in the IOI paper: base = clean, senders corrupted).

    Returns ``[n_layers, n_heads]``: the metric for each sender (senders that cannot reach a
    receiver score as the unpatched base run). The second run starts from the base residual
    stream at the first receiver's layer: nothing before it differs from the base run.

    Options: ``direction``, ``attention_mask``, ``logit_positions``, ``freeze_mlps``, ``mesh`` (the
    senders split over its ``"data"`` axis, as in ``sweep``).
    """
    return path_patch_chunks(model, clean, corrupted, metric, receivers, **options).run(progress)


RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def path_patch_chunks(model, clean, corrupted, metric: Callable, receivers, *, direction: str = "denoise",
                      attention_mask=None, logit_positions=None, freeze_mlps: bool = False, mesh=None) -> Chunks:
    """``path_patch`` as ``Chunks`` (same arguments), one chunk per sender layer."""
    base, source = pair(model, clean, corrupted, direction, attention_mask=attention_mask)
    cfg = model.cfg
    receivers = [_receiver(model.site_specs(base), r) for r in receivers]
    if mesh is not None:
        model, base, source, attention_mask = sharding.replicate((model, base, source, attention_mask),
                                                                 sharding.check_mesh(mesh))
    frozen_kinds = ["attn.z"] + (["mlp_out"] if freeze_mlps else [])
    base_logits, base_cache = run(model, base, capture=[f"blocks.*.{k}" for k in frozen_kinds + ["resid_pre"]],
                                  attention_mask=attention_mask, logit_positions=logit_positions)
    _, source_cache = run(model, source, capture="blocks.*.attn.z", attention_mask=attention_mask)
    senders = np.indices((cfg.n_layers, cfg.n_heads)).reshape(2, -1).T.astype(np.int32)  # (layer, head) rows
    chunks = np.array_split(np.arange(len(senders)), cfg.n_layers)  # chunk c: the heads of layer c
    # A head at layer l reaches q/k/v and resid_pre of later layers only, the other sites from its own layer on.
    reach = max(layer + (kind not in ("attn.q", "attn.k", "attn.v", "resid_pre")) for kind, layer, _ in receivers)
    resume = min(layer for _, layer, _ in receivers)  # the second run recomputes from this layer on

    def compute(c):
        if c >= reach:
            return jnp.full(len(chunks[c]), metric(base_logits))
        chunk = chunks[c][np.minimum(np.arange(sharding.pad_to(len(chunks[c]), mesh)), len(chunks[c]) - 1)]
        return _path_chunk(model, tuple(receivers), tuple(frozen_kinds), metric, _on_device({"s": senders[chunk]},
                           mesh)["s"], base, attention_mask, logit_positions, base_cache, source_cache, resume,
                           mesh)[:len(chunks[c])]

    def assemble(results):
        return jnp.asarray(np.concatenate([sharding.to_host(r) for r in results]).reshape(cfg.n_layers, cfg.n_heads))

    return Chunks(len(chunks), compute, assemble, f"Path patching ({len(senders)} senders)")


def _receiver(specs: Specs, receiver) -> tuple[str, int, tuple[int, ...] | None]:
    site, heads = receiver if isinstance(receiver, tuple) and not isinstance(receiver[1], int) else (receiver, None)
    if not isinstance(site, str):
        raise TypeError(f"A receiver is a site name or (site name, heads), got {receiver!r}")
    parsed = match(specs, site)
    spec = specs[parsed[0]]
    if len(parsed) != 1 or spec.layer is None:
        raise ValueError(f"Receiver {site!r} must name one layer (e.g. 'blocks.9.attn.q')")
    allowed = ("attn.q", "attn.k", "attn.v") + RESIDUAL_SITES
    choose(spec.kind, allowed, "receiver site kind")
    if heads is not None and spec.kind not in ("attn.q", "attn.k", "attn.v"):
        raise ValueError(f"Receiver {site!r}: heads only apply to q/k/v receivers")
    return spec.kind, spec.layer, None if heads is None else tuple(int(h) for h in heads)


@jit
def _path_chunk(model, receivers, frozen_kinds, metric, senders, tokens, attention_mask, logit_positions,
                base_cache, source_cache, resume, mesh):
    freeze = tuple(Replace(f"blocks.*.{k}", base_cache.stack(k), per_layer=True) for k in frozen_kinds)
    kinds = dict.fromkeys(kind for kind, _, _ in receivers)
    capture = tuple(Capture(kind, sorted({layer for k, layer, _ in receivers if k == kind})) for kind in kinds)

    def one(sender):
        sender_edit = Replace("attn.z", source_cache.stack("attn.z"), per_layer=True, layers=sender[0][None],
                              heads=sender[1][None])
        _, cache = apply(model, tokens, freeze + (sender_edit,) + capture, attention_mask=attention_mask,
                         logit_positions=jnp.zeros(0, jnp.int32))
        patches = tuple(Replace(f"blocks.{layer}.{kind}", cache[f"blocks.{layer}.{kind}"], heads=heads)
                        for kind, layer, heads in receivers)
        start = (resume, base_cache[f"blocks.{resume}.resid_pre"])  # nothing before the receivers changes
        logits = apply(model, tokens, patches, attention_mask=attention_mask, start=start,
                       logit_positions=logit_positions)[0]
        return metric(logits)

    return sharding.constrain(jax.vmap(one)(senders), mesh)
