"""jinterp: JAX-native, functional mechanistic interpretability."""

from jinterp import (
    ablation,
    acdc,
    attention_view,
    attribution,
    byo,
    circuits,
    core,
    das,
    lens,
    llc,
    memory,
    models,
    moe,
    patching,
    probes,
    qkov,
    recipes,
    sae,
    sharding,
    train,
    tuned_lens,
)
from jinterp._allocator import reuse_freed_memory
from jinterp._compile import compiler_options
from jinterp.byo import site, wrap
from jinterp.cache import Cache
from jinterp.collection import collect
from jinterp.core import apply, run, sites
from jinterp.factored import FactoredMatrix
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
from jinterp.loading import LoadError, Tokenizer, load, named_models
from jinterp.models import Config, Transformer
from jinterp.models.processing import process_weights
from jinterp.protocol import Model
from jinterp.recipes import load_edits, save_edits
from jinterp.specs import SiteSpec
from jinterp.treescope_views import sweep_view

__all__ = [
    "Add", "At", "Cache", "Capture", "Config", "Edit", "FactoredMatrix", "Generation", "Interchange", "Intervention",
    "LoadError", "Model", "Project", "Replace", "Scale", "SiteSpec", "Tokenizer", "Transformer", "Zero", "ablation",
    "acdc", "apply", "attention_view", "attribution", "byo", "chain", "circuits", "collect", "compiler_options", "core",
    "das", "generate", "lens", "llc", "load", "load_edits", "memory", "models", "moe", "named_models", "patching",
    "probes", "process_weights", "qkov", "recipes", "reuse_freed_memory", "run", "sae", "save_edits", "sharding",
    "site", "sites", "sweep_view", "train", "tuned_lens", "wrap",
]
