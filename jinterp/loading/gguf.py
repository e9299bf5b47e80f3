"""GGUF files (llama.cpp's format) -> ``Config``, float32 parameters and a ``Tokenizer``.

Read with the ``gguf`` package and dequantised with ``gguf.quants.dequantize``. llama.cpp's
converter permutes the rows of Llama-architecture q and k projections (for its interleaved
rotary); that permutation is undone here so the rotate-half rotary of the model code applies.
Gemma files store norm weights as ``1 + w`` already, which is what jinterp's norms use. Phi-3 files keep
their fused ``attn_qkv`` and ``ffn_up`` (gate | up) tensors, and longrope's factors as tensors. Mixtral files
(architecture ``llama`` with ``expert_count``) hold each projection of all experts in one tensor.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from jinterp.loading.errors import LoadError
from jinterp.loading.limits import check_counts, check_fits
from jinterp.loading.tokenizer import Tokenizer
from jinterp.models import flat
from jinterp.models.config import Config

ARCHITECTURES = ("llama", "gemma3", "gemma2", "phi3")


class GGUFFile:
    """An opened GGUF: metadata as Python values, tensors by name, every error naming the file."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                magic = handle.read(4)
        except OSError as error:
            raise LoadError(self.path, f"cannot read ({error.strerror})") from None
        if magic != b"GGUF":
            raise LoadError(self.path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        try:
            self.reader = _bounded_reader()(str(self.path))
        except Exception as error:  # the reader raises ValueError, IndexError, struct errors... on damage
            raise LoadError(self.path, f"damaged or unreadable GGUF ({type(error).__name__}: {error})") from None
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as error:
            raise LoadError(self.path, f"metadata {key!r} is damaged ({error})") from None

    def require(self, key: str):
        value = self.field(key)
        if value is None:
            raise LoadError(self.path, f"missing metadata key {key!r}")
        return value

    def tokenizer_fields(self) -> dict:
        return {key: self.field(key) for key in self.reader.fields if key.startswith("tokenizer.")}

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A dequantised tensor, shaped like the HF weight ``(out_features, in_features)``."""
        if name not in self.tensors:
            raise LoadError(self.path, f"missing tensor {name!r}")
        tensor = self.tensors[name]
        try:
            array = _dequantize(tensor.data, tensor.tensor_type)
        except Exception as error:
            raise LoadError(self.path, f"cannot dequantise tensor {name!r} ({type(error).__name__}: {error})") from None
        if array.shape != shape:
            if array.size != np.prod(shape):
                raise LoadError(self.path, f"tensor {name!r} has shape {array.shape}, metadata implies {shape}")
            array = array.reshape(shape)
        return array


ROWS = 4096  # rows dequantised at a time


def _dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """``gguf.quants.dequantize`` a block of rows at a time into one float32 array: its temporaries
    (several per value) would otherwise be a few times the size of the embedding matrix."""
    import gguf

    if data.ndim < 2 or len(data) <= ROWS:
        return np.asarray(gguf.quants.dequantize(data, qtype), np.float32)
    first = gguf.quants.dequantize(data[:ROWS], qtype)
    out = np.empty((len(data), *first.shape[1:]), np.float32)
    out[:ROWS] = first
    for start in range(ROWS, len(data), ROWS):
        out[start:start + ROWS] = gguf.quants.dequantize(data[start:start + ROWS], qtype)
    return out


@functools.cache
def _bounded_reader() -> type:
    import gguf  # lazily: importing it costs most of a second

    class BoundedReader(gguf.GGUFReader):
        """``GGUFReader`` that refuses to read past the end of the file. The stock reader returns
        an empty array there, so an array declaring 2**63 scalars loops (and grows) for ever."""

        def _get(self, offset, dtype, count=1, override_order=None):
            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if int(offset) < 0 or int(count) < 0 or end > len(self.data):
                raise ValueError(f"{int(count)} values of {np.dtype(dtype)} at byte {int(offset)} would end at byte "
                                 f"{end}, past the end of the file ({len(self.data)} bytes)")
            return super()._get(offset, dtype, count, override_order)

    return BoundedReader


def config_from_gguf(file: GGUFFile) -> Config:
    arch = file.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise LoadError(file.path, f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    get = lambda key, default=None: file.field(f"{arch}.{key}", default)  # noqa: E731
    need = lambda key: file.require(f"{arch}.{key}")  # noqa: E731
    d_model, n_heads, n_layers = need("embedding_length"), need("attention.head_count"), need("block_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    if isinstance(n_heads, list) or isinstance(n_kv_heads, list):
        raise LoadError(file.path, "per-layer head counts are not supported")
    # Bits bound the values a (quantised) file can hold: no count may exceed them.
    check_counts(file.path, file.path.stat().st_size * 8, {
        f"{arch}.embedding_length": d_model, f"{arch}.attention.head_count": n_heads, f"{arch}.block_count": n_layers,
        f"{arch}.attention.head_count_kv": n_kv_heads, f"{arch}.attention.key_length": get("attention.key_length"),
        f"{arch}.feed_forward_length": need("feed_forward_length"), f"{arch}.vocab_size": get("vocab_size"),
        f"{arch}.rope.dimension_count": get("rope.dimension_count"), f"{arch}.expert_count": get("expert_count")})
    if n_heads == 0:
        raise LoadError(file.path, f"{arch}.attention.head_count must be positive, got 0")
    try:
        return _config(file, arch, get, need, d_model, n_heads, n_layers, n_kv_heads)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as error:
        if isinstance(error, LoadError):
            raise
        raise LoadError(file.path, f"inconsistent metadata: {error}") from None


def _config(file, arch, get, need, d_model, n_heads, n_layers, n_kv_heads) -> Config:
    d_head = get("attention.key_length", d_model // n_heads)
    vocab = get("vocab_size") or len(file.require("tokenizer.ggml.tokens"))
    scaling = None
    if get("rope.scaling.type") not in (None, "none"):
        if get("rope.scaling.type") != "linear":
            raise LoadError(file.path, f"unsupported rope scaling {get('rope.scaling.type')!r}; supported: 'linear'")
        scaling = (("type", "linear"), ("factor", float(get("rope.scaling.factor"))))
    common = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head,
                  d_mlp=need("feed_forward_length"), d_vocab=vocab, n_ctx=need("context_length"), norm="rms",
                  norm_eps=float(need("attention.layer_norm_rms_epsilon")), gated_mlp=True, positional="rotary",
                  rotary_dim=get("rope.dimension_count", d_head), rope_theta=float(get("rope.freq_base", 10_000.0)),
                  rope_scaling=scaling, tied_embeddings="output.weight" not in file.tensors)
    if arch == "llama" and get("expert_count"):  # Mixtral: every block's MLP a mixture of experts
        if "blk.0.ffn_gate_exps.weight" not in file.tensors:
            raise LoadError(file.path, "experts stored one tensor each (blk.N.ffn_gate.E.weight, an old llama.cpp "
                                       "layout) are not supported; expected blk.N.ffn_gate_exps.weight")
        experts = dict(n_experts=need("expert_count"), n_experts_per_token=need("expert_used_count"),
                       d_expert=common["d_mlp"], d_mlp=0, norm_topk=bool(get("expert_weights_norm", True)))
        return Config(**{**common, **experts}, act="silu", architecture="mixtral")
    if arch == "llama":
        return Config(**common, act="silu", architecture="llama")
    if arch == "phi3":  # fused qkv and gate|up; every layer slides when a window is given
        window = get("attention.sliding_window")
        if "rope_factors_short.weight" in file.tensors:  # longrope, within the original context (see hf.py)
            short = file.tensor("rope_factors_short.weight", (common["rotary_dim"] // 2,))
            common.update(n_ctx=need("rope.scaling.original_context_length"), rope_scaling=(
                ("type", "longrope"), ("short_factor", tuple(float(f) for f in short)),
                ("attention_factor", float(get("rope.scaling.attn_factor", 1.0)))))
        return Config(**common, act="silu", layer_types=("local",) * n_layers if window else None,
                      sliding_window=window or None, architecture="phi3")
    # Gemma 3: every 6th layer global (the rest slide over 512 tokens); local rotary base 10k. Gemma 2: every
    # 2nd layer global (the rest slide over 4096 tokens), one rotary base, soft caps on scores and logits.
    # Queries scaled by head_dim^-1/2 (by (d_model / n_heads)^-1/2 for the 27Bs: 62 layers in Gemma 3, 46 in
    # Gemma 2), as llama.cpp does.
    gemma3 = arch == "gemma3"
    window = get("attention.sliding_window", 512 if gemma3 else 4096)
    scale_dim = d_model // n_heads if n_layers == (62 if gemma3 else 46) else d_head
    pattern = get("attention.sliding_window_pattern", 6 if gemma3 else 2)  # every n-th layer global, or flags
    if isinstance(pattern, list):
        layer_types = tuple("local" if sliding else "global" for sliding in pattern)
    else:
        layer_types = tuple("global" if (i + 1) % pattern == 0 else "local" for i in range(n_layers))
    caps = dict(attn_softcap=get("attn_logit_softcapping"), final_softcap=get("final_logit_softcapping"))
    return Config(**common, act="gelu_tanh", norm_placement="sandwich", qk_norm=gemma3, layer_types=layer_types,
                  sliding_window=window,
                  rope_theta_local=float(get("rope.freq_base_swa", 10_000.0)) if gemma3 else None,
                  attn_scale=scale_dim ** -0.5, embed_scale=math.sqrt(d_model), architecture=arch,
                  **{k: None if v is None else float(v) for k, v in caps.items()})


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves)."""
    d_head = w.shape[0] // n_heads
    return w.reshape(n_heads, d_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path, progress: bool = True) -> tuple[Config, dict[str, np.ndarray], Tokenizer]:
    """A GGUF file -> (config, flat float32 parameters, tokenizer)."""
    file = GGUFFile(path)
    cfg = config_from_gguf(file)
    tokenizer = Tokenizer.from_gguf(file.tokenizer_fields(), str(file.path))
    # A tensor cannot hold more values than its bytes have bits (the header's count can overflow).
    check_fits(cfg, sum(min(int(t.n_elements), t.data.nbytes * 8) for t in file.reader.tensors), file.path)
    H, K, E, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    gemma = cfg.architecture in ("gemma2", "gemma3")
    out = flat.empty(cfg)
    norms = {"ln1": "attn_norm", "ln2": "ffn_norm"}
    if gemma:
        norms.update(ln1_post="post_attention_norm", ln2_post="post_ffw_norm")
    layers = tqdm(range(cfg.n_layers), desc=f"Dequantising {file.path.name}", unit="layer", disable=not progress)
    for i in layers:
        get = lambda name, shape: file.tensor(f"blk.{i}.{name}.weight", shape)  # noqa: E731, B023
        for ours, theirs in norms.items():
            out[f"blocks.{ours}.w"][i] = get(theirs, (D,))
        if f"blk.{i}.attn_qkv.weight" in file.tensors:  # Phi-3: fused rows [q heads | k heads | v heads]
            q, k, v = np.split(get("attn_qkv", ((H + 2 * K) * E, D)), [H * E, (H + K) * E])
        else:
            q, k, v = get("attn_q", (H * E, D)), get("attn_k", (K * E, D)), get("attn_v", (K * E, D))
        if cfg.architecture in ("llama", "mixtral"):  # (the others use rotate-half rotary in llama.cpp too)
            q, k = unpermute_rotary(q, H), unpermute_rotary(k, K)
        for n, w, heads in (("Q", q, H), ("K", k, K), ("V", v, K)):
            out[f"blocks.attn.W_{n}"][i] = w.reshape(heads, E, D).transpose(0, 2, 1)
        out["blocks.attn.W_O"][i] = get("attn_output", (D, H * E)).T.reshape(H, E, D)
        if cfg.qk_norm:
            out["blocks.attn.q_norm.w"][i] = get("attn_q_norm", (E,))
            out["blocks.attn.k_norm.w"][i] = get("attn_k_norm", (E,))
        if cfg.n_experts:  # the router, and each projection of every expert in one tensor
            N, X = cfg.n_experts, cfg.d_expert
            out["blocks.moe.W_router"][i] = get("ffn_gate_inp", (N, D)).T
            out["blocks.moe.W_gate"][i] = get("ffn_gate_exps", (N, X, D)).transpose(0, 2, 1)
            out["blocks.moe.W_in"][i] = get("ffn_up_exps", (N, X, D)).transpose(0, 2, 1)
            out["blocks.moe.W_out"][i] = get("ffn_down_exps", (N, D, X)).transpose(0, 2, 1)
            continue
        if cfg.architecture == "phi3":  # ffn_up holds [gate | up]
            gate, up = np.split(get("ffn_up", (2 * M, D)), 2)
        else:
            gate, up = get("ffn_gate", (M, D)), get("ffn_up", (M, D))
        out["blocks.mlp.W_gate"][i] = gate.T
        out["blocks.mlp.W_in"][i] = up.T
        out["blocks.mlp.W_out"][i] = get("ffn_down", (D, M)).T
    del out["W_E"]  # dropped before the embedding is read, so placeholder and embedding never coexist
    out["W_E"] = file.tensor("token_embd.weight", (cfg.d_vocab, D))
    out["ln_final.w"] = file.tensor("output_norm.weight", (D,))
    if not cfg.tied_embeddings:
        out["W_U"] = file.tensor("output.weight", (cfg.d_vocab, D)).T
    for name, array in out.items():  # checked here, before the arrays are cached under the file's hash
        if not flat.all_finite(array):
            raise LoadError(file.path, f"parameter {name!r} has NaN or infinite values")
    return cfg, out, tokenizer
