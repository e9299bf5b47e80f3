"""HF-format model directories (``config.json`` + safetensors) -> ``Config`` and ``Transformer``.

Supported ``model_type``s: see ``ARCHITECTURES``. Weights are read one tensor at a time from
the safetensors files (never unpickled) and converted into jinterp's layout:
W_Q ``[n_heads, d_model, d_head]``, W_O ``[n_heads, d_head, d_model]``, W_in ``[d_model, d_mlp]``, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jinterp.loading.errors import LoadError, json_object
from jinterp.loading.limits import check_counts, check_fits
from jinterp.models import flat
from jinterp.models.config import Config

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


class HFConfig:
    """config.json with errors that name the file and the key."""

    def __init__(self, data: dict, path: Path):
        self.data, self.path = data, path

    def __getitem__(self, key):
        if key not in self.data or self.data[key] is None:
            raise LoadError(self.path, f"missing required key {key!r} for model_type {self.data.get('model_type')!r}")
        return self.data[key]

    def get(self, key, default=None):
        value = self.data.get(key)
        return default if value is None else value

    def act(self, key: str, default: str | None = None) -> str:
        name = self.get(key, default)
        if name not in ACTIVATIONS:
            raise LoadError(self.path, f"unsupported activation {key}={name!r}; supported: {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[name]

    def rope(self, layer_type: str | None = None, theta_default: float = 10_000.0):
        """(theta, scaling) from either `rope_parameters` (transformers 5) or legacy keys."""
        params = self.get("rope_parameters", {})
        if layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        theta = params.get("rope_theta", self.get("rope_theta", self.get("rotary_emb_base", theta_default)))
        scaling = params if params.get("rope_type", params.get("type", "default")) != "default" else None
        legacy = self.get("rope_scaling")
        if scaling is None and legacy and layer_type != "sliding_attention":
            scaling = legacy
        if not scaling:
            return float(theta), None
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in ("longrope", "su"):
            return float(theta), self.longrope(scaling)
        if kind not in ("linear", "llama3"):
            raise LoadError(self.path, f"unsupported rope scaling type {kind!r}; supported: 'default', 'linear', "
                                       "'llama3', 'longrope'")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return float(theta), (("type", kind),) + tuple((k, float(scaling[k])) for k in keys if k in scaling)

    def original_context(self) -> int | None:
        """longrope's original (pretraining) context: in ``rope_parameters`` (transformers 5) or top level."""
        found = self.get("rope_parameters", {}).get("original_max_position_embeddings")
        return found or self.get("original_max_position_embeddings")

    def longrope(self, scaling: dict) -> tuple:
        """Phi-3's longrope with its short factors and attention factor, as transformers computes them. Its long
        factors (for sequences beyond the original context) are not implemented: the context is capped there."""
        original, longest = self.original_context(), self["max_position_embeddings"]
        if not original or not isinstance(scaling.get("short_factor"), list):
            raise LoadError(self.path, "longrope needs original_max_position_embeddings and a short_factor list")
        factor = float(scaling.get("factor") or longest / original)
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return (("type", "longrope"), ("short_factor", tuple(float(f) for f in scaling["short_factor"])),
                ("attention_factor", float(attention)))

    def partial_rotary(self) -> float:
        params = self.get("rope_parameters", {})
        legacy = self.get("partial_rotary_factor", self.get("rotary_pct", 1.0))
        return float(params.get("partial_rotary_factor", legacy))

    def head_dim(self, d_model_key: str, heads_key: str) -> int:
        d_model, heads = self[d_model_key], self[heads_key]
        if d_model % heads:
            raise LoadError(self.path, f"{d_model_key}={d_model} is not a multiple of {heads_key}={heads}")
        return d_model // heads

    def layer_types(self, n_layers: int) -> tuple[str, ...] | None:
        types = self.get("layer_types")
        if types is None:
            return None
        mapping = {"full_attention": "global", "sliding_attention": "local"}
        for t in types:
            if t not in mapping:
                raise LoadError(self.path, f"unsupported layer type {t!r}; supported: {sorted(mapping)}")
        return tuple(mapping[t] for t in types)


class Tensors:
    """Lazy, named access to the tensors of one or more safetensors files."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise LoadError(index, "no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise LoadError(directory, "no model.safetensors or model.safetensors.index.json "
                                       "(only safetensors weights are read; pickled .bin files are refused)")
        self.handles: dict[Path, object] = {}
        self.where: dict[str, Path] = {}
        for name in files:
            path = directory / name
            if not path.exists():
                raise LoadError(path, "shard listed in the index is missing")
            try:
                handle = safe_open(str(path), framework="numpy", backend="pread")  # see store.LazyTensors
            except Exception as error:  # safetensors raises its own error types for bad headers
                raise LoadError(path, f"not a readable safetensors file ({error})") from None
            self.handles[path] = handle
            for key in handle.keys():
                self.where[key] = path

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def stored_values(self) -> int:
        """How many values the files hold, from their headers (which safetensors checks against the file length)."""
        return sum(math.prod(self.handles[path].get_slice(name).get_shape()) for name, path in self.where.items())

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.where:
            raise LoadError(next(iter(self.handles)), f"missing tensor {name!r}")
        path = self.where[name]
        try:
            array = self.handles[path].get_tensor(name)
        except Exception as error:
            raise LoadError(path, f"cannot read tensor {name!r} ({error})") from None
        if shape is not None and tuple(array.shape) != tuple(shape):
            raise LoadError(path, f"tensor {name!r} has shape {tuple(array.shape)}, config implies {tuple(shape)}")
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise LoadError(path, f"tensor {name!r} has non-float dtype {array.dtype}")
        return array.astype(np.float32)


# --- configs --------------------------------------------------------------------------------

def _llama_like(c: HFConfig, arch: str) -> Config:
    d_model, n_heads = c["hidden_size"], c["num_attention_heads"]
    n_layers = c["num_hidden_layers"]
    gemma3 = arch.startswith("gemma3")
    gemma = gemma3 or arch == "gemma2"
    theta, scaling = c.rope("full_attention" if gemma else None, 1_000_000.0 if gemma3 else 10_000.0)
    layer_types = c.layer_types(n_layers)
    if gemma and layer_types is None:  # Gemma 2: local and global layers alternate, local first
        pattern = c.get("sliding_window_pattern", 6 if gemma3 else 2)
        layer_types = tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(n_layers))
    window = c.get("sliding_window")
    if arch in ("mistral", "mixtral", "phi3") and window is not None and layer_types is None:  # every layer slides
        layer_types = ("local",) * n_layers
    if arch in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not c.get("use_sliding_window", False):
        layer_types = None
    experts = _experts(c, arch) if arch in MIXTURES else {}
    d_mlp = experts.pop("d_mlp") if experts else c["intermediate_size"]
    qwen2 = arch in ("qwen2", "qwen2_moe")
    if gemma and c.get("use_bidirectional_attention", False):
        raise LoadError(c.path, f"use_bidirectional_attention=True ({arch} embedding models) is not supported")
    d_head = c.get("head_dim") or c.head_dim("hidden_size", "num_attention_heads")
    # longrope's long factors (past the original context) are not implemented: the context ends there
    n_ctx = c.original_context() if scaling and dict(scaling)["type"] == "longrope" else c["max_position_embeddings"]
    return Config(
        d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads", n_heads),
        d_head=d_head, d_mlp=d_mlp, **experts, d_vocab=c["vocab_size"], n_ctx=n_ctx,
        norm="rms", norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        norm_placement="sandwich" if gemma else "post_sublayer" if arch == "olmo2" else "pre",
        act=c.act("hidden_activation" if gemma else "hidden_act", "gelu_pytorch_tanh" if gemma else "silu"),
        gated_mlp=True, positional="rotary", rotary_dim=int(d_head * c.partial_rotary()),
        rope_theta=theta, rope_scaling=scaling,
        rope_theta_local=c.rope("sliding_attention", c.get("rope_local_base_freq", 10_000.0))[0] if gemma3 else None,
        layer_types=layer_types, sliding_window=window if layer_types and "local" in layer_types else None,
        qk_norm=gemma3 or arch in ("qwen3", "qwen3_moe", "olmo2", "olmoe"),
        qk_norm_scope="all" if arch in ("olmo2", "olmoe") else "head",
        attn_scale=c["query_pre_attn_scalar"] ** -0.5 if gemma else None,
        attn_softcap=c.get("attn_logit_softcapping"), final_softcap=c.get("final_logit_softcapping"),
        embed_scale=math.sqrt(d_model) if gemma else 1.0,
        tied_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        qkv_bias=bool(c.get("qkv_bias", True)) if arch == "qwen2_moe" else arch == "qwen2" or bool(
            c.get("attention_bias", False)),
        out_bias=not qwen2 and bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        architecture=arch,
    )


MIXTURES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def _experts(c: HFConfig, arch: str) -> dict:
    """A mixture of experts' Config fields (and its shared expert's width as ``d_mlp``: 0 if none)."""
    if arch in ("qwen2_moe", "qwen3_moe"):
        if c.get("mlp_only_layers", []) or c.get("decoder_sparse_step", 1) != 1:
            raise LoadError(c.path, f"dense MLP layers among the expert layers (mlp_only_layers="
                                    f"{c.get('mlp_only_layers', [])}, decoder_sparse_step="
                                    f"{c.get('decoder_sparse_step', 1)}) are not supported")
    if arch == "olmoe" and c.get("clip_qkv") is not None:
        raise LoadError(c.path, f"clip_qkv={c.get('clip_qkv')} is not supported")
    shared = c.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0
    return dict(
        n_experts=c.get("num_experts") or c["num_local_experts"],  # (transformers 5 writes the second for Qwen)
        n_experts_per_token=c["num_experts_per_tok"],
        d_expert=c["intermediate_size"] if arch in ("mixtral", "olmoe") else c["moe_intermediate_size"],
        norm_topk=arch == "mixtral" or bool(c.get("norm_topk_prob", False)),
        d_mlp=shared, shared_expert_gate=shared > 0)


def _gpt2(c: HFConfig, arch: str) -> Config:
    if c.get("scale_attn_by_inverse_layer_idx", False):
        raise LoadError(c.path, "scale_attn_by_inverse_layer_idx=True is not supported")
    if not c.get("scale_attn_weights", True):
        raise LoadError(c.path, "scale_attn_weights=False is not supported")
    d_model, n_heads = c["n_embd"], c["n_head"]
    return Config(
        d_model=d_model, n_layers=c["n_layer"], n_heads=n_heads, d_head=c.head_dim("n_embd", "n_head"),
        d_mlp=c.get("n_inner", 4 * d_model), d_vocab=c["vocab_size"], n_ctx=c["n_positions"],
        norm="layer", norm_eps=float(c.get("layer_norm_epsilon", 1e-5)), act=c.act("activation_function", "gelu_new"),
        positional="learned", tied_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True,
        architecture=arch)


def _neox(c: HFConfig, arch: str) -> Config:
    d_model, n_heads = c["hidden_size"], c["num_attention_heads"]
    d_head = c.head_dim("hidden_size", "num_attention_heads")
    theta, scaling = c.rope()
    bias = bool(c.get("attention_bias", True))
    return Config(
        d_model=d_model, n_layers=c["num_hidden_layers"], n_heads=n_heads, d_head=d_head,
        d_mlp=c["intermediate_size"], d_vocab=c["vocab_size"], n_ctx=c["max_position_embeddings"],
        norm="layer", norm_eps=float(c.get("layer_norm_eps", 1e-5)), act=c.act("hidden_act", "gelu"),
        parallel=bool(c.get("use_parallel_residual", True)), positional="rotary",
        rotary_dim=int(d_head * c.partial_rotary()), rope_theta=theta, rope_scaling=scaling,
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bias, out_bias=bias, mlp_bias=True, architecture=arch)


def _bert(c: HFConfig, arch: str) -> Config:
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise LoadError(c.path, f"position_embedding_type={c.get('position_embedding_type')!r} is not supported; "
                                "supported: 'absolute'")
    d_model, n_heads = c["hidden_size"], c["num_attention_heads"]
    return Config(
        d_model=d_model, n_layers=c["num_hidden_layers"], n_heads=n_heads,
        d_head=c.head_dim("hidden_size", "num_attention_heads"),
        d_mlp=c["intermediate_size"], d_vocab=c["vocab_size"], n_ctx=c["max_position_embeddings"],
        norm="layer", norm_eps=float(c.get("layer_norm_eps", 1e-12)), norm_placement="post",
        act=c.act("hidden_act", "gelu"), causal=False, positional="learned",
        n_token_types=c.get("type_vocab_size", 2), embed_norm=True, unembed=False,
        qkv_bias=True, out_bias=True, mlp_bias=True, architecture=arch)


CONFIGS: dict[str, Callable[[HFConfig, str], Config]] = {
    "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like, "qwen3": _llama_like,
    "gemma3_text": _llama_like, "gemma3": _llama_like, "gemma2": _llama_like, "olmo2": _llama_like,
    "phi3": _llama_like, **dict.fromkeys(MIXTURES, _llama_like),
    "gpt2": _gpt2, "gpt_neox": _neox, "bert": _bert,
}
ARCHITECTURES = tuple(CONFIGS)
COUNTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "vocab_size", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "type_vocab_size", "num_experts",
          "num_local_experts", "moe_intermediate_size", "shared_expert_intermediate_size")


def config_from_hf(data: dict, path: Path) -> Config:
    """An HF ``config.json`` dict -> jinterp ``Config``."""
    arch = data.get("model_type")
    if arch == "gemma3" and isinstance(data.get("text_config"), dict):
        data = {**data["text_config"], "model_type": "gemma3_text"}
        arch = "gemma3_text"
    if not isinstance(arch, str) or arch not in CONFIGS:
        raise LoadError(path, f"unsupported model_type {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    # Counts are checked before a Config (which builds per-layer tuples) exists: a byte holds at
    # least one value, so no count may exceed the bytes of the weight files beside config.json.
    weight_bytes = sum(f.stat().st_size for f in Path(path).parent.glob("*.safetensors"))
    check_counts(path, weight_bytes, {key: data.get(key) for key in COUNTS})
    try:
        return CONFIGS[arch](HFConfig(data, path), arch)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as error:
        if isinstance(error, LoadError):
            raise
        raise LoadError(path, f"contradictory or invalid config: {error}") from None


# --- weights --------------------------------------------------------------------------------
# Each converter fills jinterp's flat parameter arrays (see jinterp.models.flat) from HF tensors.

def _prefix(tensors: Tensors, candidates: tuple[str, ...], probe: str) -> str:
    for prefix in candidates:
        if prefix + probe in tensors:
            return prefix
    raise LoadError(next(iter(tensors.handles)), f"no tensor named like {'|'.join(candidates)}{probe}; "
                                                 "is this the right architecture?")


def heads_in(w: np.ndarray, n: int, d_head: int) -> np.ndarray:
    """nn.Linear weight [n*d_head, d_model] -> [n, d_model, d_head]."""
    return w.reshape(n, d_head, -1).transpose(0, 2, 1)


def heads_out(w: np.ndarray, n: int, d_head: int) -> np.ndarray:
    """nn.Linear weight [d_model, n*d_head] -> [n, d_head, d_model]."""
    return w.T.reshape(n, d_head, -1)


def _convert_llama(t: Tensors, cfg: Config, out: dict) -> None:
    H, K, E, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    prefix = _prefix(t, ("model.", "model.language_model.", "language_model.model.", ""), "embed_tokens.weight")
    gemma = cfg.norm_placement == "sandwich"
    offset = 1.0 if gemma else 0.0  # Gemma's norms scale by (1 + w)
    norms = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    if gemma:
        norms = {"ln1": "input_layernorm", "ln1_post": "post_attention_layernorm",
                 "ln2": "pre_feedforward_layernorm", "ln2_post": "post_feedforward_layernorm"}
    elif cfg.norm_placement == "post_sublayer":  # OLMo 2
        norms = {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"}
    for i in range(cfg.n_layers):
        p = f"{prefix}layers.{i}."
        a = p + "self_attn."
        for ours, theirs in norms.items():
            out[f"blocks.{ours}.w"][i] = t.get(p + theirs + ".weight", (D,)) + offset
        if cfg.architecture == "phi3":  # fused rows: [q heads | k heads | v heads]
            q, k, v = np.split(t.get(a + "qkv_proj.weight", ((H + 2 * K) * E, D)), [H * E, (H + K) * E])
        else:
            q, k, v = (t.get(a + f"{n}_proj.weight", (n_ * E, D)) for n, n_ in (("q", H), ("k", K), ("v", K)))
        for n, w, heads in (("Q", q, H), ("K", k, K), ("V", v, K)):
            out[f"blocks.attn.W_{n}"][i] = heads_in(w, heads, E)
        out["blocks.attn.W_O"][i] = heads_out(t.get(a + "o_proj.weight", (D, H * E)), H, E)
        if cfg.qkv_bias:
            for n, heads in (("Q", H), ("K", K), ("V", K)):
                out[f"blocks.attn.b_{n}"][i] = t.get(a + f"{n.lower()}_proj.bias", (heads * E,)).reshape(heads, E)
        if cfg.out_bias:
            out["blocks.attn.b_O"][i] = t.get(a + "o_proj.bias", (D,))
        if cfg.qk_norm:  # over each head (d_head weights) or over all heads together (OLMo 2)
            each = cfg.qk_norm_scope == "head"
            for n, heads in (("q", H), ("k", K)):
                w = out[f"blocks.attn.{n}_norm.w"]
                w[i] = t.get(a + f"{n}_norm.weight", (E,) if each else (heads * E,)).reshape(w.shape[1:]) + offset
        if cfg.n_experts:
            _convert_experts(t, cfg, out, i, p)
        if not cfg.has_dense_mlp:
            continue
        mlp = p + ("mlp.shared_expert." if cfg.n_experts else "mlp.")  # a mixture's shared expert (Qwen2-MoE)
        if cfg.architecture == "phi3":  # fused rows: [gate | up]
            gate, up = np.split(t.get(mlp + "gate_up_proj.weight", (2 * M, D)), 2)
        else:
            gate, up = t.get(mlp + "gate_proj.weight", (M, D)), t.get(mlp + "up_proj.weight", (M, D))
        out["blocks.mlp.W_gate"][i] = gate.T
        out["blocks.mlp.W_in"][i] = up.T
        out["blocks.mlp.W_out"][i] = t.get(mlp + "down_proj.weight", (D, M)).T
        if cfg.mlp_bias:
            if mlp + "gate_proj.bias" in t:
                raise LoadError(t.where[mlp + "gate_proj.bias"], "a bias on the MLP gate projection is not supported")
            out["blocks.mlp.b_in"][i] = t.get(mlp + "up_proj.bias", (M,))
            out["blocks.mlp.b_out"][i] = t.get(mlp + "down_proj.bias", (D,))
    out["W_E"] = t.get(prefix + "embed_tokens.weight", (cfg.d_vocab, D))
    out["ln_final.w"] = t.get(prefix + "norm.weight", (D,)) + offset
    if not cfg.tied_embeddings:
        head = "lm_head.weight" if "lm_head.weight" in t else "language_model.lm_head.weight"
        out["W_U"] = t.get(head, (cfg.d_vocab, D)).T


def _convert_experts(t: Tensors, cfg: Config, out: dict, i: int, p: str) -> None:
    """Layer ``i``'s router and experts: one tensor per expert and projection (as checkpoints store them), or
    transformers 5's fused ``experts.gate_up_proj`` ``[n_experts, 2 d_expert, d_model]`` and ``experts.down_proj``."""
    N, X, D = cfg.n_experts, cfg.d_expert, cfg.d_model
    moe = p + ("block_sparse_moe." if p + "block_sparse_moe.gate.weight" in t else "mlp.")  # (Mixtral's files)
    out["blocks.moe.W_router"][i] = t.get(moe + "gate.weight", (N, D)).T
    if moe + "experts.gate_up_proj" in t:
        gate_up = t.get(moe + "experts.gate_up_proj", (N, 2 * X, D))
        out["blocks.moe.W_gate"][i] = gate_up[:, :X].transpose(0, 2, 1)
        out["blocks.moe.W_in"][i] = gate_up[:, X:].transpose(0, 2, 1)
        out["blocks.moe.W_out"][i] = t.get(moe + "experts.down_proj", (N, D, X)).transpose(0, 2, 1)
    else:
        names = ("w1", "w3", "w2") if moe.endswith("block_sparse_moe.") else ("gate_proj", "up_proj", "down_proj")
        for j in range(N):
            e = f"{moe}experts.{j}."
            out["blocks.moe.W_gate"][i, j] = t.get(e + names[0] + ".weight", (X, D)).T
            out["blocks.moe.W_in"][i, j] = t.get(e + names[1] + ".weight", (X, D)).T
            out["blocks.moe.W_out"][i, j] = t.get(e + names[2] + ".weight", (D, X)).T
    if cfg.shared_expert_gate:
        out["blocks.moe.W_shared_gate"][i] = t.get(moe + "shared_expert_gate.weight", (1, D))[0]


def _convert_gpt2(t: Tensors, cfg: Config, out: dict) -> None:
    prefix = _prefix(t, ("transformer.", ""), "wte.weight")
    D, H, E, M = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    for i in range(cfg.n_layers):
        p = f"{prefix}h.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"blocks.{ours}.w"][i] = t.get(p + theirs + ".weight", (D,))
            out[f"blocks.{ours}.b"][i] = t.get(p + theirs + ".bias", (D,))
        # Conv1D weights are [in, out]: x @ W.
        qkv = np.split(t.get(p + "attn.c_attn.weight", (D, 3 * D)), 3, axis=1)
        qkv_bias = np.split(t.get(p + "attn.c_attn.bias", (3 * D,)), 3)
        for n, w, b in zip("QKV", qkv, qkv_bias):
            out[f"blocks.attn.W_{n}"][i] = w.reshape(D, H, E).transpose(1, 0, 2)
            out[f"blocks.attn.b_{n}"][i] = b.reshape(H, E)
        out["blocks.attn.W_O"][i] = t.get(p + "attn.c_proj.weight", (D, D)).reshape(H, E, D)
        out["blocks.attn.b_O"][i] = t.get(p + "attn.c_proj.bias", (D,))
        out["blocks.mlp.W_in"][i] = t.get(p + "mlp.c_fc.weight", (D, M))
        out["blocks.mlp.b_in"][i] = t.get(p + "mlp.c_fc.bias", (M,))
        out["blocks.mlp.W_out"][i] = t.get(p + "mlp.c_proj.weight", (M, D))
        out["blocks.mlp.b_out"][i] = t.get(p + "mlp.c_proj.bias", (D,))
    out["W_E"] = t.get(prefix + "wte.weight", (cfg.d_vocab, D))
    out["W_pos"] = t.get(prefix + "wpe.weight", (cfg.n_ctx, D))
    out["ln_final.w"] = t.get(prefix + "ln_f.weight", (D,))
    out["ln_final.b"] = t.get(prefix + "ln_f.bias", (D,))


def _convert_neox(t: Tensors, cfg: Config, out: dict) -> None:
    prefix = _prefix(t, ("gpt_neox.", ""), "embed_in.weight")
    D, H, E, M = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    for i in range(cfg.n_layers):
        p = f"{prefix}layers.{i}."
        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            out[f"blocks.{ours}.w"][i] = t.get(p + theirs + ".weight", (D,))
            out[f"blocks.{ours}.b"][i] = t.get(p + theirs + ".bias", (D,))
        # Fused projection rows are laid out [head, (q|k|v), d_head].
        qkv = t.get(p + "attention.query_key_value.weight", (3 * D, D)).reshape(H, 3, E, D)
        for j, n in enumerate("QKV"):
            out[f"blocks.attn.W_{n}"][i] = qkv[:, j].transpose(0, 2, 1)
        out["blocks.attn.W_O"][i] = heads_out(t.get(p + "attention.dense.weight", (D, D)), H, E)
        if cfg.qkv_bias:
            qkv_bias = t.get(p + "attention.query_key_value.bias", (3 * D,)).reshape(H, 3, E)
            for j, n in enumerate("QKV"):
                out[f"blocks.attn.b_{n}"][i] = qkv_bias[:, j]
            out["blocks.attn.b_O"][i] = t.get(p + "attention.dense.bias", (D,))
        out["blocks.mlp.W_in"][i] = t.get(p + "mlp.dense_h_to_4h.weight", (M, D)).T
        out["blocks.mlp.b_in"][i] = t.get(p + "mlp.dense_h_to_4h.bias", (M,))
        out["blocks.mlp.W_out"][i] = t.get(p + "mlp.dense_4h_to_h.weight", (D, M)).T
        out["blocks.mlp.b_out"][i] = t.get(p + "mlp.dense_4h_to_h.bias", (D,))
    out["W_E"] = t.get(prefix + "embed_in.weight", (cfg.d_vocab, D))
    out["ln_final.w"] = t.get(prefix + "final_layer_norm.weight", (D,))
    out["ln_final.b"] = t.get(prefix + "final_layer_norm.bias", (D,))
    if not cfg.tied_embeddings:
        out["W_U"] = t.get("embed_out.weight", (cfg.d_vocab, D)).T


def _bert_prefix(t: Tensors) -> str:
    return _prefix(t, ("bert.", ""), "embeddings.word_embeddings.weight")


def _convert_bert(t: Tensors, cfg: Config, out: dict) -> None:
    prefix = _bert_prefix(t)
    D, H, E, M = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp

    def norm(ours: str, theirs: str, i=None):
        weight, bias = (".weight", ".bias") if theirs + ".weight" in t else (".gamma", ".beta")
        for suffix, theirs_suffix in (("w", weight), ("b", bias)):
            value = t.get(theirs + theirs_suffix, (D,))
            if i is None:
                out[f"{ours}.{suffix}"] = value
            else:
                out[f"{ours}.{suffix}"][i] = value

    for i in range(cfg.n_layers):
        p = f"{prefix}encoder.layer.{i}."
        for n, theirs in zip("QKV", ("query", "key", "value")):
            out[f"blocks.attn.W_{n}"][i] = heads_in(t.get(p + f"attention.self.{theirs}.weight", (D, D)), H, E)
            out[f"blocks.attn.b_{n}"][i] = t.get(p + f"attention.self.{theirs}.bias", (D,)).reshape(H, E)
        out["blocks.attn.W_O"][i] = heads_out(t.get(p + "attention.output.dense.weight", (D, D)), H, E)
        out["blocks.attn.b_O"][i] = t.get(p + "attention.output.dense.bias", (D,))
        norm("blocks.ln1", p + "attention.output.LayerNorm", i)
        out["blocks.mlp.W_in"][i] = t.get(p + "intermediate.dense.weight", (M, D)).T
        out["blocks.mlp.b_in"][i] = t.get(p + "intermediate.dense.bias", (M,))
        out["blocks.mlp.W_out"][i] = t.get(p + "output.dense.weight", (D, M)).T
        out["blocks.mlp.b_out"][i] = t.get(p + "output.dense.bias", (D,))
        norm("blocks.ln2", p + "output.LayerNorm", i)
    e = prefix + "embeddings."
    out["W_E"] = t.get(e + "word_embeddings.weight", (cfg.d_vocab, D))
    out["W_pos"] = t.get(e + "position_embeddings.weight", (cfg.n_ctx, D))
    out["W_token_type"] = t.get(e + "token_type_embeddings.weight", (cfg.n_token_types, D))
    norm("ln_embed", e + "LayerNorm")
    if cfg.pooler:
        out["W_pool"] = t.get(prefix + "pooler.dense.weight", (D, D)).T
        out["b_pool"] = t.get(prefix + "pooler.dense.bias", (D,))


CONVERTERS = {"gpt2": _convert_gpt2, "gpt_neox": _convert_neox, "bert": _convert_bert}


def read_hf_dir(directory) -> tuple[Config, dict[str, np.ndarray]]:
    """An HF-format directory -> (config, flat float32 parameters)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise LoadError(directory, "no config.json; an HF-format directory needs config.json and safetensors weights")
    data = json_object(config_path)
    tensors = Tensors(directory)  # first: missing or pickled weights are the clearer error
    cfg = config_from_hf(data, config_path)
    if cfg.architecture == "bert":
        cfg = cfg.replace(pooler=_bert_prefix(tensors) + "pooler.dense.weight" in tensors)
    check_fits(cfg, tensors.stored_values(), config_path)
    arrays = flat.empty(cfg)
    CONVERTERS.get(cfg.architecture, _convert_llama)(tensors, cfg, arrays)
    return cfg, arrays
