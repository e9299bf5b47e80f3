"""Accurate float32 on CPU: runs at import, before JAX starts its CPU backend.

XLA:CPU (jaxlib 0.10) fuses element-wise operations and dots into YNNPACK kernels whose
float32 rounding is 2-4x further from exact than Eigen's or PyTorch's. Over a 30-layer model
with massive activations that is the difference between logits within 1e-4 of transformers
and not (SmolLM2-135M: 1.5e-4 with them, 0.7e-4 without). jinterp turns those fusions off,
costing up to ~35% CPU speed on large batches, unless you keep them: set
``JINTERP_KEEP_YNNPACK=1`` or pass your own ``--xla_cpu_experimental_ynn_fusion_type`` in
``XLA_FLAGS``. GPU and TPU are unaffected.
"""

from __future__ import annotations

import os
import sys
import warnings

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
TESTED_JAXLIB = ("0.10.",)  # XLA aborts on flags it does not know: only set it where it exists


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):  # private API moved: assume started, warn rather than misbehave
        return True


def prefer_accurate_cpu_float32() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or os.environ.get("JINTERP_KEEP_YNNPACK") == "1":
        return
    try:
        from importlib.metadata import version

        if not version("jaxlib").startswith(TESTED_JAXLIB):
            return
    except Exception:
        return
    if _backend_started():
        warnings.warn("JAX started before jinterp was imported, so XLA:CPU's YNNPACK fusions stay on: float32 "
                      "CPU results may differ from reference implementations by ~2e-4 on deep models. Import "
                      "jinterp before running JAX code, or set JINTERP_KEEP_YNNPACK=1 to silence this.",
                      stacklevel=3)
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
