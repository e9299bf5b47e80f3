"""Small random-initialised transformers models with awkward sizes, one per family.

Built offline from configs (no hub) and saved as HF-format directories (config.json +
safetensors), so jinterp loads them through the same path as real checkpoints.
"""

from __future__ import annotations

import torch
import transformers as tf

INIT = 0.3  # larger than the usual 0.02 so activations and patterns are far from trivial


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter (norm weights and biases too) random values, so no weight is trivially 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            if is_norm and param.ndim == 1 and name.endswith(("weight", "gamma")):
                param.copy_(1.0 + 0.2 * noise)  # norm scales near 1
            elif is_norm:
                param.copy_(0.2 * noise)  # norm biases
            else:
                param.copy_(3 * INIT * noise / max(1, param.shape[-1]) ** 0.5)
    return model.eval()


FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=203, hidden_size=90, intermediate_size=100, num_hidden_layers=3, num_attention_heads=9,
        num_key_value_heads=3, head_dim=10, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)),
    "llama_tied_llama3rope": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=203, hidden_size=90, intermediate_size=100, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=10, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        tie_word_embeddings=True, attention_bias=True)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=211, hidden_size=84, intermediate_size=70, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=211, hidden_size=66, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=20, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}})),
    # As llama.cpp can describe it: queries scaled by head_dim^-1/2, a local rotary base of 10k.
    "gemma3_gguf": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=211, hidden_size=66, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}})),
    # Grouped-query heads of 14 features (heads x d_head != d_model), untied, a window of 3, soft caps that bind.
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        vocab_size=211, hidden_size=54, intermediate_size=70, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=14, max_position_embeddings=64, sliding_window=3, query_pre_attn_scalar=14,
        attn_logit_softcapping=1.5, final_logit_softcapping=3.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attn_implementation="eager")),
    # Norms on each sublayer's output only, q/k norms over all heads together; 9 query heads over 3 kv heads.
    "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(
        vocab_size=205, hidden_size=90, intermediate_size=76, num_hidden_layers=3, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        pad_token_id=1, bos_token_id=2, eos_token_id=3,
        attn_implementation="eager")),
    # Fused qkv and gate/up projections, half-rotary heads, every layer sliding over 4 tokens.
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
        vocab_size=209, hidden_size=72, intermediate_size=84, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3, attn_implementation="eager")),
    # Phi-3.5's longrope (short factors within the original context of 32, an attention factor for 64/32).
    "phi3_longrope": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
        vocab_size=209, hidden_size=72, intermediate_size=84, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=32, sliding_window=5,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 2.5, 7.0], "long_factor": [3.0, 5.0, 9.0]},
        tie_word_embeddings=False, pad_token_id=1, bos_token_id=2, eos_token_id=3, attn_implementation="eager")),
    # Mixtures of experts (transformers' "eager" experts: its grouped matmul needs 16-byte strides).
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=199, hidden_size=48, intermediate_size=20, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=5, num_experts_per_tok=2,
        sliding_window=4, tie_word_embeddings=False, attn_implementation="eager", experts_implementation="eager")),
    "mixtral_gguf": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(  # (llama.cpp's "llama": no window)
        vocab_size=199, hidden_size=48, intermediate_size=20, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=5, num_experts_per_tok=2,
        tie_word_embeddings=False, attn_implementation="eager", experts_implementation="eager")),
    "olmoe": lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(
        vocab_size=203, hidden_size=60, intermediate_size=18, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=64, num_experts=6, num_experts_per_tok=2,
        norm_topk_prob=False, pad_token_id=1, bos_token_id=2, eos_token_id=3, attn_implementation="eager",
        experts_implementation="eager")),
    "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=207, hidden_size=48, intermediate_size=30, moe_intermediate_size=14, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=10, max_position_embeddings=64, num_experts=5,
        num_experts_per_tok=3, norm_topk_prob=True, tie_word_embeddings=False, attn_implementation="eager",
        experts_implementation="eager")),
    "qwen2_moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        vocab_size=201, hidden_size=56, intermediate_size=30, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=64, num_experts=4,
        num_experts_per_tok=2, shared_expert_intermediate_size=22, norm_topk_prob=False, tie_word_embeddings=False,
        attn_implementation="eager", experts_implementation="eager")),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=199, n_embd=60, n_layer=3, n_head=5, n_positions=48, n_ctx=48)),  # n_ctx: read by TransformerLens
    "neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=197, hidden_size=72, intermediate_size=120, num_hidden_layers=3, num_attention_heads=3,
        max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.25}, use_parallel_residual=True)),
    "neox_sequential": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=197, hidden_size=72, intermediate_size=120, num_hidden_layers=2, num_attention_heads=6,
        max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5}, use_parallel_residual=False)),
    "bert": lambda: tf.BertModel(tf.BertConfig(
        vocab_size=197, hidden_size=60, intermediate_size=90, num_hidden_layers=2, num_attention_heads=5,
        max_position_embeddings=40, type_vocab_size=2)),
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _randomize(FAMILIES[family](), seed)


def save(model: torch.nn.Module, directory) -> None:
    model.save_pretrained(directory, safe_serialization=True)


# TransformerLens 3.9 builds these offline from a saved directory. Not covered: Gemma 3
# (TL 3.9 supports Gemma3ForCausalLM only by official name, with hard-coded sizes) and Llama
# with attention biases (TL's Llama conversion drops them).
TL_FAMILIES = ("gpt2", "llama", "qwen2", "neox", "neox_sequential", "bert")


def build_tl(family: str, hf: torch.nn.Module, directory=None):
    """A TransformerLens model with the same weights as ``hf`` (saved in ``directory``, if it is)."""
    import json
    import tempfile
    from pathlib import Path

    from transformer_lens import HookedEncoder, HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformer_lens.pretrained.weight_conversions import convert_bert_weights

    if directory is None:  # e.g. a model read from GGUF: TL reads its config from a directory
        hf.config.architectures = hf.config.architectures or [type(hf).__name__]
        directory = Path(tempfile.mkdtemp(prefix="tl-config-"))
        hf.config.save_pretrained(directory)
    if family == "bert":
        # TL reads BERT from a BertForMaskedLM config and a model with a pooler.
        full = tf.BertForPreTraining(hf.config)
        full.bert.load_state_dict(hf.state_dict())
        directory = Path(directory) / "bert_for_tl"
        save(full.eval(), directory)
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    cfg = tl_loading.get_pretrained_model_config(str(directory), hf_cfg=hf.config.to_dict(), fold_ln=False,
                                                 device="cpu")
    cfg.tokenizer_name = None  # no hub: TL would fetch a tokenizer
    if directory is None:  # e.g. a model read from GGUF: TL reads its config from a directory
        hf.config.architectures = hf.config.architectures or [type(hf).__name__]
        directory = Path(tempfile.mkdtemp(prefix="tl-config-"))
        hf.config.save_pretrained(directory)
    if family == "bert":
        model = HookedEncoder(cfg)
        model.load_state_dict(convert_bert_weights(full, cfg), strict=False)
    else:
        model = HookedTransformer(cfg)
        state = tl_loading.get_pretrained_state_dict(str(directory), cfg, hf_model=hf)
        model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.eval()
