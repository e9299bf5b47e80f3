"""Declared sizes checked against the file before anything is allocated.

A config or GGUF header can declare any size (``hidden_size = 2**40``); ``Config`` and the
converters allocate from it. Every parameter comes from a value stored in the file, so no size
may exceed the values the weight files can hold (``check_counts``, on the raw numbers, before a
``Config`` exists), and a model that needs more parameters than the files hold values is refused
before its arrays are allocated (``check_fits``).
"""

from __future__ import annotations

import math

from jinterp.loading.errors import LoadError
from jinterp.models import flat
from jinterp.models.config import Config

SLACK = 1 << 20  # values a converter may derive rather than read (none today); 4 MiB of float32


def check_counts(path, bound: int, counts: dict) -> None:
    """Each declared count must be a non-negative int no larger than ``bound`` (the most values the
    weight files could hold); ``None`` (not declared) passes."""
    for name, value in counts.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise LoadError(path, f"{name} must be a non-negative integer, got {value!r}")
        if value > bound:
            raise LoadError(path, f"{name}={value:,} is larger than the weight files could hold "
                                  f"(at most {bound:,} values): a declared size is wrong")


def parameter_count(cfg: Config, path) -> int:
    """How many float parameters ``cfg`` implies (computed from shapes alone, nothing allocated)."""
    sizes = {"d_mlp": cfg.d_mlp, "n_kv_heads": cfg.n_kv_heads, "rotary_dim": cfg.rotary_dim}
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise LoadError(path, f"{name} must be a non-negative integer, got {value!r}")
    try:
        return sum(math.prod(shape) for shape in flat.shapes(cfg).values())
    except (TypeError, ValueError, OverflowError) as error:
        raise LoadError(path, f"the declared sizes give no valid model ({error})") from None


def check_fits(cfg: Config, stored_values: int, path) -> None:
    """Refuse a config whose parameters outnumber the ``stored_values`` the weight files hold."""
    needed = parameter_count(cfg, path)
    if needed > stored_values + SLACK:
        raise LoadError(path, f"the declared sizes (d_model={cfg.d_model}, n_layers={cfg.n_layers}, "
                              f"d_mlp={cfg.d_mlp}, d_vocab={cfg.d_vocab}, ...) imply {needed:,} parameters, "
                              f"but the weights hold only {stored_values:,} values: a declared size is wrong")
