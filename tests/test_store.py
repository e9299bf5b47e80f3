"""The converted-weight cache: reused, verified, rebuilt when damaged, never half-written."""

import numpy as np
import pytest
from conftest import random_tokens

import jinterp
from jinterp.loading import store

gguf_files = pytest.importorskip("gguf_files")


@pytest.fixture
def gguf_path(reference, tmp_path, monkeypatch):
    monkeypatch.setenv("JINTERP_CACHE", str(tmp_path / "cache"))
    hf, _, _ = reference("llama")
    path = tmp_path / "llama.gguf"
    gguf_files.write(hf, "llama", path)
    return path


def test_second_load_reads_the_cache_not_the_gguf(gguf_path, monkeypatch):
    first, _ = jinterp.load(gguf_path, progress=False)
    entry = store.entry_dir(store.sha256(gguf_path))
    assert sorted(p.name for p in entry.iterdir()) == sorted([*store.FILES, "manifest.json"])

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(jinterp.loading, "read_gguf", no_conversion)
    second, tokenizer = jinterp.load(gguf_path, progress=False)
    tokens = random_tokens(first.cfg.d_vocab)
    assert np.array_equal(np.asarray(first(tokens)), np.asarray(second(tokens)))
    assert tokenizer.bos_token_id == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_entry_is_detected_and_rebuilt(gguf_path, damage):
    reference_model, _ = jinterp.load(gguf_path, progress=False)
    entry = store.entry_dir(store.sha256(gguf_path))
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[:100]))
    elif damage == "delete":
        (entry / "tokenizer.json").unlink()
    else:
        (entry / "manifest.json").write_text("{")
    with pytest.warns(UserWarning, match="is damaged"):
        model, _ = jinterp.load(gguf_path, progress=False)
    tokens = random_tokens(model.cfg.d_vocab)
    assert np.array_equal(np.asarray(model(tokens)), np.asarray(reference_model(tokens)))
    assert store.lookup(store.sha256(gguf_path)) == entry  # rebuilt and valid again


def test_a_crash_while_writing_leaves_no_entry(gguf_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr("safetensors.numpy.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        jinterp.load(gguf_path, progress=False)
    key = store.sha256(gguf_path)
    assert store.lookup(key) is None
    assert not list(store.entry_dir(key).parent.glob(".*")), "staging directory left behind"


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JINTERP_CACHE", str(tmp_path / "x"))
    assert store.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("JINTERP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.cache_dir() == tmp_path / "xdg" / "jinterp"
