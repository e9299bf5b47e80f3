"""A ``flax.nnx`` module as a wrapped model: the output of every submodule call is a site.

Sites are named by module path (``"linear1"``, ``"blocks.0.attn"``), as ``nnx.iter_modules``
gives them. The wrapper holds the module split into its graph definition and its state (a
pytree), so it jits, vmaps and differentiates like any Equinox module.
"""

from __future__ import annotations

import contextlib
import functools

import equinox as eqx
import jax
from flax import nnx

from jinterp.byo.wrapped import Wrapped


class NNX(Wrapped):
    """``nnx.merge(graphdef, state)(inputs)`` with a site at each submodule's ``__call__``.

    A submodule called again in the same forward names its later calls ``"path:1"``, ...; a call
    whose output is not a single array is not a site (its submodules still are).
    """

    graphdef: nnx.GraphDef = eqx.field(static=True)
    state: nnx.State

    @classmethod
    def of(cls, module: nnx.Module, axes=()) -> NNX:
        return cls(*nnx.split(module), axes=axes)  # (graphdef, state)

    def forward(self, inputs, hook):
        module = nnx.merge(self.graphdef, self.state)
        if hook is None:
            return module(inputs)
        paths = {id(m): ".".join(str(p) for p in path) for path, m in nnx.iter_modules(module) if path}
        with _hooked_calls(module, paths, hook):
            return module(inputs)


@contextlib.contextmanager
def _hooked_calls(module, paths: dict[int, str], hook):
    """While tracing the forward, route the ``__call__`` of every submodule through the hook.

    nnx has no interception API for editing outputs; like ``nnx.capture(method_outputs=...)`` this
    patches the submodules' classes for the duration of the call (trace time only) and restores them.
    """
    classes = {type(m) for _, m in nnx.iter_modules(module) if callable(m)}
    originals = {cls: (cls.__dict__.get("__call__"), cls.__call__) for cls in classes}
    calls: dict[str, int] = {}

    def hooked(call):
        @functools.wraps(call)
        def wrapper(self, *args, **kwargs):
            output = call(self, *args, **kwargs)
            name = paths.get(id(self))
            if name is None or not isinstance(output, jax.Array):
                return output
            count = calls.get(name, 0)
            calls[name] = count + 1
            return hook(name if count == 0 else f"{name}:{count}", output)
        return wrapper

    try:
        for cls, (_, call) in originals.items():
            cls.__call__ = hooked(call)
        yield
    finally:
        for cls, (own, _) in originals.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
