"""The transformer: embeddings, a stack of blocks run with ``lax.scan``, final norm, unembedding.

Every family is this one module with a different ``Config``. Decoders return logits; an
encoder (``unembed=False``, e.g. BERT) returns its final hidden states.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from jinterp import interventions as iv
from jinterp._compile import jit
from jinterp.cache import Cache, from_records
from jinterp.models import declaration
from jinterp.models.config import Config
from jinterp.models.declaration import site_specs
from jinterp.models.layers import (
    MLP,
    Attention,
    Block,
    MoE,
    Norm,
    block,
    contract,
    normalize,
    rope_attention_factor,
    rope_frequencies,
    rope_tables,
)
from jinterp.protocol import Model

# From this many tokens in a call on, a backward pass through the forward (attribution, training)
# recomputes each block's activations from its input instead of keeping every layer's: what a
# gradient holds then grows with one layer, not n_layers. Values are unchanged; the backward costs
# about one more forward.
RECOMPUTE_TOKENS = 2048


class Transformer(Model):
    """A pure transformer. Block parameters are stacked along a leading ``n_layers`` axis.

    It implements the site protocol (``jinterp.protocol.Model``): its inputs are token ids
    ``[batch, seq]``, with the options ``attention_mask``, ``token_type_ids`` and ``logit_positions``
    (and ``start`` / ``prefix``, which sweeps use to resume a patched forward, see ``forward``).
    """

    cfg: Config = eqx.field(static=True)
    W_E: Float[Array, "d_vocab d_model"]
    W_pos: Float[Array, "n_ctx d_model"] | None
    W_token_type: Float[Array, "n_token_types d_model"] | None
    ln_embed: Norm | None
    blocks: Block
    ln_final: Norm | None
    W_U: Float[Array, "d_model d_vocab"] | None  # None when tied to W_E (or an encoder)
    b_U: Float[Array, "d_vocab"] | None
    W_pool: Float[Array, "d_model d_model"] | None
    b_pool: Float[Array, "d_model"] | None

    def __call__(
        self,
        tokens: Int[Array, "batch pos"],
        attention_mask: Bool[Array, "batch pos"] | None = None,
        token_type_ids: Int[Array, "batch pos"] | None = None,
    ) -> Float[Array, "batch pos out"]:
        """Logits ``[batch, pos, d_vocab]`` (an encoder: hidden states ``[batch, pos, d_model]``)."""
        check_inputs(self.cfg, tokens, attention_mask, token_type_ids)
        return _output(self, jnp.asarray(tokens), attention_mask, token_type_ids)

    def __treescope_repr__(self, path, subtree_renderer):
        from jinterp.treescope_views import render_model  # display code stays out of the model's imports

        return render_model(self, path, subtree_renderer)

    # --- the site protocol -------------------------------------------------------------------------

    def site_specs(self, tokens=None, *, attention_mask=None, token_type_ids=None, logit_positions=None) -> dict:
        """Every site in forward order, with its shape for ``tokens`` (symbolic sizes without them)."""
        batch, seq = ("batch", "pos") if tokens is None else np.shape(tokens)
        n_logits = None if logit_positions is None else np.shape(logit_positions)[-1]
        return site_specs(self.cfg, batch, seq, n_logits)

    def apply(self, tokens, interventions=(), *, attention_mask=None, token_type_ids=None, logit_positions=None,
              start=None, prefix=None) -> tuple[Array, Cache]:
        """The output (logits, or an encoder's hidden states) and a ``Cache`` of what the ``Capture``
        interventions recorded (see ``forward`` for the options). ``prefix=(keys, values, logits)``: the
        first positions as already computed; their logits (None when ``logit_positions`` picks which
        to unembed) lead the output."""
        interventions = iv.flatten(interventions)
        output, top, blocks = self.forward(tokens, interventions, attention_mask, token_type_ids, start=start,
                                           logit_positions=logit_positions, prefix=prefix and prefix[:2])
        if prefix is not None and prefix[2] is not None:
            output = jnp.concatenate([prefix[2], output], 1)
        return output, from_records(interventions, top, blocks, self.cfg.n_layers)

    def check_inputs(self, tokens, *, attention_mask=None, token_type_ids=None, logit_positions=None) -> None:
        check_inputs(self.cfg, tokens, attention_mask, token_type_ids)

    def plan_captures(self, specs, names, edited):
        """Leaves out the sites the ``Cache`` can derive on access (``models.declaration.plan``); the
        captured logits are the output itself, not recorded a second time."""
        wanted = iv.captures(specs, names)
        captures, derived = declaration.plan(self.cfg, wanted, frozenset(edited))
        logits = self.cfg.unembed and any(c.site == "logits" for c in captures)
        return tuple(c for c in captures if not (logits and c.site == "logits")), (derived, logits)

    def capture_only(self, names, **options) -> dict:
        """No unembedding at all (zero logit positions) unless the logits are captured."""
        wanted = any(name == "logits" for name in names) or not self.cfg.unembed
        return options if wanted else dict(options, logit_positions=np.zeros(0, np.int32))

    def complete(self, cache: Cache, plan, output, tokens, *, attention_mask=None, **options) -> Cache:
        derived, logits = plan
        if logits:
            cache = dataclasses.replace(cache, stacked={**cache.stacked, "logits": output})
        if derived:
            masks = None
            if any(kind == "attn.scores" for kind, *_ in derived):
                valid = jnp.asarray(np.ones(np.shape(tokens), bool) if attention_mask is None else attention_mask, bool)
                masks = attention_masks(self.cfg, valid, real_positions(valid))
            cache = dataclasses.replace(cache, derived=derived, formula=declaration.Formulas(self.cfg),
                                        extras=(self.blocks.attn.W_O, masks))
        return cache

    def on_mesh(self, mesh, tokens, *, attention_mask=None, token_type_ids=None, logit_positions=None, **options):
        from jinterp import sharding

        model, tokens, attention_mask, token_type_ids, logit_positions = sharding.split_batch(
            mesh, self, tokens, attention_mask, token_type_ids, logit_positions)
        return model, tokens, dict(attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   logit_positions=logit_positions, **options)

    def reusable_prefix(self, clean, corrupted, *, logit_positions=None, **options) -> int:
        """How many leading positions every patched run shares with the base run: up to the first token
        where the inputs differ (causal models; 0 if the logits read include an earlier position)."""
        cfg = self.cfg
        differs = np.asarray((np.asarray(clean) != np.asarray(corrupted)).any(0))
        if not cfg.causal or not differs.any() or (cfg.qk_norm and cfg.positional != "rotary"):
            return 0  # (cached keys are taken after q/k norm from attn.rot_k)
        first = int(np.argmax(differs))
        read = np.asarray([] if logit_positions is None else logit_positions)
        return 0 if ((read >= 0) & (read < first)).any() else first

    def resume_sites(self, first: int = 0) -> tuple[str, ...]:
        """What ``resumed`` reads from the base run: the residual stream, and the keys and values of a prefix."""
        keys = "blocks.*.attn.rot_k" if self.cfg.positional == "rotary" else "blocks.*.attn.k"
        return ("blocks.*.resid_pre",) + ((keys, "blocks.*.attn.v") if first else ())

    def resumed(self, tokens, base_cache: Cache, base_output, layer, first: int = 0, *, logit_positions=None,
                **options) -> dict:
        """Options for ``apply`` that recompute only what a patch at ``layer`` or later, at positions
        ``first`` on, can change: the forward starts from the base run's residual stream at ``layer``
        and takes the first positions' keys, values and logits from the base run."""
        resid = base_cache.stack("resid_pre")[:, :, first:]
        found = dict(options, logit_positions=logit_positions)
        if layer is not None:
            found["start"] = (layer, resid[layer])
        if first:
            keys = base_cache.stack(self.resume_sites(first)[1])[:, :, :first]
            before = base_output[:, :first] if logit_positions is None else None
            found["prefix"] = (keys, base_cache.stack("attn.v")[:, :, :first], before)
            if logit_positions is not None:
                positions = np.asarray(logit_positions)
                found["logit_positions"] = np.where(positions < 0, positions, positions - first)
        return found

    @property
    def W_unembed(self) -> Float[Array, "d_model d_vocab"]:
        return self.W_E.T if self.W_U is None else self.W_U

    def unembed(self, x: Float[Array, "... d_model"]) -> Float[Array, "... d_vocab"]:
        """Logits from the final (normed) residual stream: unembedding, bias and soft-cap."""
        logits = contract("...d,dv->...v", x, self.W_unembed.astype(x.dtype), 0)
        if self.b_U is not None:
            logits = logits + self.b_U
        cap = self.cfg.final_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def forward(self, tokens, interventions=(), attention_mask=None, token_type_ids=None, start=None,
                logit_positions=None, prefix=None, cache=None, hook=None):
        """The forward pass with interventions at its sites (or ``hook``, a ``SiteHook``-like object, instead).

        ``start=(layer, resid_pre)`` resumes from a cached residual stream: blocks before
        ``layer`` are skipped (their sites are not recorded) and the embeddings are not
        recomputed. ``prefix=(keys, values)`` (causal models; each ``[n_layers, batch, p,
        n_kv_heads, d_head]``, keys as attention uses them: normed and rotated) takes the first
        p positions as already computed: only positions p.. run, attending to the cached keys
        and values too; every site, edit position, ``resid_pre`` of ``start`` and the output then
        covers positions p.. only. ``cache`` (a ``KVCache``, causal models) does the same for
        incremental decoding: ``tokens`` (with their ``attention_mask``) are the next positions, written
        into the cache's slots from ``cache.index`` on; sites cover these positions only. ``logit_positions``
        (int ``[n]`` or ``[batch, n]``) unembeds only those positions: logits ``[batch, n, d_vocab]``.
        Returns (output, records outside the blocks, records inside the blocks stacked over layers),
        and with ``cache`` a fourth item, the cache holding these positions too. Inputs are not
        validated here; ``jinterp.run`` and ``__call__`` do.
        """
        cfg = self.cfg
        valid = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        if (prefix is not None or cache is not None) and not cfg.causal:
            raise ValueError("prefix= or cache= (cached keys and values) needs a causal model: in this "
                             "bidirectional encoder earlier positions also attend to later ones")
        if cache is not None and (prefix is not None or start is not None):
            raise ValueError("cache= cannot be combined with prefix= or start=")
        returns_cache = cache is not None
        if prefix is not None:  # the cached positions fill the first slots, the rest are written now
            first, rest = prefix[0].shape[2], tokens.shape[1] - prefix[0].shape[2]
            slots = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, rest), (0, 0), (0, 0)])  # noqa: E731
            cache = KVCache(slots(prefix[0]), slots(prefix[1]), valid.at[:, first:].set(False), first)
            tokens, valid = tokens[:, first:], valid[:, first:]
            token_type_ids = None if token_type_ids is None else token_type_ids[:, first:]
        batch, seq = tokens.shape
        if cache is None:
            positions = real_positions(valid)
            masks = attention_masks(cfg, valid, positions)
        else:
            filled = jax.lax.dynamic_update_slice_in_dim(cache.filled, valid, cache.index, 1)
            slot_positions = real_positions(filled)
            positions = jax.lax.dynamic_slice_in_dim(slot_positions, cache.index, seq, 1)
            masks = attention_masks(cfg, filled, slot_positions, cache.index, seq)
        # Global and local (sliding-window) layers differ only in mask and rotary base.
        ropes = rope_pair(cfg, positions)
        top = hook or iv.SiteHook.of(iv.flatten(interventions), site_specs(cfg, batch, seq))
        top.offset = 0 if cache is None else cache.index  # where this call's positions start (edits index all)
        if start is None:
            x, start_layer = self.embed(tokens, positions, token_type_ids, top), None
        else:
            start_layer, x = start
        is_local = jnp.asarray([t == "local" for t in cfg.layer_types])
        pick = lambda local, pair: jax.tree.map(lambda g, lo: jnp.where(local, lo, g), *pair)
        slabs = None if cache is None else (cache.keys, cache.values)

        def run(carry, inputs):
            (x, states), (params, index, local, slab) = carry, inputs
            layer_hook = top.at_layer(index, dict(states))
            mask, rope = pick(local, masks), ropes and pick(local, ropes)
            x, kv = block(params, x, mask, rope, cfg, layer_hook, None if slab is None else (*slab, cache.index))
            return (x, layer_hook.states), (layer_hook.records, kv)

        if batch * seq >= RECOMPUTE_TOKENS:  # a backward pass recomputes each block rather than keep its activations
            run = jax.checkpoint(run, prevent_cse=False)

        layers = (self.blocks, jnp.arange(cfg.n_layers), is_local, slabs)
        one_layer = jax.tree.map(lambda a: a[0], layers)
        shapes = jax.eval_shape(run, (x, top.states), one_layer)[1][0]
        # The records are written into their [n_layers, ...] buffers as the layers run. Buffers
        # filled with distinct values: scan's own stacked outputs all start from one shared zero
        # broadcast that XLA copies into each, an extra pass over everything captured.
        buffers = {kind: jnp.full((cfg.n_layers, *r.shape), i % 64 + 1, r.dtype)
                   for i, (kind, r) in enumerate(sorted(shapes.items()))}

        def layer(carry, inputs):
            carry, buffers = carry
            index = inputs[1]
            if start_layer is None:
                carry, (records, kv) = run(carry, inputs)
            else:  # blocks before start_layer are skipped and record zeros
                def ran(carry, inputs):
                    carry, (records, _) = run(carry, inputs)
                    return carry, records

                skipped = lambda carry, inputs: (carry, jax.tree.map(jnp.zeros_like, shapes))
                (carry, records), kv = jax.lax.cond(index >= start_layer, ran, skipped, carry, inputs), None
            buffers = {k: jax.lax.dynamic_update_index_in_dim(b, records[k], index, 0) for k, b in buffers.items()}
            return (carry, buffers), kv if returns_cache else None

        ((x, top.states), block_records), new_kv = jax.lax.scan(layer, ((x, top.states), buffers), layers)

        x = normalize(self.ln_final, x, cfg, top, "ln_final")
        if cfg.unembed:
            if logit_positions is not None:
                chosen = jnp.asarray(logit_positions) % seq
                chosen = jnp.broadcast_to(chosen, (batch, np.shape(logit_positions)[-1]))
                x = jnp.take_along_axis(x, chosen[..., None], axis=1)
            x = top("logits", self.unembed(x))
        if not returns_cache:
            return x, top.records, block_records
        # This call's keys and values [n_layers, batch, seq, ...] go into their slots.
        write = lambda slab, new: jax.lax.dynamic_update_slice_in_dim(slab, new.astype(slab.dtype), cache.index, 2)
        cache = KVCache(write(cache.keys, new_kv[0]), write(cache.values, new_kv[1]), filled, cache.index + seq)
        return x, top.records, block_records, cache

    def embed(self, tokens, positions, token_type_ids, hook) -> Float[Array, "batch pos d_model"]:
        """The residual stream entering block 0: token (+ position, + token-type) embeddings."""
        cfg = self.cfg
        # Out-of-vocabulary ids embed as NaN rather than being silently clamped.
        embed = self.W_E.at[tokens].get(mode="fill", fill_value=jnp.nan)
        x = hook("embed", embed * jnp.asarray(cfg.embed_scale, embed.dtype))
        if self.W_pos is not None:
            x = x + hook("pos_embed", self.W_pos[positions])
        if self.W_token_type is not None:
            types = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
            x = x + hook("token_type_embed", self.W_token_type.at[types].get(mode="fill", fill_value=jnp.nan))
        return normalize(self.ln_embed, x, cfg, hook, "ln_embed")

    def pool(self, hidden: Float[Array, "batch pos d_model"], attention_mask=None, how: str = "mean"):
        """Sentence vectors from an encoder's hidden states: masked ``mean``, ``cls`` (the first
        token), or ``pooler`` (BERT's tanh(W h_cls + b))."""
        if how == "mean":
            if attention_mask is None:
                return hidden.mean(1)
            m = attention_mask.astype(hidden.dtype)[..., None]
            return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1)
        if how == "cls":
            return hidden[:, 0]
        if how == "pooler":
            if self.W_pool is None:
                raise ValueError("This model has no pooler weights; use how='mean' or how='cls'")
            return jnp.tanh(hidden[:, 0] @ self.W_pool + self.b_pool)
        raise ValueError(f"Unknown pooling {how!r}; valid choices: 'mean', 'cls', 'pooler'")

    def astype(self, dtype) -> Transformer:
        """The same model with floating-point parameters cast to ``dtype`` (e.g. jnp.bfloat16)."""
        dtype = jnp.dtype(dtype)
        cast = lambda x: x.astype(dtype) if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        return dataclasses.replace(jax.tree.map(cast, self), cfg=self.cfg.replace(dtype=dtype.name))

    def first_layers(self, n: int) -> Transformer:
        """This model cut after its first ``n`` blocks: every site up to ``blocks.{n-1}`` has the
        same value as in this model, at a fraction of the cost (the final norm and unembedding then
        read block ``n-1``'s output, so the logits mean nothing). For reading early activations."""
        if not isinstance(n, int) or not 1 <= n <= self.cfg.n_layers:
            raise ValueError(f"first_layers needs n in [1, n_layers={self.cfg.n_layers}], got {n!r}")
        cfg = self.cfg.replace(n_layers=n, layer_types=self.cfg.layer_types[:n])
        return dataclasses.replace(self, cfg=cfg, blocks=jax.tree.map(lambda a: a[:n], self.blocks))

    @classmethod
    def init(cls, cfg: Config, key: jax.Array, std: float = 0.02) -> Transformer:
        """A randomly initialised model (normal(0, std) weights, zero biases, unit norm weights)."""
        keys = iter(jax.random.split(key, 16))
        dtype = jnp.dtype(cfg.dtype)
        L, D, H, K, E, M = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp

        def normal(*shape):
            return (std * jax.random.normal(next(keys), shape)).astype(dtype)

        def zeros(*shape, when=True):
            return jnp.zeros(shape, dtype) if when else None

        def norm(*lead, when=True):
            if not when or cfg.norm is None:
                return None
            return Norm(jnp.ones((*lead, D), dtype), zeros(*lead, D, when=cfg.norm == "layer"))

        def head_norm(heads):  # over each head's features, or over all heads' together
            shape = (L, E) if cfg.qk_norm_scope == "head" else (L, heads, E)
            return Norm(jnp.ones(shape, dtype), None) if cfg.qk_norm else None

        attn = Attention(
            W_Q=normal(L, H, D, E), W_K=normal(L, K, D, E), W_V=normal(L, K, D, E), W_O=normal(L, H, E, D),
            b_Q=zeros(L, H, E, when=cfg.qkv_bias), b_K=zeros(L, K, E, when=cfg.qkv_bias),
            b_V=zeros(L, K, E, when=cfg.qkv_bias), b_O=zeros(L, D, when=cfg.out_bias),
            q_norm=head_norm(H), k_norm=head_norm(K))
        mlp = moe = None
        if cfg.n_experts:
            N, X = cfg.n_experts, cfg.d_expert
            moe = MoE(W_router=normal(L, D, N), W_in=normal(L, N, D, X), W_gate=normal(L, N, D, X),
                      W_out=normal(L, N, X, D), W_shared_gate=normal(L, D) if cfg.shared_expert_gate else None)
        if cfg.has_dense_mlp:
            mlp = MLP(W_in=normal(L, D, M), W_gate=normal(L, D, M) if cfg.gated_mlp else None,
                      W_out=normal(L, M, D), b_in=zeros(L, M, when=cfg.mlp_bias),
                      b_out=zeros(L, D, when=cfg.mlp_bias))
        after = cfg.norm_placement in ("sandwich", "post_sublayer")  # norms on the sublayers' outputs
        before = cfg.norm_placement != "post_sublayer"
        blocks = Block(ln1=norm(L, when=before), attn=attn, ln1_post=norm(L, when=after),
                       ln2=norm(L, when=before and cfg.has_mlp), mlp=mlp, ln2_post=norm(L, when=after and cfg.has_mlp),
                       moe=moe)
        return cls(
            cfg=cfg,
            W_E=normal(cfg.d_vocab, D),
            W_pos=normal(cfg.n_ctx, D) if cfg.positional == "learned" else None,
            W_token_type=normal(cfg.n_token_types, D) if cfg.n_token_types else None,
            ln_embed=norm(when=cfg.embed_norm),
            blocks=blocks,
            ln_final=norm(when=cfg.final_norm),
            W_U=normal(D, cfg.d_vocab) if cfg.unembed and not cfg.tied_embeddings else None,
            b_U=zeros(cfg.d_vocab, when=cfg.unembed_bias),
            W_pool=normal(D, D) if cfg.pooler else None,
            b_pool=zeros(D, when=cfg.pooler),
        )


class KVCache(eqx.Module):
    """Keys and values of the positions run so far, preallocated for incremental decoding.

    Slot i of a row holds the i-th token fed (prompt padding included); keys are stored as
    attention uses them (normed and rotated). ``Transformer.forward(tokens, cache=...)`` writes
    the next tokens into the slots from ``index`` on and returns the updated cache.
    """

    keys: Float[Array, "n_layers batch slots n_kv_heads d_head"]
    values: Float[Array, "n_layers batch slots n_kv_heads d_head"]
    filled: Bool[Array, "batch slots"]  # slots holding a real token (not padding, not yet written)
    index: Int[Array, ""] | int  # the first free slot

    @classmethod
    def empty(cls, cfg: Config, batch: int, slots: int) -> KVCache:
        shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.d_head)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return cls(zeros, zeros, jnp.zeros((batch, slots), bool), jnp.asarray(0, jnp.int32))


@jit
def _output(model: Transformer, tokens, attention_mask, token_type_ids):
    return model.forward(tokens, (), attention_mask, token_type_ids)[0]


def real_positions(valid: Bool[Array, "batch slots"]) -> Int[Array, "batch slots"]:
    """Each slot's position, counting real tokens only, so that a padded row equals the unpadded run."""
    return jnp.maximum(jnp.cumsum(valid, -1) - 1, 0)


def attention_masks(cfg: Config, valid: Bool[Array, "batch slots"], positions: Int[Array, "batch slots"],
                    first: Array | int = 0, n_queries: int | None = None):
    """(global, local) boolean masks [batch, query, key]: real keys, causal, within the window.

    Keys are every slot; queries are slots ``first..first + n_queries`` (default: every slot)."""
    batch, slots = valid.shape
    n_queries = slots if n_queries is None else n_queries
    query, key = first + jnp.arange(n_queries)[:, None], jnp.arange(slots)[None, :]
    allowed = jnp.broadcast_to(valid[:, None, :], (batch, n_queries, slots))
    if cfg.causal:
        allowed = allowed & (key <= query)
    # A padding query attends to itself alone (no real query reads a padding key): its values stay
    # finite and causal instead of a uniform average over every key, later ones included.
    allowed = allowed | (key == query)
    if "local" not in cfg.layer_types:
        return allowed, allowed
    query_positions = jax.lax.dynamic_slice_in_dim(positions, first, n_queries, 1)
    distance = query_positions[:, :, None] - positions[:, None, :]
    return allowed, allowed & (distance < cfg.sliding_window)


def rope_pair(cfg: Config, positions):
    """Rotary (cos, sin) tables for global layers and for local layers (None if not rotary)."""
    if cfg.positional != "rotary":
        return None
    global_ = rope_tables(rope_frequencies(cfg, cfg.rope_theta, cfg.rope_scaling), positions)
    factor = rope_attention_factor(cfg.rope_scaling)
    if factor != 1.0:  # longrope
        global_ = tuple(table * factor for table in global_)
    if "local" not in cfg.layer_types or cfg.rope_theta_local is None:  # (Mistral, Phi-3: one rotary everywhere)
        return global_, global_
    return global_, rope_tables(rope_frequencies(cfg, cfg.rope_theta_local, None), positions)  # Gemma 3


def check_inputs(cfg: Config, tokens, attention_mask=None, token_type_ids=None) -> None:
    """Clear errors for inputs a model cannot take. Value checks run only on concrete arrays."""
    shape = getattr(tokens, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"tokens must be an int array [batch, seq], got shape {shape}; "
                         f"for one sequence use tokens[None]")
    dtype = np.dtype(tokens.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {dtype}")
    if shape[1] > cfg.n_ctx:
        raise ValueError(f"Sequence length {shape[1]} exceeds this model's context of n_ctx={cfg.n_ctx} tokens")
    if shape[1] == 0:
        raise ValueError("tokens has no positions (seq = 0)")
    for name, extra in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if extra is not None and tuple(extra.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(extra.shape)}, tokens have {tuple(shape)}; they must match")
    if token_type_ids is not None and not cfg.n_token_types:
        raise ValueError("token_type_ids given, but this model has no token-type embeddings")
    if iv.concrete(tokens):
        ids = np.asarray(tokens)
        bad = np.argwhere((ids < 0) | (ids >= cfg.d_vocab))
        if bad.size:
            b, p = bad[0]
            raise ValueError(f"Token id {int(ids[b, p])} at [batch {b}, position {p}] is outside the "
                             f"vocabulary (valid ids 0..{cfg.d_vocab - 1})")
    if token_type_ids is not None and iv.concrete(token_type_ids):
        types = np.asarray(token_type_ids)
        if types.size and (types.min() < 0 or types.max() >= cfg.n_token_types):
            raise ValueError(f"token_type_ids must be in 0..{cfg.n_token_types - 1}, got {types.min()}..{types.max()}")
