"""Loading models from disk: HF-format directories (and, with the weights issue, GGUF and named models)."""

from pathlib import Path

from jinterp.loading.errors import LoadError
from jinterp.loading.hf import load_hf_dir


def load(source, dtype=None):
    """Load a model: ``model, tokenizer = jinterp.load(source, dtype=None)``.

    ``source``: a path to an HF-format directory (config.json + model.safetensors or a sharded
    index). ``dtype``: e.g. ``jnp.bfloat16``; default float32.
    """
    path = Path(source)
    if path.is_dir():
        return load_hf_dir(path, dtype), None
    raise LoadError(path, "not an HF-format model directory")


__all__ = ["LoadError", "load", "load_hf_dir"]
