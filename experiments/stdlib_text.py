"""Real English prose shipped with Python: the docstrings of the standard library's top-level
modules, gathered deterministically from their sources, split into training and held-out text
by module, and packed into token windows. Used by the experiments that train on text."""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path

import numpy as np

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def docstrings(source: str, min_words: int) -> list[str]:
    """The docstrings of a module, its classes and functions in source order, at least ``min_words`` long."""
    found = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text.split()) >= min_words:
                found.append(text)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def stdlib_documents(min_words: int = 12) -> dict[str, str]:
    """Module name -> its docstrings joined by blank lines, for the top-level modules of the
    standard library (``STDLIB/*.py``), in name order."""
    documents = {}
    for path in sorted(STDLIB.glob("*.py")):
        texts = docstrings(path.read_text(encoding="utf-8", errors="replace"), min_words)
        if texts:
            documents[path.stem] = "\n\n".join(texts)
    if not documents:
        raise FileNotFoundError(f"No standard-library sources with docstrings under {STDLIB}")
    return documents


def is_held_out(name: str, fraction: float) -> bool:
    """A fixed pseudo-random split by module name (the same on every machine and run)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def windows(tokenizer, documents: list[str], seq_len: int) -> np.ndarray:
    """The documents' tokens, each followed by EOS, packed and cut into ``[n, seq_len]`` (the remainder dropped)."""
    end = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream = np.array([t for text in documents for t in tokenizer.encode(text, prepend_bos=False) + end], np.int32)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)
