"""Mixture-of-experts analysis: how often the router sends tokens to each expert.

The experts themselves are ordinary sites of a mixture block (``blocks.{l}.moe.router_logits``,
``.moe.weights``, ``.moe.expert_out``, each with an ``expert`` axis): capture, edit (``experts=[...]``) and
sweep them (``per="expert"``) like any other site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jinterp.core import run


def expert_usage(model, tokens: Int[Array, "batch pos"], *, attention_mask: Bool[Array, "batch pos"] | None = None,
                 edits=()) -> Float[Array, "n_layers n_experts"]:
    """The fraction of (real) tokens the router sends to each expert, per layer: entry ``[l, e]`` is the share
    of tokens whose top k at layer ``l`` includes expert ``e``, so every row sums to k (``n_experts_per_token``).

    ``edits`` apply during the run (e.g. steering, to see how routing moves)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not getattr(cfg, "n_experts", 0):
        raise ValueError("expert_usage needs a mixture-of-experts model (its config has n_experts > 0); "
                         f"got {type(model).__name__} without experts")
    tokens = np.asarray(tokens)
    mask = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    _, cache = run(model, tokens, edits=edits, attention_mask=attention_mask, capture="blocks.*.moe.router_logits")
    logits = cache.stack("moe.router_logits")  # [n_layers, batch, pos, n_experts]
    chosen = jax.lax.top_k(logits.astype(jnp.float32), cfg.n_experts_per_token)[1]  # the softmax's top k
    picked = jax.nn.one_hot(chosen, cfg.n_experts, dtype=jnp.float32).sum(-2)
    real = jnp.asarray(mask, jnp.float32)[None, :, :, None]
    return (picked * real).sum((1, 2)) / real.sum()
