"""Bring your own model: Equinox, Flax linen and Flax nnx networks get jinterp's sites.

``wrap`` adapts a model to the site protocol (``jinterp.protocol.Model``): ``jinterp.run``,
``jinterp.sites``, ``jinterp.collect``, ``patching.sweep`` and ``attribution.attribution_patching``
then take it like a ``Transformer``, with the same interventions, applied by the same ``SiteHook``.
This package holds only the adapters.
"""

from __future__ import annotations

from jinterp.byo.wrapped import Wrapped, scope, site
from jinterp.protocol import Model


def wrap(model, variables=None, *, axes=None, call=None, **apply_kwargs) -> Wrapped:
    """A wrapped model whose sites ``jinterp.run`` & co. can capture and edit.

    Args:
        model: an ``eqx.Module`` that marks its sites with ``jinterp.site(name, value, hook)``
            (called as ``model(inputs, hook=hook)``, or ``call(model, inputs, hook)``); a
            ``flax.linen`` module (with its ``variables``; ``apply_kwargs`` go to ``apply``); or a
            ``flax.nnx`` module (its state is taken now). Flax submodule outputs are sites named
            by module path.
        axes: ``{site name or glob: axis names}`` for sites whose axes are not the defaults by
            rank: ``(batch, d)``, ``(batch, pos, d)``, ``(batch, height, width, channel)``.
            ``positions=`` acts on the ``pos`` axis, ``heads=`` on ``head``.
    """
    axes = tuple((pattern, tuple(names)) for pattern, names in (axes or {}).items())
    if isinstance(model, Model):  # a jinterp transformer, or a model wrapped already
        raise TypeError(f"{type(model).__name__} implements jinterp's site protocol already "
                        f"(jinterp.protocol.Model): pass it to jinterp.run & co. as it is")
    import equinox as eqx

    if isinstance(model, eqx.Module):
        _no_extra(model, variables=variables, **apply_kwargs)
        from jinterp.byo.equinox import Equinox

        return Equinox(model, axes=axes) if call is None else Equinox(model, call, axes=axes)
    from flax import linen, nnx

    if isinstance(model, linen.Module):
        if variables is None:
            raise ValueError("A flax.linen module needs its variables: jinterp.byo.wrap(module, variables)")
        _no_extra(model, call=call)
        try:  # the module is static under jit: it must hash
            hash((model, tuple(sorted(apply_kwargs.items()))))
        except TypeError as error:
            raise TypeError(f"The linen module and apply_kwargs must be hashable (static under jit): {error}. Use "
                            f"tuples, not lists, in module attributes; pass arrays through the variables") from None
        from jinterp.byo.linen import Linen

        return Linen(model, variables, tuple(sorted(apply_kwargs.items())), axes=axes)
    if isinstance(model, nnx.Module):
        _no_extra(model, variables=variables, call=call, **apply_kwargs)
        from jinterp.byo.nnx import NNX

        return NNX.of(model, axes=axes)
    raise TypeError(f"Cannot wrap a {type(model).__name__}: jinterp.byo.wrap takes an equinox.Module, a "
                    f"flax.linen.Module (with variables) or a flax.nnx.Module")


def _no_extra(model, **given) -> None:
    extra = sorted(name for name, value in given.items() if value is not None)
    if extra:
        raise TypeError(f"wrap() of a {type(model).__name__}: {', '.join(extra)} do not apply to this kind of model")


__all__ = ["Wrapped", "scope", "site", "wrap"]
