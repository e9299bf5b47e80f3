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
            if "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator) if param.ndim == 1 and name.endswith(("weight", "gamma")) else 0.2 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(INIT * torch.randn(param.shape, generator=generator) / max(1, param.shape[-1]) ** 0.5 * 3)
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
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=199, n_embd=60, n_layer=3, n_head=5, n_positions=48)),
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
