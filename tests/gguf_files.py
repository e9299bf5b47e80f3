"""Write small GGUF files from HF reference models, the way llama.cpp's converter lays them out."""

from __future__ import annotations

import math

import gguf
import numpy as np


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation for Llama-architecture files (rotate-half -> interleaved)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(hf, family: str, path, extra: dict | None = None) -> None:
    """Save ``hf`` (the "llama", "gemma3", "gemma2" or "phi3" test family) as an F32 GGUF with a byte-level
    vocabulary; ``extra``: more tensors by name (e.g. Phi-3's longrope factors)."""
    cfg = hf.config
    experts = getattr(cfg, "num_local_experts", None)  # Mixtral: llama.cpp's "llama" with experts
    arch = "llama" if experts else family.split("_")[0]
    gemma = arch in ("gemma2", "gemma3")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    state = {name: tensor.detach().numpy().astype(np.float32) for name, tensor in hf.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    if arch in ("gemma2", "phi3"):  # Gemma 2: alternating layers (llama.cpp's fixed pattern); Phi-3: all layers
        writer.add_sliding_window(cfg.sliding_window)
    if rope.get("rope_type") == "longrope":  # as llama.cpp's converter: factors as tensors, the attention factor
        original = rope["original_max_position_embeddings"]
        scale = cfg.max_position_embeddings / original
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
        extra = {"rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
                 "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32), **(extra or {})}
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    # A byte-level vocabulary: single characters of GPT-2's byte alphabet, no merges.
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0x100, 0x200)]
    tokens = ["<unk>", "<s>"] + alphabet[: cfg.vocab_size - 2]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_bos_token_id(1)
    prefix = "model."
    offset = 1.0 if gemma else 0.0  # llama.cpp stores Gemma norms as 1 + w

    def put(name, array):
        writer.add_tensor(name, np.ascontiguousarray(array, np.float32))

    for name, array in (extra or {}).items():
        put(name, array)
    put("token_embd.weight", state[prefix + "embed_tokens.weight"])
    put("output_norm.weight", state[prefix + "norm.weight"] + offset)
    if "lm_head.weight" in state and not cfg.tie_word_embeddings:
        put("output.weight", state["lm_head.weight"])
    norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    if gemma:
        norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(cfg.num_hidden_layers):
        p, b = f"{prefix}layers.{i}.", f"blk.{i}."
        for theirs, ours in norms.items():
            put(b + ours + ".weight", state[p + theirs + ".weight"] + offset)
        put(b + "attn_output.weight", state[p + "self_attn.o_proj.weight"])
        if arch == "phi3":  # llama.cpp keeps Phi-3's fused projections
            put(b + "attn_qkv.weight", state[p + "self_attn.qkv_proj.weight"])
            put(b + "ffn_up.weight", state[p + "mlp.gate_up_proj.weight"])
            put(b + "ffn_down.weight", state[p + "mlp.down_proj.weight"])
            continue
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = _permute(q, cfg.num_attention_heads), _permute(k, cfg.num_key_value_heads)
        put(b + "attn_q.weight", q)
        put(b + "attn_k.weight", k)
        put(b + "attn_v.weight", state[p + "self_attn.v_proj.weight"])
        if arch == "gemma3":
            put(b + "attn_q_norm.weight", state[p + "self_attn.q_norm.weight"] + offset)
            put(b + "attn_k_norm.weight", state[p + "self_attn.k_norm.weight"] + offset)
        if experts:  # the router, and each projection of every expert stacked in one tensor
            # (transformers 5 holds them so in memory: gate_up_proj [experts, 2 d_expert, d_model])
            gate, up = np.split(state[p + "mlp.experts.gate_up_proj"], 2, axis=1)
            put(b + "ffn_gate_inp.weight", state[p + "mlp.gate.weight"])
            put(b + "ffn_gate_exps.weight", gate)
            put(b + "ffn_up_exps.weight", up)
            put(b + "ffn_down_exps.weight", state[p + "mlp.experts.down_proj"])
            continue
        put(b + "ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", state[p + "mlp.up_proj.weight"])
        put(b + "ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
