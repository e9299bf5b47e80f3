"""``run``: one forward pass with captures and edits, returning the output and a ``Cache``."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array

from jinterp import interventions as iv
from jinterp import sites as S
from jinterp.models.transformer import Transformer, check_inputs


class Cache(eqx.Module, Mapping):
    """Captured site values by name. Any accepted spelling of a name works as a key
    (``cache["blocks.3.attn.z"]``, ``cache["blocks.3.attn.hook_z"]``, ``cache["z", 3]``)."""

    values: dict[str, Array]

    def __getitem__(self, name) -> Array:
        key = S.parse(name).name
        if key in self.values:
            return self.values[key]
        close = difflib.get_close_matches(key, list(self.values), n=5, cutoff=0.5)
        hint = f" Closest captured: {', '.join(close)}." if close else ""
        raise KeyError(f"Site {name!r} was not captured.{hint} Captured: {', '.join(self.values) or 'nothing'}; "
                       f"pass it in capture=[...] to jinterp.run")

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, name) -> bool:
        try:
            return S.parse(name).name in self.values
        except (ValueError, TypeError):
            return False

    def stack(self, kind: str) -> Array:
        """One kind's captured values over layers, stacked: ``[n_layers_captured, ...]``."""
        layers = sorted((S.parse(n).layer, n) for n in self.values if S.parse(n).kind == S.parse(kind).kind
                        and S.parse(n).layer is not None)
        if not layers:
            raise KeyError(f"No layer of {kind!r} was captured; captured: {', '.join(self.values)}")
        return jnp.stack([self.values[n] for _, n in layers])


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
    return tuple(iv.Capture(kind, None if layers is None else tuple(sorted(layers)))
                 for kind, layers in layers_by_kind.items())


def _validate(model: Transformer, interventions, seq_len: int) -> None:
    top, block = S.site_kinds(model.cfg)
    for intervention in interventions:
        kind = intervention.site
        if kind not in top + block:
            layer = "*" if kind in S.BLOCK_KINDS else None
            S.resolve(model.cfg, S.Site(kind, layer).name)  # raises the unknown-site message
        intervention.check(model.cfg, seq_len)


@eqx.filter_jit
def _run(model, tokens, interventions, attention_mask, token_type_ids):
    output, top, blocks = model.forward(tokens, interventions, attention_mask, token_type_ids)
    values = {}
    for capture in interventions:
        if isinstance(capture, iv.Capture):
            for name, layer in zip(capture.names(), capture.layers or [None]):
                values[name] = top[capture.site] if layer is None else blocks[capture.site][layer]
    return output, values


def run(model: Transformer, tokens, *, capture=(), edits=(), attention_mask=None, token_type_ids=None):
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

    Returns:
        ``(output, cache)``: logits ``[batch, seq, d_vocab]`` (hidden states for an encoder) and
        a ``Cache`` of the captured values.
    """
    check_inputs(model.cfg, tokens, attention_mask, token_type_ids)
    edits = iv.flatten(edits)
    _validate(model, edits, tokens.shape[1])
    interventions = edits + captures(model, capture)
    output, values = _run(model, jnp.asarray(tokens), interventions, attention_mask, token_type_ids)
    return output, Cache(values)


def sites(model: Transformer, batch="batch", seq="pos") -> dict[str, tuple]:
    """Every site of ``model`` with its shape (batch and sequence sizes symbolic unless given)."""
    return {name: S.site_shape(model.cfg, S.parse(name).kind, batch, seq) for name in S.site_names(model.cfg)}
