"""How many bytes a run's activations take, and how many runs fit a memory budget: from the model's
site specs, so one estimate serves every model.

One estimate, used by sweeps (``jinterp.patching``), ``jinterp.collect`` and SAE activation
streaming (``jinterp.sae.ModelActivations``). For a run at the inputs the specs were declared for:

- the forward's transient working set: every site the plain forward computes outside the layers
  (embeddings, logits, ...) plus one layer's sites (jinterp's transformer runs its blocks one at a
  time with ``lax.scan``; a model without a scan frees each value once it is used): the residual
  stream, queries, keys, values, the MLP's activations, and the attention scores and pattern of
  one chunk of queries (``SiteSpec.held``);
- the captured sites: a kind captured at several layers is written into one ``[n_layers, ...]``
  buffer as the scan runs, plus, when only some layers are asked for, their gathered copy; sites
  the cache derives on access are counted at their full size, an upper bound.

A compiled program that returns the captured values one site at a time (``jinterp.collect``) adds
their copies: ``values_bytes``. It is a rough upper bound, not an exact count of XLA's buffers: a
budget is met with some margin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from jinterp.specs import SiteSpec, Specs, of_kind


def nbytes(spec: SiteSpec) -> int:
    return math.prod(spec.shape) * np.dtype(spec.dtype).itemsize


def working_set_bytes(specs: Specs) -> int:
    """The plain forward's transient working set: the sites outside the layers and one layer's, each
    as much of it as the forward holds at once."""
    per_layer: dict[int, float] = {}
    for spec in specs.values():
        if spec.layer is not None:
            per_layer[spec.layer] = per_layer.get(spec.layer, 0) + nbytes(spec) * spec.held
    top = sum(nbytes(spec) * spec.held for spec in specs.values() if spec.layer is None)
    return math.ceil(top + max(per_layer.values(), default=0))


def values_bytes(specs: Specs, names: Iterable[str]) -> int:
    """The values of these sites, each once (what a program returning them outputs)."""
    return sum(nbytes(specs[name]) for name in dict.fromkeys(names))


def capture_bytes(specs: Specs, names: Iterable[str]) -> int:
    """The captured values of these sites: a kind's ``[n_layers, ...]`` buffer, plus the gathered copy
    when only some of its layers are asked for."""
    asked: dict[str, set] = {}
    for name in names:
        asked.setdefault(specs[name].kind, set()).add(name)
    total = 0
    for kind, chosen in asked.items():
        every = [spec for spec in of_kind(specs, kind) if spec.layer is not None]
        if every and len({spec.shape for spec in every}) == 1:  # one buffer over every layer, filled by the scan
            total += len(every) * nbytes(every[0]) + (values_bytes(specs, chosen) if len(chosen) < len(every) else 0)
        else:
            total += values_bytes(specs, chosen)
    return total


def run_bytes(specs: Specs, capture: Iterable[str] = ()) -> int:
    """A run's activations at the inputs of ``specs``, capturing the sites ``capture`` (concrete names)."""
    return working_set_bytes(specs) + capture_bytes(specs, capture)


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
