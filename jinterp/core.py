"""One run of any model with captures and edits, written once against the site protocol.

``run`` is what users call: names in any spelling are matched against the model's site specs,
edits are checked against them, and the model's ``apply`` runs compiled. ``apply`` is the same
compiled call without the checks or the name matching: what sweeps, attribution, generation and
every analysis call inside their own programs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jinterp import interventions as iv
from jinterp import names as S
from jinterp import recipes
from jinterp._compile import jit
from jinterp.cache import Cache
from jinterp.protocol import Model
from jinterp.specs import Specs, match, of_kind, unknown_site


@jit
def apply(model: Model, inputs, interventions: Sequence[iv.Intervention] = (), **options):
    """``model.apply(inputs, interventions, **options)`` compiled: ``(output, Cache)``. Nothing is
    checked here (``run`` checks); call it inside your own jitted, vmapped or differentiated code."""
    return model.apply(inputs, iv.flatten(interventions), **options)


def sites(model: Model, inputs=None, **options) -> Specs:
    """Every site of ``model`` by name, in forward order: its ``SiteSpec`` (kind, layer, shape, dtype,
    named axes) for these inputs. A jinterp transformer lists symbolic batch and sequence sizes
    without inputs; a wrapped model needs them (arrays or ``jax.ShapeDtypeStruct``)."""
    return model.site_specs(inputs, **options)


def validate(specs: Specs, interventions: Sequence[iv.Intervention]) -> None:
    """A clear error for an intervention at a site the model lacks or that does not fit its sites."""
    for intervention in interventions:
        for kind in intervention.kinds():
            if not of_kind(specs, kind):
                raise unknown_site(_spelled(intervention, kind), specs)
        intervention.check([spec for spec in specs.values() if spec.kind in intervention.kinds()])  # forward order


def run(model: Model, inputs, *, capture=(), edits=(), mesh=None, check: bool = False, **options):
    """Run ``model`` on ``inputs`` with ``edits`` applied, recording the ``capture`` sites.

    Args:
        model: a ``jinterp.Transformer``, or a model from ``jinterp.byo.wrap``.
        inputs: a transformer's int token ids ``[batch, seq]``; a wrapped model's own inputs.
        capture: site names to record (any accepted spelling; ``"blocks.*.attn.pattern"`` for
            every layer; ``"all"`` for every site). Captured values are the values the forward
            continues with, i.e. after this run's edits at that site.
        edits: an intervention or a list of them (``Replace``, ``Add``, ``Scale``, ``Zero``, ...),
            applied in order at their sites; or the path of a recipe saved by ``jinterp.save_edits``
            (loaded for this model: one made for other weights is refused, see ``jinterp.recipes``).
        mesh: a ``jax.sharding.Mesh`` (``jinterp.sharding.mesh()``), for models that can split their
            batch over its ``"data"`` axis (jinterp transformers; weights replicated unless
            ``jinterp.sharding.shard_model`` split them).
        check: raise ``FloatingPointError`` naming the operation that made a NaN, or the output or
            captured site that holds a NaN or inf (see ``jinterp.checks``); slower.
        options: the model's own, for a transformer ``attention_mask`` (``[batch, seq]``, 1 for real
            tokens, 0 for padding, left or right: real tokens get the results of the unpadded
            sequence), ``token_type_ids`` (BERT) and ``logit_positions`` (unembed only these positions,
            ``[n]`` or ``[batch, n]``, negative from the end: logits ``[batch, n, d_vocab]``).

    Returns ``(output, cache)``: the model's output and a ``Cache`` of the captured values.
    """
    model.check_inputs(inputs, **options)
    specs = model.site_specs(inputs, **options)
    edits = iv.flatten(recipes.expand(edits, model, specs))
    validate(specs, edits)
    edited = frozenset(kind for edit in edits for kind in edit.kinds())
    captures, plan = model.plan_captures(specs, match(specs, capture), edited)
    placed = (model, inputs, options) if mesh is None else model.on_mesh(mesh, inputs, **options)
    compiled_model, compiled_inputs, compiled_options = placed
    if check:
        from jinterp.checks import checked

        output, cache = checked(apply, compiled_model, compiled_inputs, edits + captures, **compiled_options)
    else:
        output, cache = apply(compiled_model, compiled_inputs, edits + captures, **compiled_options)
    return output, model.complete(cache, plan, output, inputs, **options)


def _spelled(intervention: iv.Intervention, kind: str) -> str:
    """The site an intervention names, spelled back from its kind and layers."""
    layers = getattr(intervention, "layers", None)
    if layers is None or not iv.concrete(layers):
        return kind if layers is None else S.site_name(kind, "*")
    layers = [int(x) for x in np.asarray(layers).ravel()]
    return S.site_name(kind, layers[0]) if len(layers) == 1 else f"{S.site_name(kind, '*')} at layers {layers}"


__all__ = ["Cache", "apply", "run", "sites", "validate"]
