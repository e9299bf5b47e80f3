"""Opt-in NaN/inf checking of a forward pass: ``jinterp.run(model, tokens, check=True)``.

The compiled forward runs under ``jax.experimental.checkify`` with its float checks, so the first
operation that makes a NaN (or divides by zero) is reported by its primitive (checkify gives no
source location inside these jitted programs); then the output and every captured value are
checked for NaN and inf, by site name. Off by
default: the checks add work to every operation of the compiled program.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jinterp._compile import jit


@jit
def _checkified(forward, args, kwargs):
    return checkify.checkify(lambda: forward(*args, **kwargs), errors=checkify.float_checks)()


def checked(forward, *args, **kwargs):
    """``forward(*args, **kwargs)`` (a jitted ``(output, cache)`` function); raises ``FloatingPointError``
    on the first NaN made inside it, or on any NaN or inf in what it returns."""
    error, (output, cache) = _checkified(forward, args, kwargs)
    if message := error.get():
        raise FloatingPointError(f"jinterp.run(check=True): {message.splitlines()[0]}")
    for name, value in [("output", output), *((site, cache[site]) for site in cache)]:
        finite = np.asarray(jnp.isfinite(value))
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise FloatingPointError(f"jinterp.run(check=True): {name} has {int((~finite).sum())} non-finite "
                                     f"values of {finite.size} (the first at index {first})")
    return output, cache
