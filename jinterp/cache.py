"""``run``: one forward pass with captures and edits, returning the output and a ``Cache``."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Mapping

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from jinterp import interventions as iv
from jinterp import names as S
from jinterp.models.transformer import Transformer, check_inputs


class Cache(eqx.Module, Mapping):
    """Captured site values by name. Any accepted spelling of a name works as a key
    (``cache["blocks.3.attn.z"]``, ``cache["blocks.3.attn.hook_z"]``, ``cache["z", 3]``).

    Block sites are held stacked over the captured layers (no per-layer copies);
    ``cache.stack(kind)`` returns that stack, ``[n_layers_captured, batch, ...]``.

    ``attn.result`` (each head's write, n_heads times the size of the residual stream) is kept as
    the captured ``attn.z`` and computed on access as ``z_h @ W_O[h]``, the forward's own formula.
    """

    stacked: dict[str, Array]  # kind -> value (outside the blocks) or [captured layers, ...]
    layers: tuple[tuple[str, tuple[int, ...]], ...] = eqx.field(static=True)  # kind -> captured layers
    W_O: Array | None = None  # [n_layers, n_heads, d_head, d_model], for attn.result
    result_layers: tuple[int, ...] = eqx.field(static=True, default=())

    def _result(self, layer: int) -> Array:
        return jnp.einsum("bqhe,hed->bqhd", self[f"blocks.{layer}.attn.z"], self.W_O[layer])

    def _is_result(self, site: S.Site) -> bool:
        return site.kind == "attn.result" and site.layer in self.result_layers

    def _locate(self, site: S.Site) -> tuple[str, int | None] | None:
        """(kind, index into its stack) of a stored value."""
        if site.kind not in self.stacked:
            return None
        if site.layer is None:
            return (site.kind, None) if site.kind not in dict(self.layers) else None
        layers = dict(self.layers).get(site.kind, ())
        return (site.kind, layers.index(site.layer)) if site.layer in layers else None

    def __getitem__(self, name) -> Array:
        site = S.parse(name)
        if self._is_result(site):
            return self._result(site.layer)
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
        yield from (f"blocks.{layer}.attn.result" for layer in self.result_layers)

    def __len__(self) -> int:
        layers = dict(self.layers)
        return sum(len(layers[kind]) if kind in layers else 1 for kind in self.stacked) + len(self.result_layers)

    def __contains__(self, name) -> bool:
        try:
            site = S.parse(name)
        except (ValueError, TypeError):
            return False
        return self._is_result(site) or self._locate(site) is not None

    def stack(self, kind) -> Array:
        """One block site kind over the captured layers: ``[n_layers_captured, ...]``."""
        kind = S.parse(kind).kind
        if kind == "attn.result" and self.result_layers:
            return jnp.stack([self._result(layer) for layer in self.result_layers])
        if kind not in dict(self.layers):
            raise KeyError(f"No layer of {kind!r} was captured; captured: {', '.join(self.stacked)}")
        return self.stacked[kind]

    def captured_layers(self, kind) -> tuple[int, ...]:
        """The layers a stacked kind holds, in order."""
        kind = S.parse(kind).kind
        return self.result_layers if kind == "attn.result" else dict(self.layers).get(kind, ())


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
    cfg = model.cfg
    layers_by_kind: dict[str, set[int] | None] = {}
    for name in _names(capture):
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
                layer = "*" if kind in S.BLOCK_KINDS else None
                S.resolve(model.cfg, S.Site(kind, layer).name)  # raises the unknown-site message
        intervention.check(model.cfg, seq_len)


@eqx.filter_jit
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
        logit_positions=None):
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

    Returns:
        ``(output, cache)``: logits ``[batch, seq, d_vocab]`` (hidden states for an encoder) and
        a ``Cache`` of the captured values.
    """
    check_inputs(model.cfg, tokens, attention_mask, token_type_ids)
    edits = iv.flatten(edits)
    _validate(model, edits, tokens.shape[1])
    wanted = captures(model, capture)
    result_layers = ()
    if not any("attn.result" in edit.kinds() for edit in edits):
        wanted, result_layers = _result_from_z(wanted, model.cfg.n_layers)
    output, cache = _run(model, jnp.asarray(tokens), edits + wanted, attention_mask, token_type_ids, logit_positions)
    if result_layers:
        cache = dataclasses.replace(cache, W_O=model.blocks.attn.W_O, result_layers=result_layers)
    return output, cache


def _result_from_z(wanted: tuple[iv.Capture, ...], n_layers: int):
    """Capture attn.z in place of attn.result: the Cache computes the result from it on access,
    so the forward never materialises n_heads copies of the residual stream."""
    result = next((c for c in wanted if c.site == "attn.result"), None)
    if result is None:
        return wanted, ()
    result_layers = tuple(layer for _, layer in result.entries(n_layers))
    z = next((c for c in wanted if c.site == "attn.z"), None)
    z_layers = set(result_layers) | ({layer for _, layer in z.entries(n_layers)} if z else set())
    others = tuple(c for c in wanted if c.site not in ("attn.result", "attn.z"))
    return others + (iv.Capture("attn.z", sorted(z_layers)),), result_layers


def sites(model: Transformer, batch="batch", seq="pos") -> dict[str, tuple]:
    """Every site of ``model`` with its shape (batch and sequence sizes symbolic unless given)."""
    return {name: S.site_shape(model.cfg, S.parse(name).kind, batch, seq) for name in S.site_names(model.cfg)}
