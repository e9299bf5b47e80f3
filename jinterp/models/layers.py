"""The shared layers every family is assembled from: norms, rotary, attention, MLP, block.

Each layer is a parameter module plus a pure function of (parameters, input, config, hook).
``hook(kind, value)`` (an ``interventions.SiteHook``) is called at every site and returns the value
the forward continues with; that single call is how capture and every edit reach the computation,
and the sites a config has are the ones these functions reach (``models.declaration`` traces them).
The few formulas a captured site can be recomputed with (``centred``, ``pattern_of``, ``mlp_post``,
``head_results``, ``per_head``) are functions here, shared by the forward and the ``Cache``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jinterp.models.config import Config

QUERY_CHUNK = 512  # queries whose attention scores the plain forward holds at once, at most...
MIN_QUERY_CHUNK = 256  # ...and at least, in chunks of the whole prompt...
QUERY_CHUNKS = 8  # ...of which there are this many where those bounds allow (each chunk compiles on its own)

if TYPE_CHECKING:
    from jinterp.interventions import SiteHook as Hook


class Norm(eqx.Module):
    """LayerNorm (with bias) or RMSNorm weights."""

    w: Float[Array, "d"]
    b: Float[Array, "d"] | None


class Attention(eqx.Module):
    W_Q: Float[Array, "n_heads d_model d_head"]
    W_K: Float[Array, "n_kv_heads d_model d_head"]
    W_V: Float[Array, "n_kv_heads d_model d_head"]
    W_O: Float[Array, "n_heads d_head d_model"]
    b_Q: Float[Array, "n_heads d_head"] | None
    b_K: Float[Array, "n_kv_heads d_head"] | None
    b_V: Float[Array, "n_kv_heads d_head"] | None
    b_O: Float[Array, "d_model"] | None
    q_norm: Norm | None
    k_norm: Norm | None


class MLP(eqx.Module):
    W_in: Float[Array, "d_model d_mlp"]
    W_gate: Float[Array, "d_model d_mlp"] | None
    W_out: Float[Array, "d_mlp d_model"]
    b_in: Float[Array, "d_mlp"] | None
    b_out: Float[Array, "d_model"] | None


class MoE(eqx.Module):
    """A mixture of gated experts and its router (``mlp`` of the block holds a shared expert, if any)."""

    W_router: Float[Array, "d_model n_experts"]
    W_in: Float[Array, "n_experts d_model d_expert"]
    W_gate: Float[Array, "n_experts d_model d_expert"]
    W_out: Float[Array, "n_experts d_expert d_model"]
    W_shared_gate: Float[Array, "d_model"] | None


class Block(eqx.Module):
    """One transformer block. In a model every leaf carries a leading n_layers axis."""

    ln1: Norm | None
    attn: Attention
    ln1_post: Norm | None
    ln2: Norm | None
    mlp: MLP | None
    ln2_post: Norm | None
    moe: MoE | None = None


# --- functions -----------------------------------------------------------------------------

SUM_BLOCKS = 4  # a float32 product's sum is computed as up to this many partial sums...
MIN_BLOCK = 64  # ...of at least this many terms (shorter sums round little; splitting them costs time)


def contract(spec: str, x: Array, W: Array, w_axis: int) -> Array:
    """``einsum(spec, x, W)``, contracting x's last axis with W's axis ``w_axis``; in float32 on CPU, as
    the sum of partial products over up to ``SUM_BLOCKS`` consecutive blocks of that axis.

    Why: a float32 sum's rounding grows with its length, and XLA:CPU accumulates each output along the
    whole axis, where PyTorch's kernels for ``Linear`` and for ``q @ k.T`` (their vector lanes add
    interleaved partial sums) round 2-3x closer to exact on these models. The partial sums bring
    jinterp's logits closer to float64 than transformers' (README "Numerics"). bfloat16 is left to the
    dot's own float32 accumulation; other backends to their own kernels."""
    n = x.shape[-1]
    blocks = min(SUM_BLOCKS, n // MIN_BLOCK)
    if blocks < 2 or x.dtype != jnp.float32 or jax.default_backend() != "cpu":
        return jnp.einsum(spec, x, W)
    size = -(-n // blocks)
    parts = [jnp.einsum(spec, x[..., i:i + size], jax.lax.slice_in_dim(W, i, min(i + size, n), axis=w_axis))
             for i in range(0, n, size)]
    return functools.reduce(jnp.add, parts)


def activation(name: str, x: Array) -> Array:
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "gelu_tanh":  # 0.5 x (1 + tanh u) as x sigmoid(2u): XLA:CPU tanh is up to 4.5 ulp off, exp within 1
        u = jnp.sqrt(2 / jnp.pi).astype(x.dtype) * (x + 0.044715 * x**3)
        return x * jax.nn.sigmoid(2 * u)
    return jax.nn.silu(x)


def accurate(dtype) -> jnp.dtype:
    """The dtype norms, softmax and rotary tables are computed in: float32, or the model's if wider
    (float64, the numerics referee)."""
    return jnp.promote_types(dtype, jnp.float32)


def normalize(ln: Norm | None, x: Float[Array, "... d"], cfg: Config, hook: Hook, name: str) -> Array:
    """LayerNorm: (x - mean) / scale * w + b;  RMSNorm: x / scale * w;  scale = sqrt(mean sq + eps).

    Computed in float32 at least, whatever the model dtype (as the reference implementations do).
    """
    if ln is None:
        return x
    h = centred(x, cfg)
    scale = hook(f"{name}.scale", jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.norm_eps))
    normalized = hook(f"{name}.normalized", h / scale)
    out = normalized * ln.w.astype(h.dtype)
    if ln.b is not None:
        out = out + ln.b.astype(h.dtype)
    return out.astype(x.dtype)


def centred(x: Float[Array, "... d"], cfg: Config) -> Array:
    """A norm's input in its computing dtype, minus its mean for LayerNorm: ``normalized = centred / scale``."""
    h = x.astype(accurate(x.dtype))
    return h - h.mean(-1, keepdims=True) if cfg.norm == "layer" else h


def rms_head_norm(ln: Norm, x: Float[Array, "... d_head"], eps: float) -> Array:
    """Gemma 3's q/k norm: RMS over each head's vector."""
    if ln.w.ndim == 2:  # weight [heads, d_head]: over all heads together (OLMo 2)
        return rms_heads_norm(ln, x, eps)
    h = x.astype(accurate(x.dtype))
    h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + eps)
    return (h * ln.w.astype(h.dtype)).astype(x.dtype)


def rms_heads_norm(ln: Norm, x: Float[Array, "... heads d_head"], eps: float) -> Array:
    """OLMo 2's q/k norm: RMS over every head's features together (``qk_norm_scope="all"``)."""
    h = x.astype(accurate(x.dtype))
    h = h * jax.lax.rsqrt(jnp.mean(h * h, (-2, -1), keepdims=True) + eps)
    return (h * ln.w.astype(h.dtype)).astype(x.dtype)


def rope_frequencies(cfg: Config, theta: float, scaling) -> Float[Array, "rotary_dim/2"]:
    """Inverse frequencies theta^(-2i/d), with linear or Llama-3 scaling when configured."""
    d = cfg.rotary_dim
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=accurate(cfg.dtype)) / d))
    if not scaling:
        return inv_freq
    scaling = dict(scaling)
    factor = float(scaling.get("factor", 1.0))
    if scaling["type"] == "linear":
        return inv_freq / factor
    if scaling["type"] == "longrope":  # Phi-3: per-frequency factors (the short ones: within the original context)
        return inv_freq / jnp.asarray(scaling["short_factor"], inv_freq.dtype)
    if scaling["type"] == "llama3":
        old_ctx = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * jnp.pi / inv_freq
        scaled = jnp.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def rope_attention_factor(scaling) -> float:
    """What longrope multiplies cos and sin by (1 for the other rotary types)."""
    return float(dict(scaling or ()).get("attention_factor", 1.0))


def rope_tables(inv_freq: Array, positions: Array) -> tuple[Array, Array]:
    """cos and sin of position * frequency, laid out [freqs, freqs] for rotate-half rotary."""
    angles = positions[..., None].astype(inv_freq.dtype) * inv_freq
    angles = jnp.concatenate([angles, angles], -1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: Float[Array, "batch pos heads d_head"], cos: Array, sin: Array) -> Array:
    """Rotary position embedding on the first rotary_dim features (rotate-half convention)."""
    d = cos.shape[-1]
    x_rot, x_pass = x[..., :d], x[..., d:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    rotated = x_rot * cos + jnp.concatenate([-x2, x1], -1) * sin
    return jnp.concatenate([rotated, x_pass], -1)


def _silent(kind: str, value: Array) -> Array:
    return value


_silent.wants = lambda kind: False


def per_head(resid: Float[Array, "batch pos d_model"], heads: int) -> Float[Array, "batch pos heads d_model"]:
    """The residual stream once per head (what ``attn.q_input``/``k_input``/``v_input`` hold)."""
    return jnp.broadcast_to(resid[:, :, None], (*resid.shape[:2], heads, resid.shape[-1]))


def pattern_of(scores: Float[Array, "batch heads pos key_pos"]) -> Array:
    """softmax over keys, in float32 at least, back in the scores' dtype."""
    return jax.nn.softmax(scores.astype(accurate(scores.dtype)), axis=-1).astype(scores.dtype)


def head_results(z: Float[Array, "batch pos heads d_head"], W_O: Float[Array, "heads d_head d_model"]) -> Array:
    """Each head's write into the residual stream, ``z_h @ W_O[h]``: ``[batch, pos, heads, d_model]``."""
    return contract("bqhe,hed->bqhd", z, W_O, 1)


def mlp_post(cfg: Config, pre: Array, pre_linear: Array | None = None) -> Array:
    """act(pre), times pre_linear in a gated MLP."""
    post = activation(cfg.act, pre)
    return post if pre_linear is None else post * pre_linear


def attention_inputs(p: Block, resid_pre: Float[Array, "batch pos d_model"], cfg: Config, hook: Hook):
    """What q, k and v read: ln1(resid_pre), shared by every head; or, when an intervention asks
    for ``attn.q_input`` / ``k_input`` / ``v_input`` (edge-level circuit work), a copy of the
    residual stream per head, each normalised on its own."""
    shared = normalize(p.ln1, resid_pre, cfg, hook, "ln1")
    if not any([hook.wants(f"attn.{n}_input") for n in "qkv"]):  # (asks about all three: the declaration notes them)
        return shared, shared, shared

    def normed(name: str, heads: int):
        return normalize(p.ln1, hook(f"attn.{name}_input", per_head(resid_pre, heads)), cfg, _silent, "ln1")

    return normed("q", cfg.n_heads), normed("k", cfg.n_kv_heads), normed("v", cfg.n_kv_heads)


def attention(
    p: Attention,
    inputs: tuple[Array, Array, Array],
    mask: Bool[Array, "batch query_pos key_pos"],
    rope: tuple[Array, Array] | None,
    cfg: Config,
    hook: Hook,
    cache: tuple[Array, Array, Array | int] | None = None,
) -> tuple[Float[Array, "batch pos d_model"], tuple[Array, Array]]:
    """softmax(q k^T * scale + mask) v W_O, grouped-query: query head h reads kv head h // group.

    ``inputs``: what q, k, v read, each ``[batch, pos, d_model]`` or per head ``[batch, pos, heads, d_model]``.
    ``cache``: ``(keys, values, index)``, keys and values of every slot ``[batch, slots, kv_heads, d_head]``:
    this call's positions are written into slots ``index..`` and the queries attend over all slots
    (``mask`` ``[batch, pos, slots]`` says which). Returns the output and this call's (keys, values)
    as attention used them (normed, rotated): what a cache stores.
    """
    def project(x, W, b):
        y = contract("bsd,hde->bshe" if x.ndim == 3 else "bshd,hde->bshe", x, W, 1)
        return y if b is None else y + b

    q = hook("attn.q", project(inputs[0], p.W_Q, p.b_Q))
    k = hook("attn.k", project(inputs[1], p.W_K, p.b_K))
    v = hook("attn.v", project(inputs[2], p.W_V, p.b_V))
    if p.q_norm is not None:
        q, k = rms_head_norm(p.q_norm, q, cfg.norm_eps), rms_head_norm(p.k_norm, k, cfg.norm_eps)
    if rope is not None:
        q = hook("attn.rot_q", rotate(q, *rope))
        k = hook("attn.rot_k", rotate(k, *rope))
    new = (k, v)
    if cache is not None:
        keys, values, index = cache
        k = jax.lax.dynamic_update_slice_in_dim(keys.astype(k.dtype), k, index, 1)
        v = jax.lax.dynamic_update_slice_in_dim(values.astype(v.dtype), v, index, 1)

    if hook.wants("attn.scores") or hook.wants("attn.pattern"):  # edited or recorded: the whole [pos, key_pos]
        scores = hook("attn.scores", attention_scores(q, k, mask, cfg))
        z = weighted_values(hook("attn.pattern", pattern_of(scores).astype(v.dtype)), v, cfg)
    else:
        first_query = 0 if cache is None else cache[2]  # (a traced index, while decoding: every key is read)
        z = attend(q, k, v, mask, cfg, first_query if cfg.causal and isinstance(first_query, int) else None)
    z = hook("attn.z", z)
    if hook.wants("attn.result"):
        out = hook("attn.result", head_results(z, p.W_O)).sum(2)
    else:
        out = contract("bqhe,hed->bqd", z, p.W_O, 1)
    return (out if p.b_O is None else out + p.b_O), new


def weighted_values(pattern: Float[Array, "batch n_heads pos key_pos"], v: Float[Array, "batch key_pos n_kv d_head"],
                    cfg: Config) -> Float[Array, "batch pos n_heads d_head"]:
    """z = pattern . v per head; query head h reads kv head h // group."""
    batch, _, seq, _ = pattern.shape
    grouped = pattern.reshape(batch, cfg.n_kv_heads, cfg.group_size * seq, -1)
    z = jnp.einsum("bkxs,bske->bkxe", grouped, v).reshape(batch, cfg.n_kv_heads, cfg.group_size, seq, v.shape[-1])
    return z.transpose(0, 3, 1, 2, 4).reshape(batch, seq, cfg.n_heads, v.shape[-1])


def query_chunk(seq: int) -> int:
    """How many queries ``attend`` computes at once in a prompt of ``seq`` positions."""
    return min(QUERY_CHUNK, max(MIN_QUERY_CHUNK, -(-seq // QUERY_CHUNKS)))


def attend(q, k, v, mask, cfg: Config, first_query: int | None = None) -> Float[Array, "batch pos n_heads d_head"]:
    """z of every query, computed ``query_chunk(seq)`` queries at a time, so that the scores held at once
    grow linearly with the sequence, not quadratically. Each query's softmax and sum are its own:
    chunking changes no value. As in flash attention, a query's weights are normalised once, on its
    weighted sum of values, rather than on each of its key's weights. Under ``grad`` each chunk's scores
    are recomputed in the backward pass rather than kept for it (``jax.checkpoint``): what a backward
    keeps stays linear too.

    ``first_query``: in a causal model, the key slot of the first query when it is static. A chunk
    then reads only the keys up to its last query's slot: every later key is masked for the whole
    chunk and would weigh exactly 0, so skipping them changes no value and saves about half of a long
    prompt's attention."""
    seq, size = q.shape[1], query_chunk(q.shape[1])

    # Each chunk takes the whole arrays and slices them itself: what a backward keeps for it is then
    # the arrays every chunk shares, not a copy of its slices.
    @functools.partial(jax.checkpoint, static_argnums=(4, 5, 6), prevent_cse=False)  # (in the layers' scan)
    def attend_chunk(q, k, v, mask, start, end, keys):
        q, k, v, mask = q[:, start:end], k[:, :keys], v[:, :keys], mask[:, start:end, :keys]
        scores = attention_scores(q, k, mask, cfg).astype(accurate(q.dtype))
        # Less each query's largest score, so that exp stays in range: z does not depend on it, nor its gradient.
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        total = weights.sum(-1).transpose(0, 2, 1)[..., None]  # [batch, pos, n_heads, 1]
        return (weighted_values(weights.astype(v.dtype), v, cfg) / total).astype(v.dtype)

    chunks = []
    for start in range(0, seq, size):
        end = min(start + size, seq)
        keys = k.shape[1] if first_query is None else min(first_query + end, k.shape[1])
        chunks.append(attend_chunk(q, k, v, mask, start, end, keys))
    return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, 1)


def attention_scores(q: Float[Array, "batch pos n_heads d_head"], k: Float[Array, "batch key_pos n_kv_heads d_head"],
                     mask: Bool[Array, "batch pos key_pos"], cfg: Config) -> Float[Array, "batch n_heads pos key_pos"]:
    """q . k * scale, soft-capped, masked keys at the dtype's minimum; query head h reads kv head h // group."""
    batch, seq, _, d_head = q.shape
    # The query heads of a kv head as one row block [group * pos] (head h = kv * group + g), so the
    # product comes out [batch, kv, group * pos, key_pos], already the [batch, heads, pos, key_pos]
    # layout: contracting the heads in place instead makes XLA transpose every score after.
    grouped = q.reshape(batch, seq, cfg.n_kv_heads, cfg.group_size, d_head).transpose(0, 2, 3, 1, 4)
    grouped = grouped.reshape(batch, cfg.n_kv_heads, cfg.group_size * seq, d_head)
    scores = contract("bkxe,bske->bkxs", grouped, k, 3) * jnp.asarray(cfg.attn_scale, q.dtype)
    scores = scores.reshape(batch, cfg.n_heads, seq, k.shape[1])
    if cfg.attn_softcap is not None:
        scores = cfg.attn_softcap * jnp.tanh(scores / cfg.attn_softcap)
    return jnp.where(mask[:, None], scores, jnp.finfo(scores.dtype).min)


def mlp(p: MLP, x: Float[Array, "batch pos d_model"], cfg: Config, hook: Hook) -> Array:
    """act(x W_in + b_in) W_out + b_out, or gated: (act(x W_gate) * x W_in) W_out."""
    def linear(W, b):
        y = contract("...d,de->...e", x, W, 0)
        return y if b is None else y + b

    if p.W_gate is not None:
        pre = hook("mlp.pre", linear(p.W_gate, None))
        post = mlp_post(cfg, pre, hook("mlp.pre_linear", linear(p.W_in, p.b_in)))
    else:
        post = mlp_post(cfg, hook("mlp.pre", linear(p.W_in, p.b_in)))
    post = hook("mlp.post", post)
    out = contract("...d,de->...e", post, p.W_out, 0)
    return out if p.b_out is None else out + p.b_out


def mixture(p: MoE, shared: MLP | None, x: Float[Array, "batch pos d_model"], cfg: Config, hook: Hook) -> Array:
    """sum over the top-k experts e of weight_e * expert_e(x), weights = softmax(x W_router) over the top k
    (renormalised if ``cfg.norm_topk``); plus a shared expert's output (times sigmoid(x . W_shared_gate)).

    Where the shapes allow (fewer chosen (token, expert) pairs than experts, as in one-token decoding),
    only the chosen experts' work is done, each token's experts' weights gathered. Otherwise every expert
    runs on every token with weight 0 outside its top k (n_experts / k times the arithmetic, in exchange
    for one dense program), one expert at a time: the working set is one expert's. Both add the experts
    in expert order, as the reference implementations do. ``moe.expert_out`` or ``moe.weights`` captured
    or edited takes the dense path."""
    logits = hook("moe.router_logits", x @ p.W_router)
    probs = jax.nn.softmax(logits.astype(accurate(logits.dtype)), axis=-1)
    top, chosen = jax.lax.top_k(probs, cfg.n_experts_per_token)
    if cfg.norm_topk:
        top = top / top.sum(-1, keepdims=True)
    weights = (jax.nn.one_hot(chosen, cfg.n_experts, dtype=top.dtype) * top[..., None]).sum(-2)
    weights = hook("moe.weights", weights.astype(x.dtype))
    wanted = hook.wants("moe.expert_out")

    few = x.shape[0] * x.shape[1] * cfg.n_experts_per_token < cfg.n_experts
    if few and not wanted and not hook.wants("moe.weights"):  # (an edit of the weights may choose any experts)
        out = chosen_experts(p, x, jnp.sort(chosen, axis=-1), weights, cfg)
    else:
        def expert(total, params):
            W_gate, W_in, W_out, weight = params
            out = ((activation(cfg.act, x @ W_gate) * (x @ W_in)) @ W_out) * weight[..., None]
            return total + out, out if wanted else None

        per_expert = (p.W_gate, p.W_in, p.W_out, jnp.moveaxis(weights, -1, 0))
        out, each = jax.lax.scan(expert, jnp.zeros_like(x), per_expert)
        if wanted:  # [batch, pos, expert, d_model]: each expert's weighted output
            out = hook("moe.expert_out", jnp.moveaxis(each, 0, 2)).sum(2)
    if shared is not None:
        shared_out = mlp(shared, x, cfg, hook)
        if p.W_shared_gate is not None:
            shared_out = jax.nn.sigmoid(x @ p.W_shared_gate)[..., None] * shared_out
        out = out + shared_out
    return out


def chosen_experts(p: MoE, x: Float[Array, "batch pos d_model"], chosen: Int[Array, "batch pos k"],
                   weights: Float[Array, "batch pos n_experts"], cfg: Config) -> Float[Array, "batch pos d_model"]:
    """The mixture's output computing only each token's ``chosen`` experts (in expert order), their
    weights gathered per token."""
    weight = jnp.take_along_axis(weights, chosen, -1)

    def one(total, k):
        e = chosen[..., k]  # [batch, pos]
        h = activation(cfg.act, jnp.einsum("bpd,bpde->bpe", x, p.W_gate[e])) * jnp.einsum("bpd,bpde->bpe", x, p.W_in[e])
        return total + jnp.einsum("bpe,bped->bpd", h, p.W_out[e]) * weight[..., k, None], None

    return jax.lax.scan(one, jnp.zeros_like(x), jnp.arange(chosen.shape[-1]))[0]


def block(
    p: Block,
    resid_pre: Float[Array, "batch pos d_model"],
    mask: Array,
    rope: tuple[Array, Array] | None,
    cfg: Config,
    hook: Hook,
    cache: tuple[Array, Array, Array | int] | None = None,
) -> tuple[Float[Array, "batch pos d_model"], tuple[Array, Array]]:
    """One block: pre-norm (Llama, GPT-2), parallel (GPT-NeoX), sandwich (Gemma), post-norm (BERT) or
    post-sublayer (OLMo 2: no ``ln1``/``ln2``, only ``ln1_post``/``ln2_post``).
    ``cache``: keys and values of every slot (see ``attention``). Returns the block's output and
    this call's (keys, values)."""
    resid_pre = hook("resid_pre", resid_pre)

    if cfg.norm_placement == "post":
        attn_out, kv = attention(p.attn, (resid_pre,) * 3, mask, rope, cfg, hook, cache)
        resid_mid = hook("resid_mid", resid_pre + hook("attn_out", attn_out))
        h = normalize(p.ln1, resid_mid, cfg, hook, "ln1")
        mlp_out = hook("mlp_out", mlp(p.mlp, h, cfg, hook))
        resid_post = hook("resid_post", h + mlp_out)
        return hook("normalized_resid_post", normalize(p.ln2, resid_post, cfg, hook, "ln2")), kv

    attn_out, kv = attention(p.attn, attention_inputs(p, resid_pre, cfg, hook), mask, rope, cfg, hook, cache)
    attn_out = hook("attn_out", normalize(p.ln1_post, attn_out, cfg, hook, "ln1_post"))
    if cfg.attn_only:
        return hook("resid_post", resid_pre + attn_out), kv

    resid = resid_pre if cfg.parallel else hook("resid_mid", resid_pre + attn_out)
    # mlp_in: the MLP's own copy of the residual stream it reads (the residual path goes on unchanged)
    h = normalize(p.ln2, hook("mlp_in", resid), cfg, hook, "ln2")
    mlp_out = mlp(p.mlp, h, cfg, hook) if p.moe is None else mixture(p.moe, p.mlp, h, cfg, hook)
    mlp_out = hook("mlp_out", normalize(p.ln2_post, mlp_out, cfg, hook, "ln2_post"))
    return hook("resid_post", resid + attn_out + mlp_out if cfg.parallel else resid + mlp_out), kv
