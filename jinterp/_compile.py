"""jinterp's compiled programs: ``eqx.filter_jit`` with XLA options that keep float32 accurate on CPU.

XLA:CPU (jaxlib 0.10) fuses dots, element-wise ops and reductions into YNNPACK kernels whose
float32 rounding is further from exact than its default kernels' (and than PyTorch's): on
SmolLM2-135M the median logit error against a float64 run was 1.5-1.8x larger with them, as large
with the dot fusions alone, and is still 1.16x larger with the layers' split sums
(``models.layers.contract``; benchmarks/numerics.py; README "Numerics").
jinterp compiles its own programs without those fusions, as an option of each compilation: the
process, its environment and any other JAX code are left as they are. A function of yours that
calls jinterp inside your own ``jax.jit`` is compiled with your options; pass
``compiler_options=jinterp.compiler_options()`` to that jit for the same accuracy.
GPU and TPU backends ignore the option. JAX takes compiler options only where a program is compiled
on its own: a jinterp function called while another program is being traced (inside ``jax.jit``,
``eqx.filter_jit``, ``jax.eval_shape``, or another jinterp function) becomes part of that program,
compiled with its options.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

import equinox as eqx

NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}
OPTION_SINCE = ("0.10.",)  # jaxlib series that have this option (an unknown option is a compile error)


@functools.cache
def compiler_options() -> dict[str, str]:
    """The XLA options jinterp compiles with (empty where this jaxlib does not know them)."""
    try:
        return dict(NO_YNNPACK) if version("jaxlib").startswith(OPTION_SINCE) else {}
    except PackageNotFoundError:
        return {}


def jit(fun=None, **options):
    """``eqx.filter_jit`` with ``compiler_options()`` where the call is compiled on its own: every
    compiled jinterp program goes through it."""
    if fun is None:
        return functools.partial(jit, **options)
    plain = eqx.filter_jit(fun, **options)
    accurate = eqx.filter_jit(fun, compiler_options=compiler_options(), **options) if compiler_options() else plain

    @functools.wraps(fun)
    def call(*args, **kwargs):
        return (plain if _inside_a_traced_program() else accurate)(*args, **kwargs)

    return call


def _inside_a_traced_program() -> bool:
    """Whether a jit call now becomes part of a program being traced, and so may not carry compiler
    options: it does unless every trace active is one that compiles it on its own (``vmap``, forward-mode
    ``jvp``, or none at all). ``grad`` (linearize), ``jit`` and ``eval_shape`` stage it."""
    try:
        from jax._src import core
        from jax._src.interpreters import ad, batching

        trace = core.trace_ctx.trace
        while not isinstance(trace, core.EvalTrace):
            if not isinstance(trace, (batching.BatchTrace, ad.JVPTrace)):
                return True
            trace = trace.parent_trace
        return False
    except (ImportError, AttributeError):  # JAX's internals moved: never pass options inside a trace
        return True
