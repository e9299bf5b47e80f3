"""HF-format directories: sharded weights, dtype, and bad files that must fail clearly."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_tokens

import jinterp
from jinterp import LoadError


@pytest.fixture
def gpt2_dir(reference, tmp_path):
    _, directory, _ = reference("gpt2")
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    return copy


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_sharded_checkpoint_loads_the_same_model(reference, tmp_path):
    hf, directory, model = reference("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded, tokenizer = jinterp.load(tmp_path)
    tokens = random_tokens(model.cfg.d_vocab)
    assert np.array_equal(np.asarray(sharded(tokens)), np.asarray(model(tokens)))


def test_dtype_argument(reference):
    _, directory, _ = reference("gpt2")
    model, _ = jinterp.load(directory, dtype=jnp.bfloat16)
    assert model.cfg.dtype == "bfloat16" and model.blocks.attn.W_Q.dtype == jnp.bfloat16


def test_missing_config_key(gpt2_dir):
    edit_config(gpt2_dir, n_head=None)
    with pytest.raises(LoadError, match=r"config.json: missing required key 'n_head'"):
        jinterp.load(gpt2_dir)


def test_contradictory_config(gpt2_dir):
    edit_config(gpt2_dir, n_embd=61)  # not a multiple of n_head, and the tensors disagree
    with pytest.raises(LoadError, match=r"config.json: n_embd=61 is not a multiple of n_head=5"):
        jinterp.load(gpt2_dir)
    edit_config(gpt2_dir, n_embd=60, n_layer=5)  # more layers than the file holds
    with pytest.raises(LoadError, match=r"model.safetensors: missing tensor 'transformer.h.3.ln_1.weight'"):
        jinterp.load(gpt2_dir)


def test_tensor_with_the_wrong_shape(gpt2_dir):
    edit_config(gpt2_dir, n_inner=100)
    message = r"'transformer.h.0.mlp.c_fc.weight' has shape \(60, 240\), config implies \(60, 100\)"
    with pytest.raises(LoadError, match=message):
        jinterp.load(gpt2_dir)


def test_unsupported_architecture(gpt2_dir):
    edit_config(gpt2_dir, model_type="mamba")
    with pytest.raises(LoadError, match=r"unsupported model_type 'mamba'; supported: llama, mistral.*gpt2"):
        jinterp.load(gpt2_dir)


def test_unsupported_feature_is_refused(gpt2_dir):
    edit_config(gpt2_dir, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(LoadError, match="scale_attn_by_inverse_layer_idx"):
        jinterp.load(gpt2_dir)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_safetensors(gpt2_dir, damage):
    path = gpt2_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(LoadError, match=r"model.safetensors: (not a readable safetensors file|cannot read tensor)"):
        jinterp.load(gpt2_dir)


def test_pickled_weights_are_refused(gpt2_dir):
    (gpt2_dir / "model.safetensors").unlink()
    (gpt2_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LoadError, match="pickled .bin files are refused"):
        jinterp.load(gpt2_dir)


def test_not_json(gpt2_dir):
    (gpt2_dir / "config.json").write_text("{oops")
    with pytest.raises(LoadError, match="config.json: not valid JSON"):
        jinterp.load(gpt2_dir)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        jinterp.load(tmp_path)
