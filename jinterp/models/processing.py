"""TransformerLens-style weight processing: same function, weights easier to read.

- fold_ln: a pre-norm's weight (and bias) moves into the weights that read its output, leaving
  the norm as pure normalisation (w = 1, b = 0).
- center_writing_weights: every weight that writes to the residual stream has its mean over
  d_model removed (valid when every read of the residual goes through a LayerNorm, which
  subtracts the mean anyway).
- center_unembed: logits shift by a per-position constant, which softmax ignores.
- fold_value_biases: value biases pass through attention unchanged (pattern rows sum to 1),
  so they become part of the output bias.

Each option is None (apply where valid), True (apply, or raise if it cannot apply), or False.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jinterp.models.layers import Norm
from jinterp.models.transformer import Transformer


def _applies(option: bool | None, valid: bool, name: str, why: str) -> bool:
    if option is True and not valid:
        raise ValueError(f"{name}=True does not apply to this model: {why}")
    return bool(valid and option is not False)


def process_weights(model: Transformer, *, fold_ln: bool | None = None, center_writing_weights: bool | None = None,
                    center_unembed: bool | None = None, fold_value_biases: bool | None = None) -> Transformer:
    """Return a processed copy of ``model`` with the same next-token probabilities."""
    cfg = model.cfg
    pre_norm = cfg.norm is not None and cfg.norm_placement in ("pre", "sandwich")
    if _applies(fold_ln, pre_norm, "fold_ln", "it needs pre-norm blocks with a norm (BERT's post-norms cannot fold)"):
        model = _fold_ln(model)
    writes_centered = cfg.norm == "layer" and cfg.norm_placement == "pre" and not cfg.n_experts
    if _applies(center_writing_weights, writes_centered, "center_writing_weights",
                "only LayerNorm (pre-norm) models ignore the residual's mean; RMSNorm does not"):
        model = _center_writing_weights(model)
    if _applies(center_unembed, cfg.unembed and cfg.final_softcap is None, "center_unembed",
                "an encoder has no unembedding, and a soft cap on the logits (Gemma 2) does not commute with "
                "shifting them"):
        model = _center_unembed(model)
    if _applies(fold_value_biases, model.blocks.attn.b_V is not None, "fold_value_biases", "there are no value biases"):
        model = _fold_value_biases(model)
    return model


def _unit(norm: Norm) -> Norm:
    return Norm(jnp.ones_like(norm.w), None if norm.b is None else jnp.zeros_like(norm.b))


def _fold_ln(model: Transformer) -> Transformer:
    cfg, blocks = model.cfg, model.blocks
    attn, mlp = blocks.attn, blocks.mlp
    w1, b1 = blocks.ln1.w, blocks.ln1.b  # [L, D]

    def fold(W, bias, w, b):
        """W [L, ..., D, out] reads the norm's output: y = (n * w + b) W = n (w W) + b W."""
        folded = W * w.reshape(w.shape[0], *([1] * (W.ndim - 3)), w.shape[1], 1)
        if b is None:
            return folded, bias
        extra = jnp.einsum("ld,l...do->l...o", b, W)
        return folded, extra if bias is None else bias + extra

    W_Q, b_Q = fold(attn.W_Q, attn.b_Q, w1, b1)
    W_K, b_K = fold(attn.W_K, attn.b_K, w1, b1)
    W_V, b_V = fold(attn.W_V, attn.b_V, w1, b1)
    attn = dataclasses.replace(attn, W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b_Q, b_K=b_K, b_V=b_V)
    blocks = dataclasses.replace(blocks, attn=attn, ln1=_unit(blocks.ln1))
    if mlp is not None:
        w2, b2 = blocks.ln2.w, blocks.ln2.b
        if mlp.W_gate is not None and b2 is not None:
            raise ValueError("fold_ln cannot fold a LayerNorm bias into a gated MLP (no gate bias); use fold_ln=False")
        W_in, b_in = fold(mlp.W_in, mlp.b_in, w2, b2)
        W_gate = None if mlp.W_gate is None else fold(mlp.W_gate, None, w2, None)[0]
        mlp = dataclasses.replace(mlp, W_in=W_in, W_gate=W_gate, b_in=b_in)
        blocks = dataclasses.replace(blocks, mlp=mlp, ln2=_unit(blocks.ln2))
    if blocks.moe is not None:  # the router and the experts read ln2's output too
        w2, b2 = model.blocks.ln2.w, model.blocks.ln2.b
        if b2 is not None:
            raise ValueError("fold_ln cannot fold a LayerNorm bias into a mixture of experts (no router or expert "
                             "biases); use fold_ln=False")
        moe, rows = blocks.moe, w2[:, None, :, None]  # [L, D] -> the d_model axis of [L, n_experts, D, d_expert]
        moe = dataclasses.replace(
            moe, W_router=moe.W_router * w2[:, :, None], W_in=moe.W_in * rows, W_gate=moe.W_gate * rows,
            W_shared_gate=None if moe.W_shared_gate is None else moe.W_shared_gate * w2)
        blocks = dataclasses.replace(blocks, moe=moe, ln2=_unit(blocks.ln2))
    model = dataclasses.replace(model, blocks=blocks)

    if model.ln_final is not None and cfg.unembed:
        w, b = model.ln_final.w, model.ln_final.b
        W_U = w[:, None] * model.W_unembed  # unties tied embeddings
        b_U = model.b_U
        if b is not None:
            b_U = b @ model.W_unembed + (0 if b_U is None else b_U)
        model = dataclasses.replace(model, W_U=W_U, b_U=b_U, ln_final=_unit(model.ln_final))
    return _sync_config(model)


def _center(x, axis=-1):
    return x - x.mean(axis, keepdims=True)


def _center_writing_weights(model: Transformer) -> Transformer:
    blocks = model.blocks
    attn = dataclasses.replace(blocks.attn, W_O=_center(blocks.attn.W_O),
                               b_O=None if blocks.attn.b_O is None else _center(blocks.attn.b_O))
    blocks = dataclasses.replace(blocks, attn=attn)
    if blocks.mlp is not None:
        mlp = dataclasses.replace(blocks.mlp, W_out=_center(blocks.mlp.W_out),
                                  b_out=None if blocks.mlp.b_out is None else _center(blocks.mlp.b_out))
        blocks = dataclasses.replace(blocks, mlp=mlp)
    W_U = model.W_unembed if model.cfg.tied_embeddings else model.W_U  # W_E changes; keep the unembedding
    return _sync_config(dataclasses.replace(
        model, blocks=blocks, W_E=_center(model.W_E), W_U=W_U,
        W_pos=None if model.W_pos is None else _center(model.W_pos)))


def _center_unembed(model: Transformer) -> Transformer:
    b_U = None if model.b_U is None else _center(model.b_U)
    return _sync_config(dataclasses.replace(model, W_U=_center(model.W_unembed), b_U=b_U))


def _fold_value_biases(model: Transformer) -> Transformer:
    cfg, attn = model.cfg, model.blocks.attn
    b_V = jnp.repeat(attn.b_V, cfg.group_size, axis=1)  # kv head -> each query head that reads it
    extra = jnp.einsum("lhe,lhed->ld", b_V, attn.W_O)
    b_O = extra if attn.b_O is None else attn.b_O + extra
    attn = dataclasses.replace(attn, b_V=jnp.zeros_like(attn.b_V), b_O=b_O)
    return _sync_config(dataclasses.replace(model, blocks=dataclasses.replace(model.blocks, attn=attn)))


def _sync_config(model: Transformer) -> Transformer:
    """Keep the config's structural flags in step with the parameters processing created."""
    mlp = model.blocks.mlp
    if mlp is not None and (mlp.b_in is None) != (mlp.b_out is None):  # the config has one flag for both
        zeros_like_bias = lambda W: jnp.zeros(W.shape[::2], W.dtype)  # W [L, in, out] -> bias [L, out]
        mlp = dataclasses.replace(mlp, b_in=zeros_like_bias(mlp.W_in) if mlp.b_in is None else mlp.b_in,
                                  b_out=zeros_like_bias(mlp.W_out) if mlp.b_out is None else mlp.b_out)
        model = dataclasses.replace(model, blocks=dataclasses.replace(model.blocks, mlp=mlp))
    attn = model.blocks.attn
    cfg = model.cfg.replace(
        qkv_bias=attn.b_Q is not None, out_bias=attn.b_O is not None,
        mlp_bias=mlp is not None and mlp.b_in is not None,
        tied_embeddings=model.cfg.unembed and model.W_U is None, unembed_bias=model.b_U is not None)
    return dataclasses.replace(model, cfg=cfg)
