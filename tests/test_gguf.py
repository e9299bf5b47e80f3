"""GGUF files: llama.cpp-layout files of the reference models load exactly; damaged files fail clearly."""

import numpy as np
import pytest
from conftest import random_tokens
from numerics import assert_refereed, run64

import jinterp
from jinterp import LoadError

torch = pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")
gguf_files = pytest.importorskip("gguf_files")


@pytest.fixture(scope="module")
def written(reference, tmp_path_factory):
    """family -> (HF model, path of its GGUF)."""
    out = {}
    for family in ("llama", "gemma3_gguf", "gemma2", "phi3", "phi3_longrope", "mixtral_gguf"):
        hf, _, _ = reference(family)
        path = tmp_path_factory.mktemp("gguf") / f"{family}.gguf"
        gguf_files.write(hf, family, path)
        out[family] = (hf, path)
    return out


@pytest.mark.parametrize("family", ["llama", "gemma3_gguf", "gemma2", "phi3", "phi3_longrope", "mixtral_gguf"])
def test_gguf_matches_the_model_it_was_written_from(written, family):
    """Llama files carry llama.cpp's q/k row permutation; Gemma files carry 1 + w norms (Gemma 2 also its soft
    caps and alternating windows); Phi-3 files keep the fused qkv and gate|up tensors (and longrope's factors);
    Mixtral files stack every expert's projections."""
    hf, path = written[family]
    model, tokenizer = jinterp.load(path, progress=False)
    tokens = random_tokens(model.cfg.d_vocab)
    with torch.no_grad():
        expected = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    # As tests/test_models_hf.py: 2e-5 x the logits' scale; measured 2.2e-6 x scale against transformers and 3.0e-6
    # against the float64 run (gemma2), 1.3e-6 and 1.7e-6 (gemma3_gguf).
    bound = 2e-5 * np.abs(expected).max()
    logits = np.asarray(model(tokens))
    np.testing.assert_allclose(logits, expected, atol=bound, rtol=0)
    assert_refereed(logits, expected, run64(model, tokens)[0], bound=bound, what=family)
    assert tokenizer.vocab_size == model.cfg.d_vocab and tokenizer.bos_token_id == 1


def _damaged(path, tmp_path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 3]
    elif how == "magic":
        data[:4] = b"GGUX"
    elif how == "header":  # flip bits in the counts and the first metadata entries
        for i in range(8, 64):
            data[i] ^= 0xFF
    elif how == "empty":
        data = bytearray()
    out = tmp_path / f"{how}.gguf"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("how", ["truncated", "magic", "header", "empty"])
def test_damaged_gguf_gives_a_clear_error(written, tmp_path, how):
    _, path = written["llama"]
    bad = _damaged(path, tmp_path, how)
    with pytest.raises(LoadError) as error:
        jinterp.load(bad, progress=False)
    assert str(bad) in str(error.value)


def test_nan_weights_are_refused(written, tmp_path):
    import gguf

    hf, _ = written["llama"]
    path = tmp_path / "nan.gguf"
    gguf_files.write(hf, "llama", path)
    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    tensor.data[0, 0] = np.nan
    del reader
    with pytest.raises(LoadError, match=r"nan.gguf: parameter 'blocks.mlp.W_in' has NaN or infinite values"):
        jinterp.load(path, progress=False)


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoadError, match=r"mamba.gguf: unsupported GGUF architecture 'mamba'; supported: llama, gemma3"):
        jinterp.load(path, progress=False)


def test_mixtral_experts_one_tensor_each_are_refused(tmp_path):
    """llama.cpp's old Mixtral layout (blk.N.ffn_gate.E.weight per expert) is refused by name."""
    import gguf

    path = tmp_path / "old-mixtral.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 16), (writer.add_embedding_length, 8),
                       (writer.add_feed_forward_length, 4), (writer.add_head_count, 2), (writer.add_vocab_size, 11),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_expert_count, 4),
                       (writer.add_expert_used_count, 2)):
        add(value)
    for j in range(4):
        writer.add_tensor(f"blk.0.ffn_gate.{j}.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoadError, match=r"old-mixtral.gguf: experts stored one tensor each .* expected "
                                        r"blk.N.ffn_gate_exps.weight"):
        jinterp.load(path, progress=False)


def test_not_a_path_or_name():
    with pytest.raises(LoadError, match=r"not a registered model name.*Did you mean 'smollm2-135m'"):
        jinterp.load("smollm2-135")
