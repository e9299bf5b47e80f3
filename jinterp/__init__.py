"""jinterp: JAX-native, functional mechanistic interpretability."""

from jinterp import (
    ablation,
    attention_view,
    attribution,
    byo,
    circuits,
    das,
    lens,
    llc,
    memory,
    patching,
    probes,
    sae,
    sharding,
    train,
    tuned_lens,
)
from jinterp._allocator import reuse_freed_memory
from jinterp._compile import compiler_options
from jinterp.byo import site, wrap
from jinterp.cache import Cache, run, sites
from jinterp.collection import collect
from jinterp.generation import Generation, generate
from jinterp.interventions import (
    Add,
    At,
    Capture,
    Edit,
    Interchange,
    Intervention,
    Project,
    Replace,
    Scale,
    Zero,
    chain,
)
from jinterp.loading import LoadError, Tokenizer, load, models
from jinterp.models import Config, Transformer
from jinterp.models.processing import process_weights
from jinterp.treescope_views import sweep_view

__all__ = [
    "Add", "At", "Cache", "Capture", "Config", "Edit", "Generation", "Interchange", "Intervention", "LoadError",
    "Project", "Replace", "Scale", "Tokenizer", "Transformer", "Zero", "ablation", "attention_view", "attribution",
    "byo", "chain", "circuits", "collect", "compiler_options", "das", "generate", "lens", "llc", "load", "memory",
    "models", "patching", "probes", "process_weights", "reuse_freed_memory", "run", "sae", "sharding", "site",
    "sites", "sweep_view", "train", "tuned_lens", "wrap",
]
