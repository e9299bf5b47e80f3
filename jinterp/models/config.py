"""The frozen configuration every jinterp transformer is built from.

One config describes every family (Llama, Gemma 3, GPT-2, GPT-NeoX, BERT, toy models):
the families differ only in which shared layers the config switches on.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
NORMS = ("layer", "rms")
NORM_PLACEMENTS = ("pre", "post", "sandwich", "post_sublayer")
QK_NORM_SCOPES = ("head", "all")
POSITIONALS = ("rotary", "learned")
LAYER_TYPES = ("global", "local")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # longrope: its short factors (Phi-3), see layers
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: the numerics referee (needs jax x64)


def choose(value, choices, what: str):
    """Return ``value`` if it is one of ``choices``, else raise naming the closest ones."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"Unknown {what} {value!r}; valid choices: {', '.join(map(repr, choices))}.{hint}")


def check_x64() -> None:
    """float64 parameters need JAX's 64-bit mode; without it JAX would silently make them float32."""
    import jax

    if not jax.config.read("jax_enable_x64"):
        raise ValueError("dtype float64 needs JAX's 64-bit mode, which is off: call "
                         "jax.config.update('jax_enable_x64', True) before creating any array (or set "
                         "JAX_ENABLE_X64=1 in the environment), then load the model again")


@dataclass(frozen=True)
class Config:
    """Hyperparameters of a transformer; frozen and hashable so it can be static under jit.

    Sizes use the literature's names: ``d_model``, ``n_heads``, ``n_kv_heads`` (grouped-query
    attention: ``n_heads`` must be a multiple), ``d_head``, ``d_mlp``, ``d_vocab``, ``n_ctx``.
    """

    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int = 0
    n_kv_heads: int | None = None  # None: ordinary multi-head attention

    # Blocks
    attn_only: bool = False
    parallel: bool = False  # GPT-NeoX: attention and MLP both read resid_pre
    norm: str | None = "layer"  # None: no layer norm at all (toy models)
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # "post" = BERT, "sandwich" = Gemma (norms before and after),
    # "post_sublayer" = OLMo 2 (a norm on each sublayer's output only, before the residual add)
    act: str = "gelu"
    gated_mlp: bool = False  # SwiGLU / GeGLU: act(x W_gate) * (x W_in)

    # Mixture of experts (Mixtral, Qwen-MoE, OLMoE): every block's MLP is n_experts gated experts of width
    # d_expert, mixed by a router's top-k softmax weights; d_mlp > 0 adds a dense shared expert (Qwen2-MoE)
    n_experts: int = 0  # 0: a dense MLP
    n_experts_per_token: int = 0  # top-k
    d_expert: int = 0
    norm_topk: bool = True  # renormalise the top-k weights to sum to 1 (Mixtral; Qwen's norm_topk_prob)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(x . w)

    # Attention
    causal: bool = True
    qk_norm: bool = False  # Gemma 3: RMS norm of each query and key head
    qk_norm_scope: str = "head"  # "head": over each head's features; "all": over every head's together (OLMo 2)
    attn_scale: float | None = None  # multiplies q.k; None: 1/sqrt(d_head)
    attn_softcap: float | None = None
    layer_types: tuple[str, ...] | None = None  # per layer "global" or "local"; None: all global
    sliding_window: int | None = None  # key k is visible to query q when q - k < window

    # Positions
    positional: str | None = "learned"  # None: no position information (toy models)
    rotary_dim: int | None = None  # None: the whole head (partial rotary: GPT-NeoX)
    rope_theta: float = 10_000.0
    rope_theta_local: float | None = None  # local layers' own base, unscaled (Gemma 3); None: the global rotary
    rope_scaling: tuple[tuple[str, float | str | tuple], ...] | None = None  # every layer unless rope_theta_local

    # Embedding and output
    embed_scale: float = 1.0  # Gemma: sqrt(d_model)
    n_token_types: int = 0  # BERT segment embeddings
    embed_norm: bool = False  # BERT: layer norm right after the embeddings
    final_norm: bool = True
    unembed: bool = True  # False: an encoder that returns hidden states
    tied_embeddings: bool = False
    pooler: bool = False  # BERT: tanh(W h_cls + b)
    final_softcap: float | None = None

    # Biases
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    unembed_bias: bool = False

    dtype: str = "float32"
    architecture: str = field(default="custom", compare=False)  # where it came from, for messages

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("d_model", "n_layers", "n_heads", "d_head", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.n_kv_heads is None:
            set_("n_kv_heads", self.n_heads)
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a positive multiple of n_kv_heads={self.n_kv_heads}")
        if self.n_experts:
            if self.attn_only or not self.gated_mlp:
                raise ValueError("a mixture of experts needs gated MLPs (gated_mlp=True) and attn_only=False")
            if not 0 < self.n_experts_per_token <= self.n_experts or self.d_expert <= 0:
                raise ValueError(f"a mixture of experts needs 0 < n_experts_per_token <= n_experts={self.n_experts} "
                                 f"and d_expert > 0, got n_experts_per_token={self.n_experts_per_token}, "
                                 f"d_expert={self.d_expert}")
        if self.shared_expert_gate and not (self.n_experts and self.d_mlp > 0):
            raise ValueError("shared_expert_gate needs a mixture of experts with a shared expert (d_mlp > 0)")
        if not self.attn_only and not self.n_experts and self.d_mlp <= 0:
            raise ValueError(f"d_mlp must be positive unless attn_only=True, got {self.d_mlp}")
        if self.norm is not None:
            choose(self.norm, NORMS, "norm")
        choose(self.norm_placement, NORM_PLACEMENTS, "norm_placement")
        choose(self.qk_norm_scope, QK_NORM_SCOPES, "qk_norm_scope")
        choose(self.act, ACTIVATIONS, "activation")
        choose(self.dtype, DTYPES, "dtype")
        if self.dtype == "float64":
            check_x64()
        if self.positional is not None:
            choose(self.positional, POSITIONALS, "positional embedding")
        if self.norm is None and (self.norm_placement != "pre" or self.embed_norm or self.qk_norm):
            raise ValueError("norm=None excludes post/sandwich norms, embed_norm and qk_norm")
        if self.parallel and (self.attn_only or self.norm_placement != "pre"):
            raise ValueError("parallel attention+MLP needs an MLP and pre-norm blocks")
        if self.norm_placement == "post" and self.final_norm:
            set_("final_norm", False)  # a post-norm block already ends in a norm
        if self.rotary_dim is None:
            set_("rotary_dim", self.d_head)
        if self.positional == "rotary" and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.d_head):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and within (0, d_head={self.d_head}]")
        set_("layer_types", ("global",) * self.n_layers if self.layer_types is None else tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}")
        for kind in self.layer_types:
            choose(kind, LAYER_TYPES, "layer type")
        if "local" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError("local (sliding-window) layers need a positive sliding_window")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            choose(scaling.get("type"), ROPE_TYPES, "rope scaling type")
            if scaling["type"] == "longrope" and len(scaling.get("short_factor", ())) != self.rotary_dim // 2:
                raise ValueError(f"longrope needs short_factor with rotary_dim / 2 = {self.rotary_dim // 2} entries, "
                                 f"got {len(scaling.get('short_factor', ()))}")
            set_("rope_scaling", tuple(sorted(scaling.items())))
        if self.attn_scale is None:
            set_("attn_scale", 1.0 / math.sqrt(self.d_head))
        if self.unembed is False and (self.tied_embeddings or self.unembed_bias):
            raise ValueError("tied_embeddings/unembed_bias need unembed=True")

    @property
    def group_size(self) -> int:
        """Query heads per key/value head: query head h reads kv head h // group_size."""
        return self.n_heads // self.n_kv_heads

    @property
    def has_mlp(self) -> bool:
        """An MLP sublayer, dense or a mixture of experts."""
        return not self.attn_only

    @property
    def has_dense_mlp(self) -> bool:
        """A dense MLP: the whole MLP, or a mixture's shared expert."""
        return not self.attn_only and self.d_mlp > 0

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``Config.from_dict`` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown Config field(s) {unknown}; valid fields: {sorted(known)}")
        data = dict(data)
        if data.get("layer_types") is not None:
            data["layer_types"] = tuple(data["layer_types"])
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = tuple((key, tuple(value) if isinstance(value, list) else value)
                                         for key, value in data["rope_scaling"])
        return cls(**data)

    def replace(self, **changes) -> Config:
        """A copy with some fields changed (validated again)."""
        valid = [f.name for f in dataclasses.fields(self)]
        unknown = set(changes) - set(valid)
        if unknown:
            raise ValueError(f"Unknown Config field(s) {sorted(unknown)}; valid fields: {valid}")
        return dataclasses.replace(self, **changes)
