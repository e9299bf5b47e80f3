"""Residual-stream tools: accumulated and decomposed residual stream, per-head results, direct
logit attribution with the cached final-norm scale, and the logit lens.

Each takes the model and a ``Cache`` holding the sites it needs (``sites(model)`` lists them
all: ``jinterp.run(model, tokens, capture=jinterp.lens.site_names(model))``). Components are stacked
on a leading axis with a matching list of labels.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jinterp.cache import Cache
from jinterp.models.layers import normalize
from jinterp.models.transformer import Transformer


def site_names(model: Transformer) -> list[str]:
    """Every site the functions here read, for ``capture=``."""
    names = ["embed", "blocks.*.resid_pre", "blocks.*.resid_post", "blocks.*.attn_out", "blocks.*.attn.result"]
    names += ["pos_embed"] if model.W_pos is not None else []
    names += ["blocks.*.mlp_out"] if model.cfg.has_mlp else []
    return names + (["ln_final.scale"] if model.ln_final is not None else [])


def _need(model: Transformer, what: str) -> None:
    cfg = model.cfg
    if cfg.norm_placement != "pre" or not cfg.unembed:
        raise ValueError(f"{what} needs a pre-norm decoder, whose residual stream is the sum of its components; "
                         f"this {cfg.architecture} model has norm_placement={cfg.norm_placement!r}")


def _layer(model: Transformer, layer: int | None, lowest: int = 0) -> int:
    """``layer`` checked (indexing past the end would silently clamp); None -> n_layers."""
    n = model.cfg.n_layers
    if layer is None:
        return n
    if not isinstance(layer, int) or not lowest <= layer <= n:
        raise ValueError(f"layer={layer!r} is out of range: valid {lowest}..{n} (the residual stream entering "
                         f"that layer; {n} = after the last of the model's {n} layers)")
    return layer


def _position(position: int, seq: int) -> int:
    """``position`` checked against the cached sequence length (jnp indexing would clamp it)."""
    if not isinstance(position, int) or not -seq <= position < seq:
        raise ValueError(f"position={position!r} is out of range for {seq} cached positions: valid {-seq}..{seq - 1}")
    return position


def _get(cache: Cache, name: str) -> Array:
    try:
        return cache[name]
    except KeyError:
        raise KeyError(f"The cache lacks {name!r}; run with capture=jinterp.lens.site_names(model)") from None


def accumulated_resid(model: Transformer, cache: Cache, layer: int | None = None):
    """The residual stream entering each layer up to ``layer`` (default: all, plus the final
    state): ``[n, batch, pos, d_model]`` and labels ``["0_pre", ..., "final"]``."""
    n = _layer(model, layer, lowest=1)
    states = [_get(cache, f"blocks.{i}.resid_pre") for i in range(n)]
    labels = [f"{i}_pre" for i in range(n)]
    if layer is None:
        states.append(_get(cache, f"blocks.{n - 1}.resid_post"))
        labels.append("final")
    return jnp.stack(states), labels


def decompose_resid(model: Transformer, cache: Cache, layer: int | None = None):
    """The residual stream entering ``layer`` (default: the final state) split into what wrote it:
    embeddings, then each earlier layer's ``attn_out`` and ``mlp_out``. They sum to the residual."""
    _need(model, "decompose_resid")
    n = _layer(model, layer)
    names = ["embed"] + (["pos_embed"] if model.W_pos is not None else [])
    writers = ["attn_out"] + (["mlp_out"] if model.cfg.has_mlp else [])
    names += [f"blocks.{i}.{kind}" for i in range(n) for kind in writers]
    labels = [name.removeprefix("blocks.").replace(".", "_") for name in names]  # blocks.0.attn_out: 0_attn_out
    return jnp.stack([_get(cache, name) for name in names]), labels


def stack_head_results(model: Transformer, cache: Cache, layer: int | None = None):
    """Each head's write into the residual stream for layers before ``layer`` (default all):
    ``[n_layers * n_heads, batch, pos, d_model]`` and labels ``["L0H0", ...]`` (output biases excluded)."""
    _need(model, "stack_head_results")
    n = _layer(model, layer, lowest=1)
    results = [_get(cache, f"blocks.{i}.attn.result") for i in range(n)]  # [batch, pos, head, d_model]
    stacked = jnp.stack(results).transpose(0, 3, 1, 2, 4).reshape(-1, *results[0].shape[:2], results[0].shape[-1])
    return stacked, [f"L{i}H{h}" for i in range(n) for h in range(model.cfg.n_heads)]


def apply_final_norm(model: Transformer, cache: Cache, stack, position: int | None = None):
    """Put components (``[n, batch, pos, d_model]``, or ``[n, batch, d_model]`` at ``position``)
    through the final norm as the model did, with the *cached* scale, so that they stay linear and
    sum to the normalised residual (LayerNorm also centres each component; its bias, a constant,
    is left out)."""
    _need(model, "apply_final_norm")
    if model.ln_final is None:
        return stack
    scale = _get(cache, "ln_final.scale")
    scale = scale if position is None else scale[:, position]
    if model.cfg.norm == "layer":
        stack = stack - stack.mean(-1, keepdims=True)
    return stack / scale * model.ln_final.w


def logit_directions(model: Transformer, tokens, other_tokens=None) -> Float[Array, "... d_model"]:
    """Unembedding columns for ``tokens`` (``[...]`` ids), minus those of ``other_tokens`` if given:
    the logit-difference direction, e.g. correct answer minus the distractor."""
    for ids in (tokens, other_tokens):
        if ids is not None and np.size(ids) and not 0 <= np.min(ids) <= np.max(ids) < model.cfg.d_vocab:
            raise ValueError(f"token ids {np.asarray(ids).tolist()} are outside the vocabulary "
                             f"(valid ids 0..{model.cfg.d_vocab - 1})")
    directions = model.W_unembed.T[jnp.asarray(tokens)]
    return directions if other_tokens is None else directions - model.W_unembed.T[jnp.asarray(other_tokens)]


def direct_logit_attribution(model: Transformer, cache: Cache, stack, directions, position: int = -1):
    """How much each component writes along ``directions`` (``[batch, d_model]``, one per example)
    at ``position``, through the final norm with the cached scale: ``[n, batch]``.

    Summed over a complete decomposition (``decompose_resid``) plus the unembedding bias this is
    the logit (difference) itself.
    """
    position = _position(position, stack.shape[2])
    if jnp.shape(directions) != (stack.shape[1], model.cfg.d_model):
        raise ValueError(f"directions must be [batch={stack.shape[1]}, d_model={model.cfg.d_model}] (one per example), "
                         f"got shape {jnp.shape(directions)}")
    normed = apply_final_norm(model, cache, stack[:, :, position], position)
    return jnp.einsum("nbd,bd->nb", normed, directions)


def logit_lens(model: Transformer, cache: Cache, position: int = -1):
    """Each layer's residual stream read out as if it were the last one (final norm recomputed,
    then the unembedding): logits ``[n_layers + 1, batch, d_vocab]`` at ``position``."""
    states, _ = accumulated_resid(model, cache)
    return readout(model, states[:, :, _position(position, states.shape[2])])


def readout(model: Transformer, x: Float[Array, "... d_model"]) -> Float[Array, "... d_vocab"]:
    """The model's final norm and unembedding (bias and soft-cap included) applied to ``x``."""
    return model.unembed(normalize(model.ln_final, x, model.cfg, lambda kind, value: value, "ln_final"))
