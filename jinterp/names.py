"""Site names: the vocabulary of points in the forward pass that interventions touch.

A site is a *kind* (``resid_pre``, ``attn.z``, ...) plus, inside the blocks, a layer:
``blocks.3.attn.z``. TransformerLens names (``blocks.3.attn.hook_z``, ``hook_embed``) and
``get_act_name``-style short forms (``("z", 3)``, ``"k6"``, ``("scale", 2, "ln1")``) resolve
to the same sites.
"""

from __future__ import annotations

import difflib
import re
from typing import NamedTuple

from jinterp.models.config import Config

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
    "resid_pre", "ln1", "attn", "ln1_post", "attn_out", "resid_mid", "mlp_in", "ln2", "mlp", "ln2_post",
    "mlp_out", "resid_post", "normalized_resid_post"})


class Site(NamedTuple):
    """A parsed site name. ``layer`` is None outside the blocks, an int, or "*" (every layer)."""

    kind: str
    layer: int | str | None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"


def site_kinds(cfg: Config) -> tuple[list[str], list[str]]:
    """The site kinds a model with this config has: (outside the blocks, inside each block)."""
    has_norm = cfg.norm is not None
    top = ["embed"]
    if cfg.positional == "learned":
        top.append("pos_embed")
    if cfg.n_token_types:
        top.append("token_type_embed")
    if cfg.embed_norm:
        top += ["ln_embed.scale", "ln_embed.normalized"]
    block = ["resid_pre"]
    if has_norm and cfg.norm_placement != "post":
        block += ["ln1.scale", "ln1.normalized"]
    if cfg.norm_placement != "post":
        block += ["attn.q_input", "attn.k_input", "attn.v_input"]
    block += ["attn.q", "attn.k", "attn.v"]
    if cfg.positional == "rotary":
        block += ["attn.rot_q", "attn.rot_k"]
    block += ["attn.scores", "attn.pattern", "attn.z", "attn.result"]
    if cfg.norm_placement == "sandwich":
        block += ["ln1_post.scale", "ln1_post.normalized"]
    block.append("attn_out")
    if cfg.has_mlp and not cfg.parallel:
        block.append("resid_mid")
    if cfg.norm_placement == "post":
        block += ["ln1.scale", "ln1.normalized"]
    if cfg.has_mlp:
        if cfg.norm_placement != "post":
            block.append("mlp_in")
        if has_norm and cfg.norm_placement != "post":
            block += ["ln2.scale", "ln2.normalized"]
        block += ["mlp.pre"] + (["mlp.pre_linear"] if cfg.gated_mlp else []) + ["mlp.post"]
        if cfg.norm_placement == "sandwich":
            block += ["ln2_post.scale", "ln2_post.normalized"]
        block.append("mlp_out")
    block.append("resid_post")
    if cfg.norm_placement == "post":
        block += ["ln2.scale", "ln2.normalized", "normalized_resid_post"]
    tail = []
    if has_norm and cfg.final_norm:
        tail += ["ln_final.scale", "ln_final.normalized"]
    if cfg.unembed:
        tail.append("logits")
    return top + tail, block


def site_names(cfg: Config) -> list[str]:
    """Every site name of a model, in forward order."""
    top, block = site_kinds(cfg)
    n_head = len([k for k in top if not k.startswith(("ln_final", "logits"))])
    names = top[:n_head]
    for layer in range(cfg.n_layers):
        names += [f"blocks.{layer}.{k}" for k in block]
    return names + top[n_head:]


def site_shape(cfg: Config, kind: str, batch="batch", seq="pos") -> tuple:
    """The shape of a site's value; batch and sequence sizes stay symbolic unless given."""
    size = {
        "batch": batch, "pos": seq, "query_pos": seq, "key_pos": seq, "1": 1,
        "d_model": cfg.d_model, "d_head": cfg.d_head, "head": cfg.n_heads,
        "kv_head": cfg.n_kv_heads, "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab,
    }
    return tuple(size[axis] for axis in SITE_AXES[kind])


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


def resolve(cfg: Config, name) -> Site:
    """Parse a site name and check it exists in a model with this config."""
    site = parse(name)
    top, block = site_kinds(cfg)
    known = site.kind in (block if site.layer is not None else top)
    if not known:
        raise ValueError(_unknown_message(cfg, name, site, top, block))
    if isinstance(site.layer, int) and not 0 <= site.layer < cfg.n_layers:
        raise ValueError(
            f"Site {name!r}: layer {site.layer} is out of range; this model has "
            f"{cfg.n_layers} layers (0..{cfg.n_layers - 1})")
    return site


def _unknown_message(cfg: Config, name, site: Site, top: list[str], block: list[str]) -> str:
    layer = site.layer if isinstance(site.layer, int) and 0 <= site.layer < cfg.n_layers else 0
    candidates = top + [f"blocks.{layer}.{k}" for k in block]
    close = difflib.get_close_matches(Site(site.kind, site.layer).name, candidates, n=5, cutoff=0.5)
    close = close or difflib.get_close_matches(site.kind, top + block, n=5, cutoff=0.5)
    if site.kind in SITE_AXES:
        where = "inside blocks (blocks.{layer}." + site.kind + ")" if site.kind in BLOCK_KINDS else "outside the blocks"
        why = (f"this {cfg.architecture} model has no site {site.kind!r}" if site.kind not in top + block
               else f"{site.kind!r} is a site {where}")
    else:
        why = f"{site.kind!r} is not a site kind"
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    return (f"Unknown site {name!r}: {why}.{hint} Block site kinds here: {', '.join(block)}; "
            f"other sites: {', '.join(top)}. jinterp.sites(model) lists every name with its shape.")
