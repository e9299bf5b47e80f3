"""jinterp: JAX-native, functional mechanistic interpretability."""

from jinterp._numerics import prefer_accurate_cpu_float32

prefer_accurate_cpu_float32()

from jinterp import ablation, attribution, circuits, das, lens, patching, probes, sae, train, tuned_lens
from jinterp.cache import Cache, run, sites
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

__all__ = [
    "Add", "At", "Cache", "Capture", "Config", "Edit", "Interchange", "Intervention", "LoadError", "Project",
    "Replace", "Scale", "Tokenizer", "Transformer", "Zero", "ablation", "attribution", "chain", "circuits", "das",
    "lens", "load", "models", "patching", "probes", "process_weights", "run", "sae", "sites", "train", "tuned_lens",
]
