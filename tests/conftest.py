"""Shared fixtures: small reference models saved as HF-format directories, and toy jinterp models."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tests convert weights into their own cache, never the user's.
os.environ["JINTERP_CACHE"] = tempfile.mkdtemp(prefix="jinterp-test-cache-")

import jax
import numpy as np
import pytest

import jinterp

# A Llama-style toy with grouped-query attention (6 query heads over 2 kv heads) and odd sizes.
TOY = jinterp.Config(d_model=36, n_layers=3, n_heads=6, n_kv_heads=2, d_head=7, d_mlp=44, d_vocab=53, n_ctx=24,
                     norm="rms", positional="rotary", rotary_dim=6, act="silu", gated_mlp=True)


# An attention-only, norm-free model: its logits are linear in the last residual stream.
LINEAR = jinterp.Config(d_model=32, n_layers=2, n_heads=4, d_head=8, d_vocab=17, n_ctx=12, attn_only=True, norm=None,
                        positional="learned")


def corrupted_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random TOY tokens [3, 7] and a copy that differs at position 2 only."""
    clean = np.random.default_rng(seed).integers(0, TOY.d_vocab, (3, 7)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % TOY.d_vocab
    return clean, corrupt


def toy_metric(logits):
    """Mean logit difference of tokens 3 and 7 at the last position."""
    return (logits[:, -1, 3] - logits[:, -1, 7]).mean()


@pytest.fixture(scope="session")
def toy():
    return jinterp.Transformer.init(TOY, jax.random.key(0), std=0.3)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """family -> (torch model, saved directory, jinterp model); built once per session."""
    pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")
    pytest.importorskip("transformers", reason="the `reference` extra (transformers) is not installed")
    import hf_models

    built = {}

    def get(family: str):
        if family not in built:
            hf = hf_models.build(family)
            directory = tmp_path_factory.mktemp("ref")  # TL guesses architectures from names like "llama"
            hf_models.save(hf, directory)
            model, _ = jinterp.load(directory)
            built[family] = (hf, directory, model)
        return built[family]

    return get


@pytest.fixture(scope="session")
def named():
    """name -> (jinterp model, jinterp tokenizer, HF model, HF tokenizer) for the registered models."""
    pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")
    import torch
    import transformers

    built = {}

    def get(name: str):
        if name not in built:
            entry = jinterp.loading.registry.MODELS[name]
            if not jinterp.loading.registry.installed(entry):
                pytest.skip(f"{entry.package} is not installed (the Makefile installs it: {entry.install})")
            model, tokenizer = jinterp.load(name, progress=False)
            source = jinterp.loading.registry.locate(entry)
            if source.is_dir():
                hf = transformers.AutoModel.from_pretrained(source, dtype=torch.float32)
                hf_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
            else:
                hf = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                                       dtype=torch.float32)
                hf_tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            built[name] = (model, tokenizer, hf.eval(), hf_tokenizer)
        return built[name]

    return get


def random_tokens(d_vocab: int, shape=(2, 11), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, d_vocab, shape).astype(np.int32)
