"""Your own Equinox module as a wrapped model: its ``jinterp.site(...)`` calls are the sites."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx

from jinterp.byo.wrapped import Wrapped


def _call_with_hook(module, inputs, hook):
    return module(inputs, hook=hook)


class Equinox(Wrapped):
    """An ``eqx.Module`` whose forward takes the hook and marks its sites with ``jinterp.site``::

        class MLP(eqx.Module):
            hidden: eqx.nn.Linear
            out: eqx.nn.Linear

            def __call__(self, x, hook=None):          # x: [batch, d_in]
                h = jinterp.site("hidden", jax.nn.relu(jax.vmap(self.hidden)(x)), hook)
                return jax.vmap(self.out)(h)

    ``call(module, inputs, hook)`` says how to call it (default ``module(inputs, hook=hook)``).
    """

    module: eqx.Module
    call: Callable = eqx.field(static=True, default=_call_with_hook)

    def forward(self, inputs, hook):
        return self.call(self.module, inputs, hook)
