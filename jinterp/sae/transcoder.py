"""Transcoders: sparse dictionaries that stand in for an MLP (Dunefsky et al. 2024; the per-layer
transcoders of circuit tracing, Ameisen et al. 2025).

    source = transcoder_activations(model, tokens, layer=3, sequences_per_batch=8)
    trained = train_sae(source, "topk", 4096, k=32)          # predicts blocks.3.mlp_out
    splice = SAESplice(None, trained.sae, keep_error=False)  # the MLP replaced by the transcoder

A transcoder is an ``SAE`` whose decoder predicts another site than the one it reads
(``target_site``, ``d_out``), trained by ``train_sae`` on (input, target) pairs and spliced by
``SAESplice``: this file only says which sites an MLP's transcoder reads and writes.

It reads the MLP's own input after the norm, ``blocks.L.ln2.normalized``, as Dunefsky et al. do
(TransformerLens' ``ln2.hook_normalized``), rather than the residual stream before the norm
(``resid_mid``, which some of circuit-tracer's transcoder sets read): the MLP is a function of its
normalised input alone, so a transcoder reading it only has the MLP to learn, not the norm's
division by each token's scale, which no linear encoder can express. The norm's weights and bias
are a fixed affine map, which the encoder absorbs. Attribution through the norm then treats its
scale as a constant, as circuit tracing does anyway. A model without norms reads ``mlp_in``.
"""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Int

from jinterp.models.declaration import kinds
from jinterp.sae.sources import ModelActivations


def mlp_sites(cfg, layer: int) -> tuple[str, str]:
    """``(reads, writes)``: the sites a transcoder of layer ``layer``'s MLP reads and predicts, e.g.
    ``("blocks.3.ln2.normalized", "blocks.3.mlp_out")``."""
    if not cfg.has_mlp:
        raise ValueError("This model has no MLPs (attention-only), so no MLP transcoders")
    if not isinstance(layer, int) or not 0 <= layer < cfg.n_layers:
        raise ValueError(f"layer must be an int in [0, {cfg.n_layers - 1}] for this {cfg.n_layers}-layer model, "
                         f"got {layer!r}")
    block = kinds(cfg).block
    # Post-norm blocks (BERT) feed the MLP ln1's output; pre-norm ones ln2's.
    norm = "ln1.normalized" if cfg.norm_placement == "post" else "ln2.normalized"
    reads = norm if norm in block else "mlp_in"
    return f"blocks.{layer}.{reads}", f"blocks.{layer}.mlp_out"


def transcoder_activations(model: eqx.Module, tokens: Int[Array, "n_seq seq"], layer: int, *,
                           sequences_per_batch: int, skip: int = 0, seed: int = 0) -> ModelActivations:
    """The (MLP input, MLP output) pairs of ``model``'s layer ``layer`` on ``tokens``, computed on
    the fly (a ``ModelActivations`` with a ``target_site``; see there for the arguments)."""
    reads, writes = mlp_sites(model.cfg, layer)
    return ModelActivations(model, tokens, reads, sequences_per_batch, skip=skip, seed=seed, target_site=writes)
