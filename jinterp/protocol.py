"""The site protocol: what every model implements, so that one ``run``, one sweep, one attribution
and every analysis work on all of them.

A model (jinterp's ``Transformer``; a user's Equinox, Flax linen or nnx network wrapped by
``jinterp.byo.wrap``) is anything that can

- declare its sites: ``site_specs(inputs, **options)`` -> ``{name: SiteSpec}`` in forward order
  (name, kind, layer, shape, dtype, named axes) for those inputs (``jax.ShapeDtypeStruct`` will do);
- apply interventions: ``apply(inputs, interventions, **options)`` -> ``(output, Cache)``, one pure
  call whose ``Cache`` holds what its ``Capture`` interventions recorded.

The rest are optional capabilities with a plain default; a model overrides what it can do better:
checking its inputs, planning captures (the transformer leaves out sites it can derive on access and
derives them in ``complete``), splitting work over a mesh (``on_mesh``), and, for sweeps, resuming a
patched forward from the layer of the patch and from the first position where the two inputs
differ (``reusable_prefix``, ``resume_sites``, ``resumed``).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx

from jinterp.cache import Cache
from jinterp.interventions import Intervention, captures
from jinterp.specs import SiteSpec


class Model(eqx.Module):
    """A model with sites (see the module docstring)."""

    @abc.abstractmethod
    def site_specs(self, inputs=None, **options) -> dict[str, SiteSpec]:
        """Every site, in forward order, for these inputs."""

    @abc.abstractmethod
    def apply(self, inputs, interventions: Sequence[Intervention] = (), **options) -> tuple[Any, Cache]:
        """The output, and a ``Cache`` of what the ``Capture`` interventions recorded."""

    def check_inputs(self, inputs, **options) -> None:
        """Raise a clear error for inputs or options this model cannot take."""
        if options:
            raise TypeError(f"{', '.join(sorted(options))}: options this {type(self).__name__} model does not "
                            f"take (jinterp transformers take attention_mask, token_type_ids, logit_positions)")

    def plan_captures(self, specs: Mapping[str, SiteSpec], names: Sequence[str], edited: frozenset[str]):
        """(Capture interventions recording ``names``, a plan for ``complete``): one capture per kind."""
        return captures(specs, names), None

    def capture_only(self, names: Sequence[str], **options) -> dict:
        """Options for a run whose output is not needed, only the captured ``names`` (default: the same)."""
        return options

    def complete(self, cache: Cache, plan, output, inputs, **options) -> Cache:
        """The cache of a run, with what ``plan`` left for it to derive."""
        return cache

    def on_mesh(self, mesh, inputs, **options):
        """(model, inputs, options) with the batch split over ``mesh``'s data axis."""
        raise TypeError(f"mesh= is not supported for a {type(self).__name__} model; jinterp transformers take it")

    def reusable_prefix(self, clean, corrupted, **options) -> int:
        """How many leading positions of every patched run are the base run's (0: none reused)."""
        return 0

    def resume_sites(self, first: int = 0) -> tuple[str, ...]:
        """Sites of the base run ``resumed`` reads (none: no resuming offered)."""
        return ()

    def resumed(self, inputs, base_cache: Cache, base_output, layer, first: int = 0, **options) -> dict:
        """Options for ``apply`` that recompute only what an edit at ``layer`` (traced; None: no layer)
        or later, at positions ``first`` on, can change, from the base run's ``resume_sites``."""
        return options
