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

A transcoder reads one site and writes another later in the same block:

    splice = SAESplice("blocks.3.mlp_out", transcoder)   # reads transcoder.site, blocks.3.ln2.normalized

It is the same edit at the site it writes (``mlp_out``), with the latents encoded from the value
the forward had at the site it reads, which the splice holds as its state from one site to the
next (``At.set_state``). The error term is the true ``mlp_out`` minus the transcoder's prediction,
so with ``keep_error=False`` the layer's MLP is replaced by the transcoder (the replacement model
of circuit tracing), and gradients reach the layers below through the transcoder's encoder only.
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
        site: where it writes (a layer-specific name; default ``sae.site``, or a transcoder's
            ``sae.target_site``).
        sae: the ``SAE`` (or transcoder).
        keep_error: add ``x - sae(x)`` back (a transcoder: the site's value minus its prediction),
            so that only latent edits change the forward.
        scale, shift: the latent edit ``f * scale + shift`` (default 1 and 0), broadcast against
            the latents ``[batch, pos, d_sae]``; ``ablate``/``clamp``/``steer`` build them.
        reads: a transcoder's input site, in the block it writes (default ``sae.site``); None for an
            autoencoder, which reads where it writes.
        layers, positions: restrict the splice as any ``Edit`` (elsewhere the value is unchanged).
    """

    sae: SAE
    scale: Float[Array, "..."]
    shift: Float[Array, "..."]
    keep_error: bool = eqx.field(static=True)
    reads: str | None = eqx.field(static=True)  # the site kind a transcoder reads; None: the site it writes

    def __init__(self, site=None, sae: SAE | None = None, *, keep_error: bool = True, scale=None, shift=None,
                 reads=None, layers=None, positions=None):
        if not isinstance(sae, SAE):
            raise TypeError(f"SAESplice needs an SAE (jinterp.sae.SAE), got {type(sae).__name__}")
        if reads is None and sae.is_transcoder:
            reads = sae.site
            if reads is None:
                raise ValueError(f"SAESplice of a transcoder (d_in={sae.d_in}, d_out={sae.d_out}) needs the site it "
                                 f"reads: pass reads=..., or train/load it with site=...")
        site = (sae.site if reads is None else sae.target_site) if site is None else site
        if site is None:
            raise ValueError("SAESplice needs a site: pass one, or train/load the SAE with site=... "
                             "(a transcoder: target_site=...)")
        self._restrict(site, layers, positions, None)
        self.reads = None if reads is None else _read_kind(reads, site)
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

    def kinds(self) -> tuple[str, ...]:
        return (self.site,) if self.reads is None else (self.reads, self.site)

    def initial_state(self, specs):
        if self.reads is None:
            return None
        read = next(spec for spec in specs.values() if spec.kind == self.reads)
        return jnp.zeros((*read.shape[:2], self.sae.d_in), self.sae.W_enc.dtype)

    def __call__(self, value: Array, at: iv.At) -> Array:
        if at.kind == self.reads:  # a transcoder's input: held for the site it writes, later in this block
            at.set_state(_flat(value, at.kind).astype(at.state.dtype))
            return value
        return super().__call__(value, at)

    def edit(self, value: Array, at: iv.At) -> Array:
        here = _flat(value, at.kind)
        latents = self.sae.encode(here if self.reads is None else at.state)
        edited = latents * self._value(latents, at, self.scale, "SAESplice scale") + \
            self._value(latents, at, self.shift, "SAESplice shift")
        out = self.sae.decode(edited)
        if self.keep_error:
            out = out + jax.lax.stop_gradient(here - self.sae.decode(latents))
        return out.reshape(value.shape).astype(value.dtype)

    def check(self, specs) -> None:
        super().check([spec for spec in specs if spec.kind == self.site])
        widths = {self.site: ("reads d_in", self.sae.d_in)} if self.reads is None else {
            self.reads: ("reads d_in", self.sae.d_in), self.site: ("writes d_out", self.sae.d_out)}
        for kind, (what, expected) in widths.items():
            width = math.prod(next(spec for spec in specs if spec.kind == kind).shape[2:])
            if width != expected:
                raise ValueError(f"SAESplice at {kind!r}: the site's values have {width} features per position, "
                                 f"the SAE {what}={expected}")
        if self.reads is not None:
            order = [spec.kind for spec in specs if spec.layer == specs[0].layer]  # forward order in one block
            if order.index(self.reads) > order.index(self.site):
                raise ValueError(f"SAESplice reads {self.reads!r} and writes {self.site!r}, which comes before it in "
                                 f"a block of this model; a transcoder reads a site before the one it writes")


def _flat(value: Array, kind: str) -> Array:
    """``attn.z`` with its heads flattened (SAELens' hook_z layout); other sites as they are."""
    return value.reshape(*value.shape[:2], -1) if kind == "attn.z" else value


def _read_kind(reads, site) -> str:
    """The kind of a transcoder's input site, checked against the site it writes."""
    read, write = S.parse(reads), S.parse(site)
    if read.kind not in S.BLOCK_KINDS or write.kind not in S.BLOCK_KINDS:
        raise ValueError(f"A transcoder splice reads and writes sites inside one block; got reads={read.name!r}, "
                         f"site={write.name!r}")
    if isinstance(read.layer, int) and isinstance(write.layer, int) and read.layer != write.layer:
        raise ValueError(f"A transcoder splice reads and writes in one block; got reads={read.name!r} (layer "
                         f"{read.layer}) and site={write.name!r} (layer {write.layer})")
    if read.kind == write.kind:
        raise ValueError(f"SAESplice would read and write {write.name!r}: a transcoder writes the site it predicts "
                         f"(its target_site, e.g. mlp_out), not the one it reads")
    return read.kind
