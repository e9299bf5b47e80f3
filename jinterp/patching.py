"""Activation patching sweeps and path patching, each one compiled program.

Conventions. ``direction="denoise"`` (TransformerLens' convention, the default) runs the
*corrupted* tokens and patches in the *clean* activation: the metric measures how much of the
clean behaviour one component restores. ``direction="noise"`` runs the clean tokens and patches
in the corrupted activation: the metric measures how much one component's corruption breaks it.

How a sweep runs. Every patch is one ``Replace`` edit on the standard intervention mechanism;
a batch of patches is ``jax.vmap``-ed inside one ``jit``. Patches are processed in chunks of
one layer's worth, smaller if a memory budget asks (one compilation, a progress bar over
chunks): a chunk starts from the cached residual stream at its first patch's layer instead of
recomputing the prefix (about half the work of full forwards). A patch whose source value
equals the base value (every position before the first token where the prompts differ) changes
nothing: it scores as the unpatched base run without being computed. In a causal model every
position before that first differing token is the same in every patched run, so patched runs
compute only the positions from there on, attending to the base run's cached keys and values
for the earlier ones. ``metric_positions`` limits the unembedding to the positions the metric
reads.

Chunks. ``sweep_chunks`` and ``path_patch_chunks`` return the same computation as a ``Chunks``:
each chunk can be computed on its own (and checkpointed: ``jinterp.runs.Run.chunked`` does),
and ``assemble`` turns the chunk results into the array ``sweep`` returns, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jinterp import memory, sharding
from jinterp import names as S
from jinterp._compile import jit
from jinterp.byo.hook import Wrapped
from jinterp.cache import _run, run
from jinterp.interventions import Capture, Replace
from jinterp.models.config import choose
from jinterp.models.transformer import Transformer, check_inputs

RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITES = ("attn.z", "attn.q", "attn.k", "attn.v", "attn.pattern")
DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class Chunks:
    """A computation split into chunks: ``compute(i)`` for ``i in range(n)``, then ``assemble``."""

    n: int
    compute: Callable[[int], jax.Array]
    assemble: Callable[[list], jax.Array]
    description: str

    def run(self, progress: bool = True) -> jax.Array:
        """Every chunk in order, with a progress bar."""
        return self.assemble([self.compute(i) for i in tqdm(range(self.n), desc=self.description, unit="chunk",
                                                            disable=not progress)])


SHORT_NAMES = {"z": "attn.z", "q": "attn.q", "k": "attn.k", "v": "attn.v", "pattern": "attn.pattern"}


def sweep_kind(model: Transformer, site) -> str:
    """The site kind a sweep runs over, from any spelling (``"z"``, ``"attn.z"``, ``"blocks.*.hook_z"``)."""
    kind = SHORT_NAMES.get(site) or S.parse(site).kind
    choose(kind, RESIDUAL_SITES + HEAD_SITES, "sweep site")
    S.resolve(model.cfg, f"blocks.*.{kind}")
    return kind


def patch_grid(cfg, kind: str, per: str, seq: int, layers) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Every (layer, position, head) a sweep patches, and the shape of its result."""
    n_heads = cfg.n_kv_heads if kind in ("attn.k", "attn.v") else cfg.n_heads
    layers = np.arange(cfg.n_layers) if layers is None else np.asarray(sorted(layers))
    axes = {"position": ("layer", "position"), "layer": ("layer",), "head": ("layer", "head"),
            "head_position": ("layer", "head", "position")}[per]
    sizes = {"layer": len(layers), "position": seq, "head": n_heads}
    grid = np.stack(np.meshgrid(*[np.arange(sizes[a]) for a in axes], indexing="ij"), -1).reshape(-1, len(axes))
    columns = {a: grid[:, i].astype(np.int32) for i, a in enumerate(axes)}
    columns["layer"] = layers[columns["layer"]].astype(np.int32)
    return columns, tuple(sizes[a] for a in axes)


# What each ``per`` keeps of a site's axes; the rest are reduced away.
_KEEP = {"position": ("pos",), "layer": (), "head": ("head",), "head_position": ("head", "pos")}


def _role(axis: str) -> str | None:
    return "pos" if axis in ("pos", "query_pos") else "head" if axis in ("head", "kv_head") else None


def reduce_site(per_layer, kind: str, per: str, reduction=jnp.sum):
    """Reduce ``[layer, *site axes]`` over every axis ``per`` does not keep: ``[layer, *per's axes]``."""
    roles = [_role(a) for a in S.SITE_AXES[kind]]
    keep = _KEEP[per]
    reduced = reduction(per_layer, axis=tuple(1 + i for i, r in enumerate(roles) if r not in keep))
    kept = [r for r in roles if r in keep]
    return reduced.transpose(0, *(1 + kept.index(r) for r in keep))


def _chunk_size(model: Transformer, tokens_shape, n_logit_positions: int, budget: float, per_layer: int) -> int:
    """Patches per chunk: at most one layer's worth (so each chunk resumes from its own layer and
    no prefix is recomputed), fewer if the activations would not fit ``budget`` bytes."""
    batch, seq = tokens_shape
    patch = batch * memory.sequence_bytes(model.cfg, seq, (), n_logit_positions)  # a patch runs every prompt
    fits = memory.how_many_fit(budget, patch, unit=f"patch ({batch} prompts x {seq} tokens)",
                               hint="use fewer or shorter prompts, or metric_positions to unembed fewer positions")
    return per_layer if fits >= per_layer else math.ceil(per_layer / math.ceil(per_layer / fits))


def sweep(model: Transformer, clean_tokens, corrupt_tokens, metric: Callable, site="resid_pre", *,
          progress: bool = True, **options):
    """Activation patching of ``site`` at every layer and position / head.

    Args:
        clean_tokens, corrupt_tokens: ``[batch, seq]`` int ids of the same shape.
        metric: patched logits ``[batch, seq or n, d_vocab]`` -> scalar (e.g. mean logit difference).
        site: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` (per layer and
            position) or ``z``, ``q``, ``k``, ``v``, ``pattern`` (per layer and head; ``k``/``v`` per kv head).
        per: ``"position"`` (residual sites' default) -> ``[n_layers, seq]``; ``"layer"`` -> ``[n_layers]``;
            ``"head"`` (head sites' default) -> ``[n_layers, n_heads]``; ``"head_position"`` ->
            ``[n_layers, n_heads, seq]``.
        direction: ``"denoise"`` (clean into corrupted) or ``"noise"`` (corrupted into clean).
        attention_mask: ``[batch, seq]`` shared by both runs (same padding).
        metric_positions: unembed only these positions (``[n]`` or ``[batch, n]``) before the metric.
        layers: restrict to these layers (the result keeps one row per given layer).
        memory_budget: bytes of activations a chunk may use (on each device of ``mesh``'s data axis);
            ``chunk_size`` overrides it.
        exact: False (default) ``vmap``s a chunk's patches into one wide batch (about 3x faster on
            CPU) and skips patches that change nothing and the shared leading positions; XLA's
            matrix products then round differently in the last bits (about 1e-6 relative) from a
            single patched forward, and depend on the chunking. True runs every patch, one after
            another inside the compiled program: every result is bit for bit what a single
            patched forward (``jinterp.run`` with that one edit) gives.
        mesh: a ``jax.sharding.Mesh`` (``jinterp.sharding.mesh()``): each chunk's patches are split over
            its ``"data"`` axis; the weights are replicated unless ``jinterp.sharding.shard_model`` split
            them over its ``"model"`` axis. Results equal the single-device ones (bit for bit with
            ``exact=True`` and a replicated model).

    Returns the metric for every patch, shaped as described for ``per``.

    A model wrapped with ``jinterp.byo.wrap`` takes its own inputs and any of its sites (a name,
    a glob or a list); ``per`` then names the site's axes (see ``jinterp.byo.patching.sweep``).
    """
    if isinstance(model, Wrapped):
        from jinterp.byo import patching as byo
        from jinterp.cache import _transformer_only

        _transformer_only(**{name: value for name, value in options.items()
                             if name not in ("per", "direction", "chunk_size")})
        return byo.sweep(model, clean_tokens, corrupt_tokens, metric, site, progress=progress, **options)
    return sweep_chunks(model, clean_tokens, corrupt_tokens, metric, site, **options).run(progress)


def sweep_chunks(model: Transformer, clean_tokens, corrupt_tokens, metric: Callable, site="resid_pre", *,
                 per: str | None = None, direction: str = "denoise", attention_mask=None, metric_positions=None,
                 layers=None, memory_budget: float = 2**30, chunk_size: int | None = None,
                 exact: bool = False, mesh=None) -> Chunks:
    """``sweep`` as ``Chunks`` (same arguments): the clean and corrupted caches are computed now,
    the patches chunk by chunk."""
    kind, per, base, source = sweep_inputs(model, clean_tokens, corrupt_tokens, site, per, direction, attention_mask)
    first = 0 if exact else _shared_prefix(model.cfg, clean_tokens, corrupt_tokens, metric_positions)
    model, base, source, attention_mask = _on_mesh(mesh, model, base, source, attention_mask)
    key_site = "attn.rot_k" if model.cfg.positional == "rotary" else "attn.k"
    # Both runs are the same compiled program, so values the inputs cannot change are equal to the bit.
    capture = ["blocks.*.resid_pre", f"blocks.*.{kind}"]
    capture += [f"blocks.*.{key_site}", "blocks.*.attn.v"] if first else []
    base_logits, base_cache = run(model, base, capture=capture, attention_mask=attention_mask,
                                  logit_positions=metric_positions)
    _, source_cache = run(model, source, capture=capture, attention_mask=attention_mask,
                          logit_positions=metric_positions)
    check_metric(metric, base_logits)

    columns, shape = patch_grid(model.cfg, kind, per, base.shape[1], layers)
    n = len(columns["layer"])
    if exact:
        todo = np.arange(n)
    else:  # a patch whose source equals the base value changes nothing: it scores as the base run
        changed = source_cache.stack(kind) != base_cache.stack(kind)
        changes = sharding.to_host(reduce_site(changed, kind, per, jnp.any))
        todo = np.flatnonzero(changes[tuple(columns[axis] for axis in columns)])
    if "position" in columns and (columns["position"][todo] < first).any():
        first = 0  # a patch before the first differing token changes something: run every position
    per_layer = n // len(np.unique(columns["layer"]))
    n_logits = base.shape[1] if metric_positions is None else np.shape(metric_positions)[-1]
    devices = 1 if mesh is None else sharding.axis_size(mesh, sharding.DATA)  # a chunk's patches spread over them
    size = chunk_size or _chunk_size(model, base.shape, n_logits, memory_budget * devices, per_layer)
    size = sharding.pad_to(max(1, min(size, len(todo))), mesh)  # a chunk splits evenly over the mesh
    padded = math.ceil(len(todo) / size) * size
    index = todo[np.minimum(np.arange(padded), len(todo) - 1)]  # the last chunk repeats its final patch
    chunked = {name: column[index].reshape(-1, size) for name, column in columns.items()}
    if "position" in chunked:
        chunked["position"] = chunked["position"] - first

    # Patched runs compute positions first.. only, attending to the base run's keys and values before.
    prefix = (base_cache.stack(key_site)[:, :, :first], base_cache.stack("attn.v")[:, :, :first]) if first else None
    suffix = lambda values: values[:, :, first:]  # [layer, batch, pos, ...]
    if kind == "attn.pattern":  # [layer, batch, head, query, key]: queries from first on, every key
        source_values = source_cache.stack(kind)[:, :, :, first:]
    else:
        source_values = suffix(source_cache.stack(kind))
    positions = None if metric_positions is None else _shift(np.asarray(metric_positions), first)
    logits_before = base_logits[:, :first] if first and metric_positions is None else None

    def compute(c):
        patches = {name: _patches(column[c], mesh) for name, column in chunked.items()}
        return _run_chunk(model, kind, metric, patches, base, attention_mask, positions,
                          suffix(base_cache.stack("resid_pre")), source_values, exact, prefix, logits_before, mesh)

    def assemble(results):
        scores = np.full(n, sharding.to_host(metric(base_logits)))
        if len(todo):
            scores[todo] = np.concatenate([sharding.to_host(r) for r in results])[:len(todo)]
        return jnp.asarray(scores.reshape(shape))

    skipped = f", {n - len(todo)} change nothing" if len(todo) < n else ""
    return Chunks(padded // size, compute, assemble, f"Patching {kind} ({n} patches{skipped})")


def check_metric(metric: Callable, logits) -> None:
    """A metric must map logits to one number (a vector would be scattered into the grid wrongly)."""
    shape = jax.eval_shape(metric, logits).shape
    if shape != ():
        raise ValueError(f"metric must return a scalar, got shape {shape} from logits of shape {logits.shape}; "
                         "reduce over the batch (e.g. .mean())")


def sweep_inputs(model: Transformer, clean_tokens, corrupt_tokens, site, per, direction, attention_mask):
    """Validated (site kind, per, base tokens, source tokens) of a sweep (or its attribution estimate)."""
    kind = sweep_kind(model, site)
    per = per or ("position" if kind in RESIDUAL_SITES else "head")
    choose(per, ("position", "layer") if kind in RESIDUAL_SITES else ("head", "head_position"), f"per for {kind!r}")
    choose(direction, DIRECTIONS, "patching direction")
    clean_tokens, corrupt_tokens = _pair(model, clean_tokens, corrupt_tokens, attention_mask)
    base, source = (corrupt_tokens, clean_tokens) if direction == "denoise" else (clean_tokens, corrupt_tokens)
    return kind, per, base, source


def _on_mesh(mesh, model, *tokens):
    """The model and token arrays replicated over ``mesh`` (as they are without one)."""
    if mesh is None:
        return (model, *tokens)
    mesh = sharding.check_mesh(mesh)
    return (sharding.replicate(model, mesh), *(None if t is None else sharding.put(t, mesh) for t in tokens))


def _patches(column, mesh):
    """One chunk's patch indices, split over the mesh's data axis."""
    return jnp.asarray(column) if mesh is None else sharding.put(column, mesh, sharding.P(sharding.DATA))


def _shared_prefix(cfg, clean_tokens, corrupt_tokens, metric_positions) -> int:
    """How many leading positions every patched run shares with the base run: up to the first token
    where the inputs differ (causal models; 0 if the metric reads logits before it)."""
    differs = np.asarray((clean_tokens != corrupt_tokens).any(0))
    if not cfg.causal or not differs.any() or (cfg.qk_norm and cfg.positional != "rotary"):
        return 0  # (cached keys are taken after q/k norm from attn.rot_k)
    first = int(np.argmax(differs))
    read = None if metric_positions is None else np.asarray(metric_positions)
    if read is not None and ((read >= 0) & (read < first)).any():
        return 0
    return first


def _shift(positions, first: int):
    return np.where(positions < 0, positions, positions - first)


@jit
def _run_chunk(model, kind, metric, patches, tokens, attention_mask, metric_positions, base_resid, source, exact,
               prefix, logits_before, mesh):
    start_layer = patches["layer"][0]  # patches are sorted by layer
    start = (start_layer, base_resid[start_layer])

    def one(patch):
        edit = Replace(kind, source, per_layer=True, layers=patch["layer"][None],
                       positions=patch["position"][None] if "position" in patch else None,
                       heads=patch["head"][None] if "head" in patch else None)
        logits = model.forward(tokens, (edit,), attention_mask, start=start, logit_positions=metric_positions,
                               prefix=prefix)[0]
        if logits_before is not None:
            logits = jnp.concatenate([logits_before, logits], 1)
        return metric(logits)

    if not exact:
        return sharding.constrain(jax.vmap(one)(patches), mesh)
    run_in_order = lambda patches: jax.lax.map(one, patches)
    if mesh is not None:  # each device runs its share of the patches one after another
        run_in_order = jax.shard_map(run_in_order, mesh=mesh, in_specs=sharding.P(sharding.DATA),
                                     out_specs=sharding.P(sharding.DATA), check_vma=False)
    return sharding.constrain(run_in_order(patches), mesh)


def _pair(model, clean_tokens, corrupt_tokens, attention_mask):
    clean_tokens, corrupt_tokens = jnp.asarray(clean_tokens), jnp.asarray(corrupt_tokens)
    if clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens {tuple(corrupt_tokens.shape)} "
                         "must have the same shape (pad them to the same length, with one attention_mask)")
    check_inputs(model.cfg, clean_tokens, attention_mask)
    check_inputs(model.cfg, corrupt_tokens, attention_mask)
    return clean_tokens, corrupt_tokens


def path_patch(model: Transformer, clean_tokens, corrupt_tokens, metric: Callable, receivers, *,
               progress: bool = True, **options):
    """Path patching (Wang et al. 2022): the effect of each sender head's output reaching the
    ``receivers`` only through the direct paths (other heads frozen).

    For every sender head (l, h): (1) run the base tokens with every head's ``z`` frozen to its
    base value, except the sender's, which takes its value from the other run (MLPs recompute
    unless ``freeze_mlps``); record the receivers; (2) run the base tokens again with only the
    receivers patched to the values from (1); score with ``metric``.

    ``receivers``: a list of site names: ``"blocks.{l}.attn.q"`` / ``.k`` / ``.v`` (all heads) or a
    pair ``("blocks.{l}.attn.q", [heads])``, or a residual site such as ``"blocks.{l}.resid_pre"``
    or ``"blocks.{L-1}.resid_post"`` (what the final norm and unembedding read).
    ``direction="noise"`` (default, as in the IOI paper): base = clean, senders corrupted.

    Returns ``[n_layers, n_heads]``: the metric for each sender (senders that cannot reach a
    receiver score as the unpatched base run). The second run starts from the base residual
    stream at the first receiver's layer: nothing before it differs from the base run.

    Options: ``direction``, ``attention_mask``, ``metric_positions``, ``freeze_mlps``, ``mesh`` (the
    senders split over its ``"data"`` axis, as in ``sweep``).
    """
    return path_patch_chunks(model, clean_tokens, corrupt_tokens, metric, receivers, **options).run(progress)


def path_patch_chunks(model: Transformer, clean_tokens, corrupt_tokens, metric: Callable, receivers, *,
                      direction: str = "noise", attention_mask=None, metric_positions=None,
                      freeze_mlps: bool = False, mesh=None) -> Chunks:
    """``path_patch`` as ``Chunks`` (same arguments), one chunk per sender layer."""
    choose(direction, DIRECTIONS, "patching direction")
    clean_tokens, corrupt_tokens = _pair(model, clean_tokens, corrupt_tokens, attention_mask)
    base, other = (clean_tokens, corrupt_tokens) if direction == "noise" else (corrupt_tokens, clean_tokens)
    receivers = [_receiver(model.cfg, r) for r in receivers]
    model, base, other, attention_mask = _on_mesh(mesh, model, base, other, attention_mask)
    frozen_kinds = ["attn.z"] + (["mlp_out"] if freeze_mlps else [])
    base_logits, base_cache = run(model, base, capture=[f"blocks.*.{k}" for k in frozen_kinds + ["resid_pre"]],
                                  attention_mask=attention_mask, logit_positions=metric_positions)
    _, other_cache = run(model, other, capture="blocks.*.attn.z", attention_mask=attention_mask)
    senders = np.stack(np.meshgrid(np.arange(model.cfg.n_layers), np.arange(model.cfg.n_heads), indexing="ij"), -1)
    senders = senders.reshape(-1, 2).astype(np.int32)
    chunks = np.array_split(np.arange(len(senders)), model.cfg.n_layers)  # chunk c: the heads of layer c
    # A head at layer l reaches q/k/v and resid_pre of later layers only, the other sites from its own layer on.
    reach = max(layer + (kind not in ("attn.q", "attn.k", "attn.v", "resid_pre")) for kind, layer, _ in receivers)
    resume = min(layer for _, layer, _ in receivers)  # the second run recomputes from this layer on

    def compute(c):
        if c >= reach:
            return jnp.full(len(chunks[c]), metric(base_logits))
        chunk = chunks[c][np.minimum(np.arange(sharding.pad_to(len(chunks[c]), mesh)), len(chunks[c]) - 1)]
        return _path_chunk(model, tuple(receivers), tuple(frozen_kinds), metric, _patches(senders[chunk], mesh), base,
                           attention_mask, metric_positions, base_cache, other_cache, resume, mesh)[:len(chunks[c])]

    def assemble(results):
        return jnp.asarray(np.concatenate([sharding.to_host(r) for r in results]).reshape(model.cfg.n_layers,
                                                                                          model.cfg.n_heads))

    return Chunks(len(chunks), compute, assemble, f"Path patching ({len(senders)} senders)")


def _receiver(cfg, receiver) -> tuple[str, int, tuple[int, ...] | None]:
    site, heads = receiver if isinstance(receiver, tuple) else (receiver, None)
    if not isinstance(site, str):
        raise TypeError(f"A receiver is a site name or (site name, heads), got {receiver!r}")
    parsed = S.resolve(cfg, site)
    if not isinstance(parsed.layer, int):
        raise ValueError(f"Receiver {site!r} must name one layer (e.g. 'blocks.9.attn.q')")
    allowed = ("attn.q", "attn.k", "attn.v") + RESIDUAL_SITES
    choose(parsed.kind, allowed, "receiver site kind")
    if heads is not None and parsed.kind not in ("attn.q", "attn.k", "attn.v"):
        raise ValueError(f"Receiver {site!r}: heads only apply to q/k/v receivers")
    return parsed.kind, parsed.layer, None if heads is None else tuple(int(h) for h in heads)


@jit
def _path_chunk(model, receivers, frozen_kinds, metric, senders, tokens, attention_mask, metric_positions,
                base_cache, other_cache, resume, mesh):
    freeze = tuple(Replace(f"blocks.*.{k}", base_cache.stack(k), per_layer=True) for k in frozen_kinds)
    layers_by_kind = {}
    for kind, layer, _ in receivers:
        layers_by_kind.setdefault(kind, set()).add(layer)
    capture = tuple(Capture(kind, sorted(layers)) for kind, layers in layers_by_kind.items())

    def one(sender):
        sender_edit = Replace("attn.z", other_cache.stack("attn.z"), per_layer=True, layers=sender[0][None],
                              heads=sender[1][None])
        _, cache = _run(model, tokens, freeze + (sender_edit,) + capture, attention_mask, None,
                        logit_positions=jnp.zeros(0, jnp.int32))
        patches = tuple(Replace(f"blocks.{layer}.{kind}", cache[f"blocks.{layer}.{kind}"], heads=heads)
                        for kind, layer, heads in receivers)
        start = (resume, base_cache[f"blocks.{resume}.resid_pre"])  # nothing before the receivers changes
        logits = model.forward(tokens, patches, attention_mask, start=start, logit_positions=metric_positions)[0]
        return metric(logits)

    return sharding.constrain(jax.vmap(one)(senders), mesh)

