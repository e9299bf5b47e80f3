"""jinterp: JAX-native, functional mechanistic interpretability."""

from jinterp._numerics import prefer_accurate_cpu_float32

prefer_accurate_cpu_float32()

from jinterp.cache import Cache, run, sites
from jinterp.interventions import Add, At, Capture, Edit, Intervention, Replace, Scale, Zero, chain
from jinterp.loading import LoadError, Tokenizer, load, models
from jinterp.models import Config, Transformer
from jinterp.models.processing import process_weights

__all__ = [
    "Add", "At", "Cache", "Capture", "Config", "Edit", "Intervention", "LoadError", "Replace", "Scale", "Tokenizer",
    "Transformer", "Zero", "chain", "load", "models", "process_weights", "run", "sites",
]
