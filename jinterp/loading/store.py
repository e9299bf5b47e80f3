"""The converted-weight cache: dequantised float32 weights as safetensors, keyed by the source's hash.

One directory per source under ``cache_dir()``: ``config.json`` (jinterp's config),
``model.safetensors``, ``tokenizer.json``, ``jinterp_tokenizer.json`` and, written last,
``manifest.json`` with every file's size and sha256. Entries are built in a temporary
directory and renamed into place, so a crash never leaves a half-written entry; an entry whose
files do not match its manifest is reported, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from jinterp.loading.tokenizer import Tokenizer
from jinterp.models.config import Config

FILES = ("config.json", "model.safetensors", "tokenizer.json", "jinterp_tokenizer.json")
FORMAT = 1  # bump when the layout of converted weights changes


def cache_dir() -> Path:
    """``$JINTERP_CACHE``, else ``$XDG_CACHE_HOME/jinterp``, else ``~/.cache/jinterp``."""
    if os.environ.get("JINTERP_CACHE"):
        return Path(os.environ["JINTERP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jinterp"


def sha256(path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def entry_dir(key: str) -> Path:
    return cache_dir() / f"v{FORMAT}-{key[:32]}"


def lookup(key: str) -> Path | None:
    """The verified entry for ``key``, or None (a damaged entry is removed with a warning)."""
    entry = entry_dir(key)
    if not entry.exists():
        return None
    problem = _verify(entry)
    if problem is None:
        return entry
    warnings.warn(f"jinterp cache entry {entry} is damaged ({problem}); rebuilding it", stacklevel=3)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _verify(entry: Path) -> str | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest"
    for name in FILES:
        path, expected = entry / name, manifest.get(name, {})
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("size"):
            return f"{name} has the wrong size"
        if sha256(path) != expected.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def store(key: str, cfg: Config, arrays: Mapping[str, np.ndarray], tokenizer: Tokenizer) -> Path:
    """Write an entry atomically and return its directory."""
    from safetensors.numpy import save_file

    final = entry_dir(key)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        (staging / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        save_file({name: np.ascontiguousarray(value) for name, value in arrays.items()},
                  str(staging / "model.safetensors"))
        tokenizer.save(staging)
        manifest = {name: {"size": (staging / name).stat().st_size, "sha256": sha256(staging / name)}
                    for name in FILES}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for path in staging.iterdir():  # make the bytes durable before the rename publishes them
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        try:
            os.rename(staging, final)
        except OSError:  # another process published the same entry first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


class LazyTensors(Mapping):
    """Tensors of a safetensors file, read one at a time when taken with ``pop``."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        # pread, not mmap: pages of a mapped file count in the process's RSS until the map closes,
        # so a mapped read would hold a second copy of the weights beside the device arrays.
        self.handle = safe_open(str(path), framework="numpy", backend="pread")
        self.names = list(self.handle.keys())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def pop(self, name: str) -> np.ndarray:
        value = self[name]
        self.names.remove(name)
        return value


def read(entry: Path) -> tuple[Config, LazyTensors, Tokenizer]:
    cfg = Config.from_dict(json.loads((entry / "config.json").read_text()))
    return cfg, LazyTensors(entry / "model.safetensors"), Tokenizer.from_file(entry / "tokenizer.json")
