"""Damaged model, tokenizer and checkpoint files give a clear error naming the file, never a crash,
a hang or an allocation sized by a lying header. benchmarks/fuzz.py runs thousands of these cases;
here hypothesis draws a few dozen, plus the regressions the long run found."""

import json

import numpy as np
import pytest
from fuzz_cases import TARGETS, attempt, hf_config, write_gguf, write_hf, write_seeds, write_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jinterp
from jinterp.loading import LoadError
from jinterp.loading.gguf import GGUFFile
from jinterp.loading.tokenizer import Tokenizer

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return write_seeds(tmp_path_factory.mktemp("seeds"))


def test_the_seeds_load(seeds):
    """The undamaged files read: a verdict of "clean" below means the damage was noticed."""
    model, tokenizer = jinterp.load(seeds["gguf"], progress=False)
    assert model.cfg.d_model == 8 and tokenizer.vocab_size == 12
    jinterp.load(seeds["hf"], progress=False)
    assert Tokenizer.from_file(seeds["tokenizer"]).encode("ab") == [2, 3]


@FAST
@given(target=st.sampled_from(TARGETS), seed=st.integers(0, 2**31))
def test_damaged_files_give_clear_errors(seeds, tmp_path_factory, target, seed):
    verdict, mutation, detail = attempt(target, seeds, tmp_path_factory.mktemp("case"), seed)
    assert verdict in ("ok", "clean"), f"{target} after {mutation}: {detail}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_a_truncated_gguf_names_the_file(seeds, tmp_path, cut):
    data = seeds["gguf"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(cut * len(data))])
    with pytest.raises(LoadError, match=str(path)):
        jinterp.load(path, progress=False)


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"])
@pytest.mark.parametrize("value", [2**31, 2**40, 2**63 - 1])
def test_absurd_gguf_sizes_are_refused_before_allocating(tmp_path, key, value):
    """Found by the fuzzer: block_count=2**32+1 made Config build a 4-billion-entry tuple (MemoryError)."""
    path = tmp_path / "m.gguf"
    write_gguf(path, {key: value})
    with pytest.raises(LoadError, match=rf"{path}: llama.{key}=[\d,]+ is larger than the weight files could hold"):
        jinterp.load(path, progress=False)


def test_sizes_that_pass_each_alone_but_not_together(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, {"block_count": 3000})  # under the file's bit count, but 3000 layers need far more values
    with pytest.raises(LoadError, match=r"imply [\d,]+ parameters, but the weights hold only 696 values"):
        jinterp.load(path, progress=False)


def test_gguf_metadata_of_the_wrong_type(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, {"attention.head_count": "eight"})
    with pytest.raises(LoadError, match="llama.attention.head_count must be a non-negative integer, got 'eight'"):
        jinterp.load(path, progress=False)


def test_gguf_tensors_of_a_wrong_dtype(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, tensor_dtype=np.int32)
    with pytest.raises(LoadError, match=str(path)):
        jinterp.load(path, progress=False)


@pytest.mark.parametrize("changes, message", [
    ({"model_type": {"a": 1}}, r"unsupported model_type \{'a': 1\}; supported: llama"),
    ({"num_attention_heads": 0}, "contradictory or invalid config"),
    ({"num_hidden_layers": 2**40}, r"num_hidden_layers=1,099,511,627,776 is larger than the weight files"),
    ({"intermediate_size": 3e300}, "intermediate_size must be a non-negative integer, got 3e\\+300"),
    ({"hidden_size": True}, "hidden_size must be a non-negative integer, got True"),
])
def test_absurd_config_json(tmp_path, changes, message):
    write_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config() | changes))
    with pytest.raises(LoadError, match=message) as error:
        jinterp.load(tmp_path, progress=False)
    assert str(tmp_path / "config.json") in str(error.value)


def test_safetensors_header_with_a_huge_length(tmp_path):
    write_hf(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=f"{weights}: not a readable safetensors file"):
        jinterp.load(tmp_path, progress=False)


def test_tokenizer_whose_unknown_token_is_missing(tmp_path):
    """Found by the fuzzer: the file loaded, and every encode of unknown text raised a bare Exception."""
    path = tmp_path / "tokenizer.json"
    write_tokenizer(path)
    data = json.loads(path.read_text())
    data["model"]["unk_token"] = "<nope>"
    path.write_text(json.dumps(data))
    with pytest.raises(LoadError, match=rf"{path}: the unknown token '<nope>' is not in the vocabulary"):
        Tokenizer.from_file(path)


def test_tokenizer_sidecar_that_is_not_an_object(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(LoadError, match="tokenizer_config.json: expected a JSON object, got list"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


def test_gguf_special_token_ids_outside_the_vocabulary(seeds):
    fields = GGUFFile(seeds["gguf"]).tokenizer_fields() | {"tokenizer.ggml.bos_token_id": 99}
    with pytest.raises(LoadError, match="bos_token_id=99 is outside the vocabulary of 12 tokens"):
        Tokenizer.from_gguf(fields, "x.gguf")


def test_gguf_array_longer_than_the_file(seeds, tmp_path):
    """Found by the fuzzer: an array of scalars declaring 2**62 items looped for ever in gguf's reader
    (reads past the end returned empty arrays instead of failing)."""
    data = bytearray(seeds["gguf"].read_bytes())
    key = b"tokenizer.ggml.token_type"
    count_at = data.index(key) + len(key) + 4 + 4  # after the key: value type (array), item type (int32)
    assert int.from_bytes(data[count_at: count_at + 8], "little") == 12
    data[count_at: count_at + 8] = (2**62).to_bytes(8, "little")
    path = tmp_path / "long.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=rf"{path}: damaged or unreadable GGUF.*past the end of the file"):
        jinterp.load(path, progress=False)


def test_a_gguf_with_nan_weights_is_not_cached(tmp_path):
    """Found by the fuzzer: the converted weights were cached before the NaN check, so loading the
    same file again failed naming the cache entry instead of the file."""
    path = tmp_path / "m.gguf"
    write_gguf(path)
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(np.inf).tobytes()  # the last value of the last tensor
    path.write_bytes(bytes(data))
    for _ in range(2):
        with pytest.raises(LoadError, match=rf"{path}: parameter '.*' has NaN or infinite values"):
            jinterp.load(path, progress=False)
