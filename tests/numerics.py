"""The tests' numerics referee (tests/README.md): jinterp's own forward in float64 on the same weights,
and the check that holds jinterp's float32 result and a reference library's float32 result to it.

Set JINTERP_TEST_MEASURE=file.jsonl to append every refereed comparison's measured errors to that
file: how the bounds in the tests were measured, and how to re-measure them.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import jinterp

EPS32 = float(np.finfo(np.float32).eps)
RATIO = 1.5  # jinterp's float32 RMS error over the reference's: measured at most 1.10 (tests/README.md)


def float64(model):
    """``model`` with float64 parameters: use it, and what it computes, inside ``jax.enable_x64(True)``."""
    return model.astype(jnp.float64)


def run64(model, tokens, **options):
    """``jinterp.run`` of ``model`` in float64 (JAX's x64 mode, for this call only), in numpy: the output and
    {site: value}, keyed by jinterp's site names and by each name given in ``capture`` (aliases too)."""
    with jax.enable_x64(True):
        output, cache = jinterp.run(float64(model), tokens, **options)
        assert output.dtype == np.float64
        values = {name: np.asarray(value) for name, value in cache.items()}
        capture = options.get("capture", ())
        for name in [capture] if isinstance(capture, str) else capture:
            if "*" not in name and name != "all":
                values[name] = np.asarray(cache[name])  # computed on access: inside x64 mode
        return np.asarray(output), values


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def max_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64)).max(initial=0.0))


def assert_refereed(ours, theirs, exact, *, bound: float, ratio: float | None = RATIO, what: str = ""):
    """Policy (c): jinterp's float32 ``ours`` lies within ``bound`` of the float64 run ``exact`` (max
    error), and its RMS error is at most ``ratio`` times that of the reference library's float32 ``theirs``
    (``ratio=None``: the bound only, for a small array whose RMS is itself noisy; pool those instead).

    The RMS of many rounding errors is stable where their maximum is one draw, so the two libraries'
    float32 rounding is compared by it. No float32 result can be asked to sit nearer than one rounding of
    the values: the reference's RMS error counts as at least ``EPS32 * rms(exact)``.
    """
    ours, theirs, exact = (np.asarray(a, np.float64) for a in (ours, theirs, exact))
    error = max_error(ours, exact)
    ours_rms, theirs_rms = rms(ours - exact), max(rms(theirs - exact), EPS32 * rms(exact))
    if os.environ.get("JINTERP_TEST_MEASURE"):
        with open(os.environ["JINTERP_TEST_MEASURE"], "a") as log:
            log.write(json.dumps({"what": what, "error": error, "bound": float(bound), "reference_error":
                                  max_error(theirs, exact), "rms_ratio": ours_rms / theirs_rms}) + "\n")
    assert error <= bound, f"{what}: float32 is {error:.3g} from the float64 run (bound {bound:.3g})"
    assert ratio is None or ours_rms <= ratio * theirs_rms, (
        f"{what}: RMS error against float64 {ours_rms:.3g}, the reference's own {theirs_rms:.3g}: "
        f"over {ratio}x the reference's float32 error")
