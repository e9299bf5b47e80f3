"""Sparse autoencoders, transcoders and crosscoders: the ``SAE`` module (relu, topk, batchtopk,
jumprelu), training through the one loop (from arrays or streamed from a model through a shuffle
buffer), SAELens and Gemma Scope files, crosscoders over several models' activations (model
diffing), feature dashboards and their Neuronpedia export, splicing into a model's forward as an
intervention, the loss recovered, feature attribution, and circuit-tracer's attribution graphs."""

from jinterp.sae.autoencoder import ARCHITECTURES, SAE, batch_topk, geometric_median, jumprelu, step, topk
from jinterp.sae.crosscoder import (
    Crosscoder,
    CrosscoderActivations,
    LatentScaling,
    TrainedCrosscoder,
    latent_scaling,
    load_crosscoder,
    relative_norm_classes,
    relative_norm_histogram,
    save_crosscoder,
    train_crosscoder,
)
from jinterp.sae.dashboard import LatentCard, dashboard, latent_cards
from jinterp.sae.evaluation import SpliceLosses, feature_attribution, next_token_loss, splice_losses
from jinterp.sae.graph import AttributionGraph, Pruned, attribution_graph, prune_graph
from jinterp.sae.neuronpedia import export_neuronpedia, read_neuronpedia
from jinterp.sae.saving import load_gemma_scope, load_saelens, save_gemma_scope, save_saelens
from jinterp.sae.sources import ArrayActivations, ModelActivations, ShuffleBuffer
from jinterp.sae.splice import SAESplice
from jinterp.sae.training import SAEState, TrainedSAE, aux_k_loss, least_squares_encoder, train_sae
from jinterp.sae.transcoder import mlp_sites, transcoder_activations

__all__ = [
    "ARCHITECTURES", "ArrayActivations", "AttributionGraph", "Crosscoder", "CrosscoderActivations", "LatentCard",
    "LatentScaling", "ModelActivations", "Pruned", "SAE", "SAESplice", "SAEState", "ShuffleBuffer", "SpliceLosses",
    "TrainedCrosscoder", "TrainedSAE", "attribution_graph", "aux_k_loss", "batch_topk", "dashboard",
    "export_neuronpedia", "feature_attribution", "geometric_median", "jumprelu", "latent_cards", "latent_scaling",
    "least_squares_encoder", "load_crosscoder", "load_gemma_scope", "load_saelens", "mlp_sites", "next_token_loss",
    "prune_graph", "read_neuronpedia", "relative_norm_classes", "relative_norm_histogram", "save_crosscoder",
    "save_gemma_scope", "save_saelens", "splice_losses", "step", "topk", "train_crosscoder", "train_sae",
    "transcoder_activations"
]
