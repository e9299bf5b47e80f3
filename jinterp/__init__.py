"""jinterp: JAX-native, functional mechanistic interpretability."""

from jinterp.cache import Cache, run, sites
from jinterp.interventions import Add, At, Capture, Edit, Intervention, Replace, Scale, Zero, chain
from jinterp.loading import LoadError, load
from jinterp.models import Config, Transformer

__all__ = [
    "Add", "At", "Cache", "LoadError", "load", "Capture", "Config", "Edit", "Intervention", "Replace", "Scale",
    "Transformer", "Zero", "chain", "run", "sites",
]
