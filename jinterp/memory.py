"""How many bytes a forward pass's activations take, and how many sequences fit a memory budget.

One estimate, used by sweeps (``jinterp.patching``), ``jinterp.collect`` and SAE activation
streaming (``jinterp.sae.ModelActivations``). Per sequence of ``seq`` tokens, in the model's dtype:

- the forward's transient working set: the blocks run one layer at a time (``lax.scan``), so one
  layer's intermediates are live at once: residual-stream-sized values, the MLP's hidden
  activations, queries, keys, values and the attention scores and pattern;
- the captured sites: each block kind's capture buffer holds every layer (``[n_layers, ...]``, filled
  as the scan runs) plus, when only some layers are asked for, their gathered copy; sites the cache
  derives on access (``attn.result`` from ``attn.z``) are counted at their full size, an upper bound;
- the logits: ``n_logit_positions x d_vocab``.

A compiled program that returns the captured values one site at a time (``jinterp.collect``) adds
their copies: ``values_bytes``.

It is a rough upper bound, not an exact count of XLA's buffers: a budget is met with some margin.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jinterp import names as S


def itemsize(cfg) -> int:
    """Bytes per activation value: the model's dtype."""
    return jnp.dtype(cfg.dtype).itemsize


def working_set_bytes(cfg, seq: int) -> int:
    """One sequence's transient working set for one layer of the forward."""
    per_position = 10 * cfg.d_model + 4 * cfg.d_mlp + 3 * cfg.n_heads * (cfg.d_head + seq)
    return seq * per_position * itemsize(cfg)


def values_bytes(cfg, names, seq: int) -> int:
    """One sequence's values of concrete site names, each once (what a program returning them outputs)."""
    values = sum(math.prod(S.site_shape(cfg, S.parse(name).kind, 1, seq)) for name in dict.fromkeys(names))
    return values * itemsize(cfg)


def capture_bytes(cfg, names, seq: int) -> int:
    """One sequence's captured values for concrete site names (``blocks.3.resid_post``, ``logits``)."""
    layers_by_kind: dict[str, set] = {}
    for name in names:
        site = S.parse(name)
        layers_by_kind.setdefault(site.kind, set()).add(site.layer)
    total = 0
    for kind, layers in layers_by_kind.items():
        values = math.prod(S.site_shape(cfg, kind, 1, seq))
        if kind in S.BLOCK_KINDS:  # the [n_layers, ...] buffer, plus the gathered copy of some layers
            values *= cfg.n_layers + (len(layers) if len(layers) < cfg.n_layers else 0)
        total += values
    return total * itemsize(cfg)


def sequence_bytes(cfg, seq: int, capture=(), n_logit_positions: int | None = None) -> int:
    """One sequence's activations in a forward that captures ``capture`` (concrete site names) and
    unembeds ``n_logit_positions`` positions (None: all ``seq``)."""
    logits = (seq if n_logit_positions is None else n_logit_positions) * cfg.d_vocab if cfg.unembed else 0
    return working_set_bytes(cfg, seq) + capture_bytes(cfg, capture, seq) + logits * itemsize(cfg)


def how_many_fit(budget: float, each: int, *, unit: str = "sequence", hint: str = "", reserved: int = 0,
                 reserved_for: str = "") -> int:
    """How many items of ``each`` bytes fit ``budget`` bytes, less ``reserved`` bytes taken by
    ``reserved_for``; a ValueError if not even one does."""
    if not budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {budget!r}")
    fits = int((budget - reserved) // each)
    if fits < 1:
        after = f" after {reserved:,} bytes for {reserved_for}," if reserved else ""
        raise ValueError(f"memory_budget={budget:,.0f} bytes ({budget / 2**20:.1f} MiB) is too small:{after} one "
                         f"{unit} needs about {each:,} bytes ({each / 2**20:.1f} MiB) of activations. Raise "
                         f"memory_budget{' or ' + hint if hint else ''}.")
    return fits
