"""How well an SAE stands in for the activations it reads, measured in the model's own loss, and
which latents a metric depends on.

    losses = splice_losses(model, sae, tokens)          # clean / spliced / zero-ablated next-token loss
    losses.ce_loss_recovered                            # 1: as good as the model, 0: as bad as zeroing the site
    scores = feature_attribution(model, tokens, sae, metric)   # [batch, pos, d_sae]

The cross-entropy loss recovered (Bricken et al. 2023; SAELens' ``ce_loss_score``) compares the
model's next-token loss with the site replaced by the SAE's reconstruction (the error term
dropped) against the clean loss and against the loss with the site zeroed:
``(zero_ablated - spliced) / (zero_ablated - clean)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from jinterp import interventions as iv
from jinterp._compile import jit
from jinterp.core import run
from jinterp.sae.autoencoder import SAE
from jinterp.sae.splice import SAESplice


def next_token_loss(logits: Float[Array, "batch seq vocab"], tokens: Int[Array, "batch seq"],
                    weights: Array | None = None) -> tuple[Array, Array]:
    """The summed cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``, each
    prediction weighted by ``weights [batch, seq - 1]`` (default 1), and the summed weights."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    losses = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
    weights = jnp.ones_like(losses) if weights is None else jnp.asarray(weights, losses.dtype)
    return jnp.sum(losses * weights), jnp.sum(weights)


@dataclasses.dataclass(frozen=True)
class SpliceLosses:
    """Mean next-token losses (nats) of the clean model, with the SAE's reconstruction spliced in
    (error dropped), and with the site zeroed; ``tokens`` predictions were averaged."""

    clean: float
    spliced: float
    zero_ablated: float
    tokens: int

    @property
    def ce_loss_recovered(self) -> float:
        """``(zero_ablated - spliced) / (zero_ablated - clean)``: 1 when splicing costs nothing."""
        return (self.zero_ablated - self.spliced) / (self.zero_ablated - self.clean)

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "ce_loss_recovered": self.ce_loss_recovered}


@jit
def _batch_losses(model, sae: SAE, site: str, tokens, attention_mask, positions):
    real = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    edited = real if positions is None else real & jnp.zeros(tokens.shape[1], bool).at[positions].set(True)
    weights = edited[:, :-1] & real[:, 1:]  # predictions made from edited positions, of real tokens
    edits = ([], [SAESplice(site, sae, keep_error=False, positions=positions)], [iv.Zero(site, positions=positions)])
    sums = [next_token_loss(run(model, tokens, edits=e, attention_mask=attention_mask)[0], tokens, weights)[0]
            for e in edits]
    return jnp.stack(sums), weights.sum()


def splice_losses(model, sae: SAE, tokens: Int[Array, "n seq"], *, site: str | None = None, batch_size: int = 8,
                  attention_mask=None, skip: int = 0, progress: bool = True) -> SpliceLosses:
    """Next-token losses on ``tokens`` (``batch_size`` sequences per forward) clean, with ``sae``
    spliced in at ``site`` (default ``sae.site``; a transcoder's ``target_site``) without its error
    term, and with the site zeroed.

    ``skip``: leave the first ``skip`` positions alone in both edits and do not count the
    predictions made from them (e.g. 1 when the SAE was trained without the BOS position, whose
    activations are outliers). ``attention_mask`` (``[n, seq]``, 1 at real tokens): padded
    positions are not counted."""
    site = site if site is not None else (sae.target_site or sae.site)  # a transcoder replaces its target
    if site is None:
        raise ValueError("splice_losses needs a site: pass one, or train/load the SAE with site=...")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not 0 <= skip < tokens.shape[1] - 1:
        raise ValueError(f"tokens must be [n, seq] with seq > skip + 1 = {skip + 1}, got shape {tokens.shape}")
    if attention_mask is not None and np.shape(attention_mask) != tokens.shape:
        raise ValueError(f"attention_mask has shape {np.shape(attention_mask)}; tokens have {tokens.shape}")
    positions = np.arange(skip, tokens.shape[1]) if skip else None
    sums, count = np.zeros(3), 0.0
    for start in tqdm(range(0, len(tokens), batch_size), desc="CE loss recovered", unit="batch", disable=not progress):
        mask = None if attention_mask is None else jnp.asarray(attention_mask[start:start + batch_size])
        batch_sums, batch_count = _batch_losses(model, sae, site, jnp.asarray(tokens[start:start + batch_size]),
                                                mask, positions)
        sums, count = sums + np.asarray(batch_sums, np.float64), count + float(batch_count)
    clean, spliced, zeroed = sums / count
    return SpliceLosses(float(clean), float(spliced), float(zeroed), int(count))


def feature_attribution(model, tokens: Int[Array, "batch seq"], sae: SAE, metric: Callable[[Array], Array], *,
                        site: str | None = None, attention_mask=None) -> Float[Array, "batch seq d_sae"]:
    """Attribution patching over an SAE's latents: ``latent * d metric / d latent`` at every
    position, with the SAE spliced in at ``site`` (error kept, so the forward is the model's own).
    Minus it estimates, to first order, the change of ``metric(logits)`` (a scalar) when that
    latent is ablated at that position; one forward and one backward in all. A transcoder's latents
    are read from its input site and spliced at its ``target_site``."""
    site = site if site is not None else (sae.target_site or sae.site)
    if site is None:
        raise ValueError("feature_attribution needs a site: pass one, or train/load the SAE with site=...")
    tokens = jnp.asarray(tokens)
    splice = SAESplice(site, sae, shift=jnp.zeros((*tokens.shape, sae.d_sae)))
    read = sae.site if sae.is_transcoder else site  # the latents come from what the dictionary reads
    return _feature_attribution(model, tokens, read, splice, metric, attention_mask)


@jit
def _feature_attribution(model, tokens, read: str, splice: SAESplice, metric, attention_mask):
    def measured(shift):
        edits = [iv.Capture(read), eqx.tree_at(lambda s: s.shift, splice, shift)]  # capture before the splice
        logits, cache = run(model, tokens, edits=edits, attention_mask=attention_mask)
        return metric(logits), cache[read]

    gradient, value = jax.grad(measured, has_aux=True)(splice.shift)
    return splice.sae.encode(value.reshape(*value.shape[:2], -1)) * gradient
