"""``run``: one forward pass with captures and edits, returning the output and a ``Cache``."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from collections.abc import Mapping
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from jinterp import interventions as iv
from jinterp import names as S
from jinterp._compile import jit
from jinterp.byo.hook import Wrapped
from jinterp.models.config import Config
from jinterp.models.layers import accurate, activation, attention_scores
from jinterp.models.transformer import Transformer, attention_masks, check_inputs, real_positions


class Derivation(NamedTuple):
    """How a site's value follows from others': ``sources`` (site kinds ``offset`` layers on);
    ``forced``: capture the sources just for it (they are no bigger), otherwise it is derived at
    the layers where the run captures its sources anyway; ``unedited``: sites whose edits the
    formula would miss."""

    sources: tuple[str, ...]
    forced: bool = True
    unedited: tuple[str, ...] = ()
    offset: int = 0


def _derivations(cfg) -> dict[str, Derivation]:
    """Sites whose captured value is a function of other sites': kind -> its derivation, in an
    order where a derivation's derived sources come first."""
    found = {"attn.result": Derivation(("attn.z",)),
             **{f"attn.{n}_input": Derivation(("resid_pre",)) for n in "qkv"}}
    # Scores from the queries and keys they are the products of (rotated ones, or unnormed ones
    # without rotary); [batch, heads, pos, pos] is the largest site of a long sequence.
    if cfg.positional == "rotary" or not cfg.qk_norm:
        keys = ("attn.rot_q", "attn.rot_k") if cfg.positional == "rotary" else ("attn.q", "attn.k")
        found["attn.scores"] = Derivation(keys, forced=False)
    found["attn.pattern"] = Derivation(("attn.scores",), forced=False)
    if cfg.has_mlp:
        found["mlp.post"] = Derivation(("mlp.pre", "mlp.pre_linear") if cfg.gated_mlp else ("mlp.pre",), forced=False)
    if cfg.norm_placement == "post":  # the residual stream passes through norms: no sums to redo
        return found
    # A block's output is the next block's input, bit for bit (the last block's is captured).
    found["resid_post"] = Derivation(("resid_pre",), forced=False, unedited=("resid_pre",), offset=1)
    sequential = not (cfg.parallel or cfg.attn_only)
    if sequential:
        found["resid_mid"] = Derivation(("resid_pre", "attn_out"), forced=False)
    if cfg.has_mlp:
        found["mlp_in"] = Derivation(("resid_mid" if sequential else "resid_pre",))
    if cfg.norm is not None:
        found["ln1.normalized"] = Derivation(("resid_pre", "ln1.scale"), forced=False)
        if cfg.has_mlp:
            found["ln2.normalized"] = Derivation(("mlp_in", "ln2.scale"), forced=False)
    return found


class Cache(eqx.Module, Mapping):
    """Captured site values by name. Any accepted spelling of a name works as a key
    (``cache["blocks.3.attn.z"]``, ``cache["blocks.3.attn.hook_z"]``, ``cache["z", 3]``).

    Block sites are held stacked over the captured layers (no per-layer copies);
    ``cache.stack(kind)`` returns that stack, ``[n_layers_captured, batch, ...]``.

    A few sites are views of another: ``attn.result`` (each head's write, n_heads times the size
    of the residual stream) is ``z_h @ W_O[h]``; ``attn.q_input``/``k_input``/``v_input`` are the
    residual stream once per head; ``mlp_in`` is the residual stream the MLP reads. Others are
    functions of sites captured anyway: ``resid_post`` is the next layer's ``resid_pre``,
    ``resid_mid = resid_pre + attn_out``, ``ln1.normalized`` comes from ``resid_pre`` and
    ``ln1.scale`` (``ln2`` from ``mlp_in``), ``attn.scores`` the products of ``attn.rot_q`` and
    ``attn.rot_k`` (``q``, ``k`` without rotary), masked; ``attn.pattern`` the softmax of ``attn.scores``,
    ``mlp.post`` the activation of ``mlp.pre`` (times ``mlp.pre_linear`` when gated). Captured
    without an edit on them, they are computed on access with the forward's own formula, so
    capturing them costs the forward nothing. The recomputed sums, norms, softmaxes and activations
    equal the forward's to float rounding (the compiled forward may
    fuse an edit's multiply into its sum); everything else is bit for bit the forward's.
    """

    stacked: dict[str, Array]  # kind -> value (outside the blocks) or [captured layers, ...]
    layers: tuple[tuple[str, tuple[int, ...]], ...] = eqx.field(static=True)  # kind -> captured layers
    W_O: Array | None = None  # [n_layers, n_heads, d_head, d_model], for attn.result
    # (kind, its sources, their layer offset, the layers derived), as _derive plans them
    derived: tuple[tuple[str, tuple[str, ...], int, tuple[int, ...]], ...] = eqx.field(static=True, default=())
    cfg: Config | None = eqx.field(static=True, default=None)  # the model's, for the derivations
    masks: tuple[Array, Array] | None = None  # (global, local) attention masks [batch, query, key], for attn.scores

    def _derived(self, site: S.Site) -> Array | None:
        for kind, sources, offset, layers in self.derived:
            if site.kind == kind and site.layer in layers:
                values = [self[f"blocks.{site.layer + offset}.{source}"] for source in sources]
                return self._formula(kind, values, site.layer)
        return None

    def _formula(self, kind: str, values: list[Array], layer: int) -> Array:
        """The forward's own computation of ``kind`` from its sources' values (see ``_derivations``)."""
        if kind == "attn.result":
            return jnp.einsum("bqhe,hed->bqhd", values[0], self.W_O[layer])
        if kind == "resid_mid":
            return values[0] + values[1]
        if kind.endswith(".normalized"):  # as layers.normalize: float32 at least, centred for LayerNorm, over the scale
            x, scale = values[0].astype(accurate(values[0].dtype)), values[1]
            return (x - x.mean(-1, keepdims=True) if self.cfg.norm == "layer" else x) / scale
        if kind == "attn.scores":
            return attention_scores(*values, self.masks[self.cfg.layer_types[layer] == "local"], self.cfg)
        if kind == "attn.pattern":  # as layers.attention: a float32 (at least) softmax, back in the scores' dtype
            return jax.nn.softmax(values[0].astype(accurate(values[0].dtype)), axis=-1).astype(values[0].dtype)
        if kind == "mlp.post":
            post = activation(self.cfg.act, values[0])
            return post * values[1] if len(values) == 2 else post
        if kind in ("mlp_in", "resid_post"):
            return values[0]
        heads = self.cfg.n_heads if kind == "attn.q_input" else self.cfg.n_kv_heads
        return jnp.broadcast_to(values[0][:, :, None], (*values[0].shape[:2], heads, values[0].shape[-1]))

    def _locate(self, site: S.Site) -> tuple[str, int | None] | None:
        """(kind, index into its stack) of a stored value."""
        if site.kind not in self.stacked:
            return None
        if site.layer is None:
            return (site.kind, None) if site.kind not in dict(self.layers) else None
        layers = dict(self.layers).get(site.kind, ())
        return (site.kind, layers.index(site.layer)) if site.layer in layers else None

    def __getitem__(self, name) -> Array:
        if isinstance(name, str) and name in self.stacked and name not in dict(self.layers):
            return self.stacked[name]  # a value stored under its own name (and a wrapped model's site)
        site = S.parse(name)
        derived = self._derived(site)
        if derived is not None:
            return derived
        where = self._locate(site)
        if where is not None:
            kind, index = where
            return self.stacked[kind] if index is None else self.stacked[kind][index]
        names = list(self)
        close = difflib.get_close_matches(S.parse(name).name, names, n=5, cutoff=0.5)
        hint = f" Closest captured: {', '.join(close)}." if close else ""
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise KeyError(f"Site {name!r} was not captured.{hint} Captured: {shown or 'nothing'}; "
                       f"pass it in capture=[...] to jinterp.run")

    def __iter__(self):
        layers = dict(self.layers)
        for kind in self.stacked:
            if kind in layers:
                yield from (f"blocks.{layer}.{kind}" for layer in layers[kind])
            else:
                yield kind
        for kind, _, _, derived_layers in self.derived:
            yield from (f"blocks.{layer}.{kind}" for layer in derived_layers)

    def __len__(self) -> int:
        layers = dict(self.layers)
        stored = sum(len(layers[kind]) if kind in layers else 1 for kind in self.stacked)
        return stored + sum(len(derived_layers) for _, _, _, derived_layers in self.derived)

    def __contains__(self, name) -> bool:
        if isinstance(name, str) and name in self.stacked and name not in dict(self.layers):
            return True
        try:
            site = S.parse(name)
        except (ValueError, TypeError):
            return False
        derived = any(site.kind == kind and site.layer in layers for kind, _, _, layers in self.derived)
        return derived or self._locate(site) is not None

    def stack(self, kind) -> Array:
        """One block site kind over the captured layers: ``[n_layers_captured, ...]``."""
        kind = S.parse(kind).kind
        layers = self.captured_layers(kind)
        if any(derived == kind for derived, *_ in self.derived):
            return jnp.stack([self[f"blocks.{layer}.{kind}"] for layer in layers])
        if kind not in dict(self.layers):
            raise KeyError(f"No layer of {kind!r} was captured; captured: {', '.join(self.stacked)}")
        return self.stacked[kind]

    def __treescope_repr__(self, path, subtree_renderer):
        from jinterp.treescope_views import render_cache  # display code stays out of the forward's imports

        return render_cache(self, path, subtree_renderer)

    def captured_layers(self, kind) -> tuple[int, ...]:
        """The layers a stacked kind holds, in order."""
        kind = S.parse(kind).kind
        derived = {k: layers for k, _, _, layers in self.derived}
        return tuple(sorted(derived.get(kind, ()) + dict(self.layers).get(kind, ())))


def _names(capture) -> list:
    """capture= as given -> a list of names. A tuple holding an int is one short-form name."""
    if capture is None or capture is False:
        return []
    if capture is True or capture == "all":
        return ["*"]
    if isinstance(capture, str) or (isinstance(capture, tuple) and any(isinstance(c, int) for c in capture)):
        return [capture]
    return list(capture)


def captures(model: Transformer, capture) -> tuple[iv.Capture, ...]:
    """Site names (any spelling, globs such as ``blocks.*.attn.*``, or "all") -> Capture interventions."""
    return _captures(model.cfg, _names(capture))


def _captures(cfg, names) -> tuple[iv.Capture, ...]:
    layers_by_kind: dict[str, set[int] | None] = {}
    for name in names:
        site = S.parse(name)
        if any(ch in site.kind for ch in "*?["):
            matched = fnmatch.filter(S.site_names(cfg), site.name)
            if not matched:
                raise ValueError(f"Capture pattern {name!r} matches no site; jinterp.sites(model) lists them")
            found = [S.parse(n) for n in matched]
        else:
            site = S.resolve(cfg, name)
            layers = range(cfg.n_layers) if site.layer == "*" else [site.layer]
            found = [S.Site(site.kind, layer) for layer in layers]
        for site in found:
            if site.layer is None:
                layers_by_kind[site.kind] = None
            else:
                layers_by_kind.setdefault(site.kind, set()).add(site.layer)
    return tuple(iv.Capture(kind, None if layers is None else sorted(layers))
                 for kind, layers in layers_by_kind.items())


def _validate(model: Transformer, interventions, seq_len: int) -> None:
    top, block = S.site_kinds(model.cfg)
    for intervention in interventions:
        for kind in intervention.kinds():
            if kind not in top + block:
                layered = kind in S.BLOCK_KINDS or getattr(intervention, "layers", None) is not None
                name = kind if "*" in kind else S.Site(kind, "*" if layered else None).name
                S.resolve(model.cfg, name)  # raises the unknown-site message
        intervention.check(model.cfg, seq_len)


@jit
def _run(model, tokens, interventions, attention_mask, token_type_ids, logit_positions=None):
    output, top, blocks = model.forward(tokens, interventions, attention_mask, token_type_ids,
                                        logit_positions=logit_positions)
    stacked, layers = {}, []
    for capture in interventions:
        if not isinstance(capture, iv.Capture):
            continue
        if capture.site in top:
            stacked[capture.site] = top[capture.site]
            continue
        chosen = tuple(layer for _, layer in capture.entries(model.cfg.n_layers))
        every = chosen == tuple(range(model.cfg.n_layers))
        stacked[capture.site] = blocks[capture.site] if every else blocks[capture.site][jnp.asarray(chosen)]
        layers.append((capture.site, chosen))
    return output, Cache(stacked, tuple(layers))


def run(model: Transformer, tokens, *, capture=(), edits=(), attention_mask=None, token_type_ids=None,
        logit_positions=None, mesh=None, check: bool = False):
    """Run ``model`` on ``tokens`` with ``edits`` applied, recording the ``capture`` sites.

    Args:
        model: a ``jinterp.Transformer``.
        tokens: int ids ``[batch, seq]``.
        capture: site names to record (any accepted spelling; ``"blocks.*.attn.pattern"`` for
            every layer; ``"all"`` for every site). Captured values are the values the forward
            continues with, i.e. after this run's edits at that site.
        edits: an intervention or a list of them (``Replace``, ``Add``, ``Scale``, ``Zero``, ...),
            applied in order at their sites.
        attention_mask: ``[batch, seq]``, 1 for real tokens, 0 for padding (left or right);
            real tokens get the same results as the unpadded sequence.
        token_type_ids: ``[batch, seq]`` segment ids for models with token types (BERT).
        logit_positions: unembed only these positions (``[n]``, or ``[batch, n]`` per row; negative
            counts from the end): logits ``[batch, n, d_vocab]``, and the unembedding's cost saved.
        mesh: a ``jax.sharding.Mesh`` (``jinterp.sharding.mesh()``): the batch is split over its
            ``"data"`` axis (the batch size must be a multiple of it), and so are the output and the
            captured values; weights are replicated unless ``jinterp.sharding.shard_model`` split them.
        check: raise ``FloatingPointError`` naming the operation that made a NaN, or the output or
            captured site holding a NaN or inf (``jax.experimental.checkify``; slower, off by default).

    Returns:
        ``(output, cache)``: logits ``[batch, seq, d_vocab]`` (hidden states for an encoder) and
        a ``Cache`` of the captured values.

    A model wrapped with ``jinterp.byo.wrap`` (Equinox, Flax linen or nnx) takes its own
    ``inputs`` in place of tokens, with ``capture`` and ``edits`` only.
    """
    if isinstance(model, Wrapped):
        from jinterp.byo import run as byo

        _transformer_only(attention_mask=attention_mask, token_type_ids=token_type_ids, logit_positions=logit_positions,
                          mesh=mesh, check=check or None)
        return byo.run(model, tokens, capture=capture, edits=edits)
    check_inputs(model.cfg, tokens, attention_mask, token_type_ids)
    edits = iv.flatten(edits)
    _validate(model, edits, tokens.shape[1])
    edited = {kind for edit in edits for kind in edit.kinds()}
    wanted, derived = _plan(model.cfg, _names(capture), frozenset(edited))
    # The captured logits are the output itself (logits is the last site): not recorded a second time.
    logits_are_output = model.cfg.unembed and any(c.site == "logits" for c in wanted)
    wanted = tuple(c for c in wanted if not (logits_are_output and c.site == "logits"))
    if mesh is not None:
        from jinterp import sharding

        model, tokens, attention_mask, token_type_ids, logit_positions = sharding.split_batch(
            mesh, model, tokens, attention_mask, token_type_ids, logit_positions)
    args = (model, jnp.asarray(tokens), edits + wanted, attention_mask, token_type_ids, logit_positions)
    if check:
        from jinterp.checks import checked

        output, cache = checked(_run, *args)
    else:
        output, cache = _run(*args)
    if logits_are_output:
        cache = dataclasses.replace(cache, stacked={**cache.stacked, "logits": output})
    if derived:
        masks = None
        if any(kind == "attn.scores" for kind, *_ in derived):
            valid = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
            masks = attention_masks(model.cfg, valid, real_positions(valid))
        cache = dataclasses.replace(cache, W_O=model.blocks.attn.W_O, derived=derived, cfg=model.cfg, masks=masks)
    return output, cache


def _plan(cfg, names: list, edited: frozenset) -> tuple[tuple[iv.Capture, ...], tuple]:
    """(captures, derived sites) for these names; memoised, since parsing every name of a long
    capture list costs milliseconds per call, a fair part of a small forward pass."""
    try:
        return _memoised_plan(cfg, tuple(names), edited)
    except TypeError:  # an unhashable spelling (a list for a short form): plan without the memo
        return _derive(_captures(cfg, names), cfg, edited)


@functools.lru_cache(maxsize=256)
def _memoised_plan(cfg, names: tuple, edited: frozenset):
    return _derive(_captures(cfg, names), cfg, edited)


def _derive(wanted: tuple[iv.Capture, ...], cfg, edited: set[str]):
    """Leave out every derivable site (not edited in this run) the Cache can compute on access
    from sources captured anyway, or, for a forced derivation, from its source captured in its place."""
    layers = {c.site: {layer for _, layer in c.entries(cfg.n_layers)} for c in wanted}
    derived = {}  # kind -> (sources, offset, layers)

    def available(kind) -> set:
        return layers.get(kind, set()) | (set(derived[kind][2]) if kind in derived else set())

    for kind, how in _derivations(cfg).items():
        if kind not in layers or kind in edited or edited & set(how.unedited):
            continue
        if how.forced:
            for source in how.sources:
                missing = layers[kind] - available(source)
                if missing:
                    layers[source] = layers.get(source, set()) | missing
            chosen = layers.pop(kind)
        else:
            chosen = {layer for layer in layers[kind]
                      if all(layer + how.offset in available(source) for source in how.sources)}
            if not chosen:
                continue
            layers[kind] -= chosen
            if not layers[kind]:
                del layers[kind]
        derived[kind] = (how.sources, how.offset, tuple(sorted(chosen)))
    captured = {c.site: c for c in wanted
                if c.site in layers and {layer for _, layer in c.entries(cfg.n_layers)} == layers[c.site]}
    plan = tuple(captured.get(kind) or iv.Capture(kind, sorted(found)) for kind, found in layers.items())
    return plan, tuple((kind, *how) for kind, how in derived.items())


def _transformer_only(**options) -> None:
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        raise TypeError(f"{', '.join(given)} apply to jinterp transformers only, not to a wrapped model")


def sites(model: Transformer, batch="batch", seq="pos") -> dict[str, tuple]:
    """Every site of ``model`` with its shape (batch and sequence sizes symbolic unless given).
    For a wrapped model (``jinterp.byo``): ``sites(model, inputs)``, shapes at those inputs."""
    if isinstance(model, Wrapped):
        from jinterp.byo import run as byo

        return byo.sites(model, batch)
    return {name: S.site_shape(model.cfg, S.parse(name).kind, batch, seq) for name in S.site_names(model.cfg)}
