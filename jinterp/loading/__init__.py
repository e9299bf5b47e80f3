"""Loading real models offline: named models, GGUF files, HF-format directories; tokenizers."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from jinterp.loading import registry, store
from jinterp.loading.errors import LoadError
from jinterp.loading.gguf import read_gguf
from jinterp.loading.hf import read_hf_dir
from jinterp.loading.registry import named_models
from jinterp.loading.tokenizer import Batch, Tokenizer
from jinterp.models import flat
from jinterp.models.config import DTYPES, check_x64
from jinterp.models.transformer import Transformer


def load(source=registry.DEFAULT, dtype=None, *, progress: bool = True) -> tuple[Transformer, Tokenizer | None]:
    """Load a model and its tokenizer: ``model, tokenizer = jinterp.load(source, dtype=None)``.

    ``source`` is a registered name (``jinterp.named_models()`` lists them; default ``smollm2-135m``),
    a path to a ``.gguf`` file (Llama and Gemma 3 architectures), or a path to an HF-format
    directory (``config.json`` + ``model.safetensors`` or a sharded index). GGUF weights are
    dequantised once and cached as float32 safetensors (see ``jinterp.loading.store``).
    ``dtype``: e.g. ``jnp.bfloat16``; default float32; ``jnp.float64`` (with JAX's 64-bit mode on)
    is the numerics referee: the same weights computed in double precision. No torch, no network.
    """
    if dtype is not None and (not _is_dtype(dtype) or jnp.dtype(dtype).name not in DTYPES):
        raise ValueError(f"Unknown dtype {dtype!r}; valid choices: {', '.join(DTYPES)} (or None for float32)")
    if dtype is not None and jnp.dtype(dtype) == jnp.float64:
        check_x64()
    named = None
    if isinstance(source, str) and not Path(source).exists():
        named = registry.resolve(source)
        if named.sha256 and (entry := store.lookup(named.sha256)):
            return _from_entry(entry, dtype)
        source = registry.locate(named)
    path = Path(source)
    if path.is_dir():
        cfg, arrays = read_hf_dir(path)
        tokenizer = Tokenizer.from_file(path / "tokenizer.json") if (path / "tokenizer.json").exists() else None
        return _build(cfg, arrays, dtype, path), tokenizer
    if path.is_file():
        key = named.sha256 if named and named.sha256 else store.sha256(path)
        if entry := store.lookup(key):
            return _from_entry(entry, dtype)
        cfg, arrays, tokenizer = read_gguf(path, progress=progress)
        store.store(key, cfg, arrays, tokenizer)
        return _build(cfg, arrays, dtype, path), tokenizer
    raise LoadError(path, f"no such file or directory; pass a registered name ({', '.join(registry.MODELS)}), "
                          "a .gguf file or an HF-format directory")


def _is_dtype(dtype) -> bool:
    try:
        jnp.dtype(dtype)
        return True
    except TypeError:
        return False


def _build(cfg, arrays, dtype, source) -> Transformer:
    try:
        return flat.from_flat(cfg, arrays, dtype, source=str(source))
    except ValueError as error:
        raise LoadError(source, str(error).removeprefix(f"{source}: ")) from None


def _from_entry(entry: Path, dtype):
    cfg, arrays, tokenizer = store.read(entry)
    return _build(cfg, arrays, dtype, entry), tokenizer


__all__ = ["Batch", "LoadError", "Tokenizer", "load", "named_models"]
