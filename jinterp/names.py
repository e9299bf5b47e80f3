"""Site names: the vocabulary of points in the forward pass that interventions touch.

A site is a *kind* (``resid_pre``, ``attn.z``, ...) plus, inside the blocks, a layer:
``blocks.3.attn.z``. TransformerLens names (``blocks.3.attn.hook_z``, ``hook_embed``) and
``get_act_name``-style short forms (``("z", 3)``, ``"k6"``, ``("scale", 2, "ln1")``) resolve
to the same sites.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# The axes of each site's value, batch first. "head" axes index query heads, "kv_head" axes
# index key/value heads (under grouped-query attention query head h reads kv head
# h // (n_heads // n_kv_heads)). "pos" (or "query_pos") is the axis position masks act on.
RESID = ("batch", "pos", "d_model")
SCALE = ("batch", "pos", "1")
Q_HEADS = ("batch", "pos", "head", "d_head")
KV_HEADS = ("batch", "pos", "kv_head", "d_head")
ATTN = ("batch", "head", "query_pos", "key_pos")

SITE_AXES: dict[str, tuple[str, ...]] = {
    "embed": RESID,
    "pos_embed": RESID,
    "token_type_embed": RESID,
    "ln_embed.scale": SCALE,
    "ln_embed.normalized": RESID,
    "resid_pre": RESID,
    "ln1.scale": SCALE,
    "ln1.normalized": RESID,
    "attn.q_input": ("batch", "pos", "head", "d_model"),
    "attn.k_input": ("batch", "pos", "kv_head", "d_model"),
    "attn.v_input": ("batch", "pos", "kv_head", "d_model"),
    "attn.q": Q_HEADS,
    "attn.k": KV_HEADS,
    "attn.v": KV_HEADS,
    "attn.rot_q": Q_HEADS,
    "attn.rot_k": KV_HEADS,
    "attn.scores": ATTN,
    "attn.pattern": ATTN,
    "attn.z": Q_HEADS,
    "attn.result": ("batch", "pos", "head", "d_model"),
    "ln1_post.scale": SCALE,
    "ln1_post.normalized": RESID,
    "attn_out": RESID,
    "resid_mid": RESID,
    "mlp_in": RESID,
    "ln2.scale": SCALE,
    "ln2.normalized": RESID,
    "mlp.pre": ("batch", "pos", "d_mlp"),
    "mlp.pre_linear": ("batch", "pos", "d_mlp"),
    "mlp.post": ("batch", "pos", "d_mlp"),
    "moe.router_logits": ("batch", "pos", "expert"),
    "moe.weights": ("batch", "pos", "expert"),
    "moe.expert_out": ("batch", "pos", "expert", "d_model"),
    "ln2_post.scale": SCALE,
    "ln2_post.normalized": RESID,
    "mlp_out": RESID,
    "resid_post": RESID,
    "normalized_resid_post": RESID,
    "ln_final.scale": SCALE,
    "ln_final.normalized": RESID,
    "logits": ("batch", "pos", "d_vocab"),
}

BLOCK_KINDS = frozenset(k for k in SITE_AXES if k.split(".")[0] in {
    "resid_pre", "ln1", "attn", "ln1_post", "attn_out", "resid_mid", "mlp_in", "ln2", "mlp", "moe", "ln2_post",
    "mlp_out", "resid_post", "normalized_resid_post"})


class Site(NamedTuple):
    """A parsed site name. ``layer`` is None outside the blocks, an int, or "*" (every layer)."""

    kind: str
    layer: int | str | None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"


POSITION_AXES = ("pos", "query_pos")  # what positions= restricts (the query axis of scores and pattern)
HEAD_AXES = ("head", "kv_head")  # what heads= restricts (query heads, or key/value heads)


def role(axis: str) -> str:
    """An axis's role for restriction and sweeps: "pos" for either position axis, "head" for either
    head axis, the axis itself otherwise."""
    return "pos" if axis in POSITION_AXES else "head" if axis in HEAD_AXES else axis


def site_key(name) -> Site:
    """The (kind, layer) of any site name, jinterp's or another model's. jinterp's names parse as
    usual (``blocks.3.attn.z``: kind ``attn.z``, layer 3; TransformerLens spellings too). Any other
    name's first integer path part (or ``*``) is its layer: ``layers.3.mlp`` is kind ``layers.*.mlp``
    at layer 3, ``hidden`` kind ``hidden`` with no layer."""
    parsed = parse(name)
    if parsed.kind in SITE_AXES or not isinstance(name, str):
        return parsed
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == "*" or part.isdigit():
            return Site(".".join([*parts[:i], "*", *parts[i + 1:]]), part if part == "*" else int(part))
    return Site(name, None)


def site_name(kind: str, layer) -> str:
    """The name of ``kind`` at ``layer`` (the inverse of ``site_key``)."""
    if layer is None:
        return kind
    if kind in SITE_AXES:
        return f"blocks.{layer}.{kind}"
    return kind.replace("*", str(layer), 1)


# --- TransformerLens compatibility ---------------------------------------------------------

_TL_ATTN = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_TL_MLP = {"pre", "post", "mid", "pre_linear"}
_TL_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q",
             "value": "v", "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_TL_LAYER_TYPE = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_TL_RENAMES = {"attn.attn_scores": "attn.scores", "embed.ln.scale": "ln_embed.scale",
               "embed.ln.normalized": "ln_embed.normalized", "embed.embed": "embed",
               "embed.pos_embed": "pos_embed", "embed.token_type_embed": "token_type_embed",
               "unembed.out": "logits", "q_input": "attn.q_input", "k_input": "attn.k_input",
               "v_input": "attn.v_input"}


def tl_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' ``get_act_name``: a short form to a full hook name."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.fullmatch(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match:
        name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3) or None
    name = _TL_ALIAS.get(name, name)
    full = "" if layer is None else f"blocks.{layer}."
    if name in _TL_ATTN:
        layer_type = "attn"
    elif name in _TL_MLP:
        layer_type = "mlp"
    elif layer_type in _TL_LAYER_TYPE:
        layer_type = _TL_LAYER_TYPE[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


def parse(name) -> Site:
    """Parse any accepted spelling of a site name, without checking it against a model."""
    if isinstance(name, Site):
        return name
    if isinstance(name, tuple):
        name = tl_act_name(*name)
    if not isinstance(name, str):
        raise TypeError(f"A site name is a string or a get_act_name-style tuple, got {name!r}")
    if "." not in name and not name.startswith("hook_") and re.fullmatch(r"[a-z]+\d+[a-z_0-9]*", name):
        name = tl_act_name(name)
    parts = [p[len("hook_"):] if p.startswith("hook_") else p for p in name.split(".")]
    layer = None
    if len(parts) >= 3 and parts[0] == "blocks":
        layer = parts[1] if parts[1] == "*" else _layer_int(parts[1], name)
        parts = parts[2:]
    kind = ".".join(parts)
    kind = _TL_RENAMES.get(kind, kind)
    return Site(kind, layer)


def _layer_int(text: str, name: str) -> int:
    if not text.lstrip("-").isdigit():
        raise ValueError(f"Site {name!r}: layer {text!r} is not an integer (or '*' for every layer)")
    return int(text)
