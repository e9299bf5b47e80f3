"""Splicing an SAE into the forward pass as an intervention.

    splice = SAESplice("blocks.3.resid_post", sae)              # forward unchanged (error kept)
    splice = SAESplice("blocks.3.resid_post", sae, keep_error=False)  # the reconstruction only
    logits, cache = jinterp.run(model, tokens, edits=[splice.clamp([17], 8.0)])

At its site the splice encodes the value ``x`` into latents ``f``, edits them to
``f * scale + shift`` (``ablate``, ``clamp`` and ``steer`` set those two arrays), and continues with
``decode(f * scale + shift)``, plus, with ``keep_error=True``, the error ``x - decode(f)`` of the
unedited latents (so an unedited splice leaves the forward as it was, to float rounding). As in
SAELens, the error term is a constant for gradients (``stop_gradient``): derivatives reach the
layers below through the latents only. ``scale`` and ``shift`` are array leaves, so
``jax.grad`` with respect to ``shift`` at 0 is each latent's attribution, and ``jax.vmap`` sweeps
over edits. ``attn.z`` sites are read with their heads flattened (SAELens' hook_z SAEs).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jinterp import interventions as iv
from jinterp import names as S
from jinterp.sae.autoencoder import SAE


class SAESplice(iv.Edit):
    """Replace a site's value by an SAE's (edited) reconstruction; see the module docstring.

    Args:
        site: where (a layer-specific name; default ``sae.site``).
        sae: the ``SAE``.
        keep_error: add ``x - sae(x)`` back, so that only latent edits change the forward.
        scale, shift: the latent edit ``f * scale + shift`` (default 1 and 0), broadcast against
            the latents ``[batch, pos, d_sae]``; ``ablate``/``clamp``/``steer`` build them.
        layers, positions: restrict the splice as any ``Edit`` (elsewhere the value is unchanged).
    """

    sae: SAE
    scale: Float[Array, "..."]
    shift: Float[Array, "..."]
    keep_error: bool = eqx.field(static=True)

    def __init__(self, site=None, sae: SAE | None = None, *, keep_error: bool = True, scale=None, shift=None,
                 layers=None, positions=None):
        if not isinstance(sae, SAE):
            raise TypeError(f"SAESplice needs an SAE (jinterp.sae.SAE), got {type(sae).__name__}")
        site = sae.site if site is None else site
        if site is None:
            raise ValueError("SAESplice needs a site: pass one, or train/load the SAE with site=...")
        self._restrict(site, layers, positions, None)
        self.sae = sae
        self.scale = jnp.ones(sae.d_sae) if scale is None else jnp.asarray(scale)
        self.shift = jnp.zeros(sae.d_sae) if shift is None else jnp.asarray(shift)
        self.keep_error = keep_error

    def _latent_edit(self, latents, scale, shift) -> SAESplice:
        latents = jnp.atleast_1d(jnp.asarray(latents))
        if not jnp.issubdtype(latents.dtype, jnp.integer):
            raise TypeError(f"latents must be integer indices, got dtype {latents.dtype}")
        bad = [int(i) for i in latents if not 0 <= int(i) < self.sae.d_sae]
        if bad:
            raise ValueError(f"latent {bad[0]} is out of range: this SAE has {self.sae.d_sae} latents "
                             f"(valid 0..{self.sae.d_sae - 1})")
        new_scale = self.scale if scale is None else self.scale.at[..., latents].set(scale)
        new_shift = self.shift.at[..., latents].set(shift(self.shift[..., latents]))
        return eqx.tree_at(lambda s: (s.scale, s.shift), self, (new_scale, new_shift))

    def ablate(self, latents) -> SAESplice:
        """The same splice with these latents set to 0."""
        return self._latent_edit(latents, 0.0, lambda old: 0.0)

    def clamp(self, latents, value) -> SAESplice:
        """The same splice with these latents set to ``value`` (a number or one per latent)."""
        return self._latent_edit(latents, 0.0, lambda old: value)

    def steer(self, latents, amount) -> SAESplice:
        """The same splice with ``amount`` added to these latents."""
        return self._latent_edit(latents, None, lambda old: old + amount)

    def edit(self, value: Array, at: iv.At) -> Array:
        x = value.reshape(*value.shape[:2], -1) if at.kind == "attn.z" else value
        latents = self.sae.encode(x)
        edited = latents * self._value(latents, at, self.scale, "SAESplice scale") + \
            self._value(latents, at, self.shift, "SAESplice shift")
        out = self.sae.decode(edited)
        if self.keep_error:
            out = out + jax.lax.stop_gradient(x - self.sae.decode(latents))
        return out.reshape(value.shape).astype(value.dtype)

    def check(self, cfg, seq_len: int) -> None:
        super().check(cfg, seq_len)
        width = math.prod(S.site_shape(cfg, self.site)[2:])
        if width != self.sae.d_in:
            raise ValueError(f"SAESplice at {self.site!r}: the site's values have {width} features per position, "
                             f"the SAE reads d_in={self.sae.d_in}")
