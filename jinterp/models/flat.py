"""A model's parameters as a flat ``{name: array}`` dict, the form weight files and converters use.

Names are the parameter paths (``W_E``, ``blocks.attn.W_Q``, ``blocks.ln1.w``, ...); block
parameters carry their leading ``n_layers`` axis. The config decides which names exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jinterp.models.config import Config
from jinterp.models.transformer import Transformer


def _name(path) -> str:
    return ".".join(str(getattr(key, "name", getattr(key, "key", key))) for key in path)


def skeleton(cfg: Config) -> Transformer:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves (no memory allocated)."""
    return jax.eval_shape(lambda: Transformer.init(cfg, jax.random.key(0)))


def shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every parameter name this config has, with its shape."""
    leaves = jax.tree_util.tree_flatten_with_path(skeleton(cfg))[0]
    return {_name(path): tuple(leaf.shape) for path, leaf in leaves}


def empty(cfg: Config) -> dict[str, np.ndarray]:
    """NaN-filled float32 arrays for every parameter, for converters to fill layer by layer
    (``from_flat`` refuses any NaN left behind)."""
    return {name: np.full(shape, np.nan, np.float32) for name, shape in shapes(cfg).items()}


def all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity, found through min and max (which propagate NaN) rather than an
    ``isfinite`` mask a quarter the array's size."""
    return array.size == 0 or bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def from_flat(cfg: Config, arrays, dtype=None, source="weights") -> Transformer:
    """Build a model from flat arrays, checking every name, shape and value.

    ``arrays`` is any mapping with ``pop``; each array is taken, checked and converted in turn,
    so peak memory stays near one copy of the model.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    cfg = cfg.replace(dtype=dtype.name)
    expected = shapes(cfg)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: parameters do not match the config: missing {missing}, unexpected {extra}")
    leaves = []
    for name, shape in expected.items():
        value = np.asarray(arrays.pop(name))
        if value.shape != shape:
            raise ValueError(f"{source}: parameter {name!r} has shape {value.shape}, config implies {shape}")
        if not all_finite(value):
            raise ValueError(f"{source}: parameter {name!r} has NaN or infinite values")
        # Wait for the host-to-device copy: until it completes XLA holds the host array, and
        # without the wait every array read so far could be held at once (two copies of the model).
        leaves.append(jnp.asarray(value, dtype).block_until_ready())
        del value
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(skeleton(cfg)), leaves)
