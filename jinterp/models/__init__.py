"""Model definitions: one config, shared layers, one transformer module."""

from jinterp.models.config import Config
from jinterp.models.transformer import Transformer

__all__ = ["Config", "Transformer"]
