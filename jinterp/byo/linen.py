"""A ``flax.linen`` module as a wrapped model: the output of every submodule call is a site.

Sites are named by module path (``"Dense_0"``, ``"Block_1.attn"``, ``"layers_2"``), found with
``nn.intercept_methods`` while the module is applied, so the module needs no change.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax

from jinterp.byo.wrapped import Wrapped


class Linen(Wrapped):
    """``module.apply(variables, inputs, **apply_kwargs)`` with a site at each submodule's ``__call__``.

    A submodule called again in the same forward (shared weights, a loop) names its later calls
    ``"path:1"``, ``"path:2"``, ...; a call whose output is not a single array is not a site (its
    submodules still are).
    """

    module: nn.Module = eqx.field(static=True)
    variables: dict
    apply_kwargs: tuple[tuple[str, object], ...] = eqx.field(static=True, default=())

    def forward(self, inputs, hook):
        if hook is None:
            return self.module.apply(self.variables, inputs, **dict(self.apply_kwargs))
        calls: dict[str, int] = {}

        def intercept(call, args, kwargs, context):
            output = call(*args, **kwargs)
            path = context.module.path
            if context.method_name != "__call__" or not path or not isinstance(output, jax.Array):
                return output
            name = ".".join(str(part) for part in path)
            count = calls.get(name, 0)
            calls[name] = count + 1
            return hook(name if count == 0 else f"{name}:{count}", output)

        with nn.intercept_methods(intercept):
            return self.module.apply(self.variables, inputs, **dict(self.apply_kwargs))
