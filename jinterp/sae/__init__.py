"""Sparse autoencoders: the ``SAE`` module (relu, topk, batchtopk, jumprelu), training through the
one loop, SAELens and Gemma Scope files, and splicing into a model's forward as an intervention."""

from jinterp.sae.autoencoder import ARCHITECTURES, SAE, batch_topk, geometric_median, jumprelu, step, topk
from jinterp.sae.evaluation import SpliceLosses, feature_attribution, next_token_loss, splice_losses
from jinterp.sae.saving import load_gemma_scope, load_saelens, save_gemma_scope, save_saelens
from jinterp.sae.sources import ArrayActivations, ModelActivations
from jinterp.sae.splice import SAESplice
from jinterp.sae.training import SAEState, TrainedSAE, aux_k_loss, train_sae

__all__ = ["ARCHITECTURES", "SAE", "ArrayActivations", "ModelActivations", "SAESplice", "SAEState", "SpliceLosses",
           "TrainedSAE", "aux_k_loss", "batch_topk", "feature_attribution", "geometric_median", "jumprelu",
           "load_gemma_scope", "load_saelens", "next_token_loss", "save_gemma_scope", "save_saelens",
           "splice_losses", "step", "topk", "train_sae"]
