"""The transformer's sites, declared once: traced from the forward itself.

Which site kinds a config has, in forward order, and which the forward computes only when an
intervention asks for them come from one abstract trace of the forward (no compute; once per
config) with a hook that records every site it reaches. Each kind's axes are its entry in the
vocabulary (``names.SITE_AXES``), their sizes the config's; the trace checks that every value the
forward hands to a site has that shape. Sites a ``Cache`` can compute on access from others
(``DERIVATIONS``) are declared here with the formulas the layer code itself uses, and the memory
estimate (``jinterp.memory``) sums these specs. Adding a site is one ``hook(...)`` call in the layer
code (and, for a new kind, one vocabulary entry).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jinterp import names as S
from jinterp._compile import jit
from jinterp.models.config import Config
from jinterp.models.layers import attention_scores, centred, head_results, mlp_post, pattern_of, per_head, query_chunk
from jinterp.specs import SiteSpec, Specs


class Kinds(NamedTuple):
    """A config's site kinds in forward order: before the blocks, in each block, after them."""

    head: tuple[str, ...]
    block: tuple[str, ...]
    tail: tuple[str, ...]
    on_demand: frozenset[str]  # computed only when captured or edited
    dtypes: tuple[tuple[str, np.dtype], ...]  # each kind's dtype (norm statistics: float32 at least)

    @property
    def top(self) -> tuple[str, ...]:
        return self.head + self.tail


class _Recorder:
    """A hook that asks for every site and records the kinds it reaches, checking their shapes."""

    def __init__(self, cfg: Config, found: list, on_demand: set, layer=None):
        self.cfg, self.found, self.on_demand, self.layer = cfg, found, on_demand, layer
        self.states, self.records = {}, {}

    def at_layer(self, layer, states):
        return _Recorder(self.cfg, self.found, self.on_demand, layer)

    def __call__(self, kind: str, value):
        expected = shape(self.cfg, kind, *TRACED) if kind in S.SITE_AXES else None
        if tuple(value.shape) != expected:
            raise AssertionError(f"jinterp's forward hands site {kind!r} a value of shape {value.shape}; its declared "
                                 f"axes {S.SITE_AXES.get(kind)} give {expected}")
        self.found.append((kind, self.layer is not None, np.dtype(value.dtype)))
        return value

    def wants(self, kind: str) -> bool:
        if kind not in CHUNKED:  # (the plain forward computes those too, a chunk of queries at a time)
            self.on_demand.add(kind)
        return True


TRACED = (1, 2)  # the (batch, seq) the declaration is traced at
CHUNKED = ("attn.scores", "attn.pattern")


@functools.lru_cache(maxsize=64)
def kinds(cfg: Config) -> Kinds:
    """The site kinds of a model with this config, traced from its forward."""
    from jinterp.models import flat  # the forward's module imports this one

    found, on_demand = [], set()
    recorder = _Recorder(cfg, found, on_demand)
    tokens = jax.ShapeDtypeStruct(TRACED, jnp.int32)
    jax.eval_shape(lambda model, t: model.forward(t, hook=recorder)[0], flat.skeleton(cfg), tokens)
    in_block = [kind for kind, inside, _ in found if inside]
    first = next((i for i, (_, inside, _) in enumerate(found) if inside), len(found))
    head = tuple(kind for kind, inside, _ in found[:first])
    tail = tuple(kind for kind, inside, _ in found[first:] if not inside)
    dtypes = tuple(dict((kind, dtype) for kind, _, dtype in found).items())
    return Kinds(head, tuple(dict.fromkeys(in_block)), tail, frozenset(on_demand), dtypes)


def shape(cfg: Config, kind: str, batch="batch", seq="pos", keys=None) -> tuple:
    """A site's shape: batch, sequence and key sizes as given (symbolic names by default), the rest the config's."""
    size = {"batch": batch, "pos": seq, "query_pos": seq, "key_pos": seq if keys is None else keys, "1": 1,
            "d_model": cfg.d_model, "d_head": cfg.d_head, "head": cfg.n_heads, "kv_head": cfg.n_kv_heads,
            "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "expert": cfg.n_experts}
    return tuple(size[axis] for axis in S.SITE_AXES[kind])


@functools.lru_cache(maxsize=256)
def site_specs(cfg: Config, batch="batch", seq="pos", n_logits=None, keys=None) -> Specs:
    """Every site of a model with this config, in forward order; ``n_logits``: the positions unembedded."""
    found = kinds(cfg)
    dtypes = dict(found.dtypes)
    # The plain forward holds the scores and weights of a chunk of queries at a time.
    chunk = min(1.0, query_chunk(seq) / seq) if isinstance(seq, int) else 1.0

    # A mixture's experts run one at a time: its working set is one expert's hidden values (gate, up, their
    # product) and output, [batch, pos, 3 d_expert + d_model], counted as that share of moe.expert_out.
    expert = (3 * cfg.d_expert + cfg.d_model) / (cfg.n_experts * cfg.d_model) if cfg.n_experts else 0.0

    def spec(kind, layer):
        size = shape(cfg, kind, batch, n_logits if kind == "logits" and n_logits is not None else seq, keys)
        held = chunk if kind in CHUNKED else expert if kind == "moe.expert_out" else 0.0 if kind in found.on_demand \
            else 1.0
        return SiteSpec(S.site_name(kind, layer), kind, layer, size, dtypes[kind], S.SITE_AXES[kind], held)

    specs = [spec(kind, None) for kind in found.head]
    specs += [spec(kind, layer) for layer in range(cfg.n_layers) for kind in found.block]
    specs += [spec(kind, None) for kind in found.tail]
    return Specs(specs)


# --- derived sites -------------------------------------------------------------------------------

class Derivation(NamedTuple):
    """How a site's value follows from others': ``sources`` (site kinds ``offset`` layers on);
    ``forced``: capture the sources just for it (they are no bigger), otherwise it is derived at
    the layers where the run captures its sources anyway; ``unedited``: sites whose edits the
    formula would miss."""

    sources: tuple[str, ...]
    forced: bool = True
    unedited: tuple[str, ...] = ()
    offset: int = 0


@functools.lru_cache(maxsize=64)
def derivations(cfg: Config) -> dict[str, Derivation]:
    """Sites whose captured value is a function of other sites': kind -> its derivation, in an
    order where a derivation's derived sources come first."""
    found = {"attn.result": Derivation(("attn.z",)),
             **{f"attn.{n}_input": Derivation(("resid_pre",)) for n in "qkv"}}
    # Scores from the queries and keys they are the products of (rotated ones, or unnormed ones
    # without rotary); [batch, heads, pos, pos] is the largest site of a long sequence.
    if cfg.positional == "rotary" or not cfg.qk_norm:
        keys = ("attn.rot_q", "attn.rot_k") if cfg.positional == "rotary" else ("attn.q", "attn.k")
        found["attn.scores"] = Derivation(keys, forced=False)
    found["attn.pattern"] = Derivation(("attn.scores",), forced=False)
    if cfg.has_dense_mlp:
        found["mlp.post"] = Derivation(("mlp.pre", "mlp.pre_linear") if cfg.gated_mlp else ("mlp.pre",), forced=False)
    if cfg.norm_placement == "post":  # the residual stream passes through norms: no sums to redo
        return found
    # A block's output is the next block's input, bit for bit (the last block's is captured).
    found["resid_post"] = Derivation(("resid_pre",), forced=False, unedited=("resid_pre",), offset=1)
    sequential = not (cfg.parallel or cfg.attn_only)
    if sequential:
        found["resid_mid"] = Derivation(("resid_pre", "attn_out"), forced=False)
    if cfg.has_mlp:
        found["mlp_in"] = Derivation(("resid_mid" if sequential else "resid_pre",))
    if cfg.norm is not None:
        found["ln1.normalized"] = Derivation(("resid_pre", "ln1.scale"), forced=False)
        if cfg.has_mlp:
            found["ln2.normalized"] = Derivation(("mlp_in", "ln2.scale"), forced=False)
    return found


def derive(cfg: Config, kind: str, values: list, W_O, masks) -> jax.Array:
    """The forward's own computation of ``kind`` from its sources' values (see ``derivations``);
    ``W_O`` is the layer's output projection, ``masks`` (global, local) the layer's attention mask."""
    if kind == "attn.result":
        return head_results(values[0], W_O)
    if kind == "resid_mid":
        return values[0] + values[1]
    if kind.endswith(".normalized"):
        return centred(values[0], cfg) / values[1]
    if kind == "attn.scores":
        return attention_scores(*values, masks, cfg)
    if kind == "attn.pattern":
        return pattern_of(values[0])
    if kind == "mlp.post":
        return mlp_post(cfg, *values)
    if kind in ("mlp_in", "resid_post"):
        return values[0]
    return per_head(values[0], cfg.n_heads if kind == "attn.q_input" else cfg.n_kv_heads)


@functools.lru_cache(maxsize=256)
def plan(cfg: Config, wanted: tuple, edited: frozenset) -> tuple[tuple, tuple]:
    """(captures, derived) for captures ``wanted`` (Capture interventions) in a run editing ``edited`` kinds:
    every derivable site (not edited in this run) the Cache can compute on access from sources
    captured anyway is left out, and for a forced derivation its source captured in its place.
    Memoised: a long capture list costs milliseconds to plan, a fair part of a small forward."""
    from jinterp.interventions import Capture

    every = tuple(range(cfg.n_layers))
    layers = {c.site: set(every if c.layers is None else c.layers) for c in wanted}
    derived = {}  # kind -> (sources, offset, layers)

    def available(kind) -> set:
        return layers.get(kind, set()) | (set(derived[kind][2]) if kind in derived else set())

    for kind, how in derivations(cfg).items():
        if kind not in layers or kind in edited or edited & set(how.unedited):
            continue
        if how.forced:
            for source in how.sources:
                missing = layers[kind] - available(source)
                if missing:
                    layers[source] = layers.get(source, set()) | missing
            chosen = layers.pop(kind)
        else:
            chosen = {layer for layer in layers[kind]
                      if all(layer + how.offset in available(source) for source in how.sources)}
            if not chosen:
                continue
            layers[kind] -= chosen
            if not layers[kind]:
                del layers[kind]
        derived[kind] = (how.sources, how.offset, tuple(sorted(chosen)))
    top = set(kinds(cfg).top)
    captures = []
    for kind, found in layers.items():
        original = next((c for c in wanted if c.site == kind), None)
        same = original is not None and set(every if original.layers is None else original.layers) == found
        captures.append(original if same else Capture(kind, None if kind in top else sorted(found)))
    return tuple(captures), tuple((kind, *how) for kind, how in derived.items())


class Formulas(NamedTuple):
    """The derived sites' formulas for a ``Cache`` (hashable: a static field)."""

    cfg: Config

    def __call__(self, kind: str, values: list, layer: int, extras) -> jax.Array:
        W_O, masks = extras
        local = masks is not None and self.cfg.layer_types[layer] == "local"
        return _compiled_derive(self.cfg, kind, values, None if W_O is None else W_O[layer],
                                None if masks is None else masks[local])


@jit
def _compiled_derive(cfg: Config, kind: str, values: list, W_O, masks) -> jax.Array:
    return derive(cfg, kind, values, W_O, masks)  # compiled like the forward (jinterp._compile)
