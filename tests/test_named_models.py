"""The registered real models against transformers on the same weights (GGUF read by transformers,
MiniLM's safetensors directory): logits, residual stream, tokenizers, known completions."""

import jax
import numpy as np
import pytest
from numerics import assert_refereed, run64
from texts import varied_strings

import jinterp
from jinterp.generation import generate

torch = pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")

PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to",
           "def fibonacci(n):\n    if n < 2:\n        return n", "In 1492, Columbus sailed the ocean blue. The",
           "Émilie a mangé 3 pommes 🍎 et", "The quick brown fox jumps over the lazy dog. " * 3]
DECODERS = ["smollm2-135m", "gemma3-270m"]


def hf_run(hf, tokens, mask):
    with torch.no_grad():
        out = hf(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                 output_hidden_states=True)
    return out


# Measured on the padded batch of PROMPTS (float32; the float64 run is jinterp's own, on the same weights):
#   logits, jinterp vs transformers: 1.10e-4 (SmolLM2), 9.7e-5 (Gemma 3): both libraries' float32 rounding,
#     of the same size (against float64: jinterp 1.47e-4 and 6.6e-5, transformers 8.2e-5 and 7.2e-5), adds;
#   residual stream, relative to each layer's largest value: 5.3e-6 (SmolLM2 layer 11, vs float64 4.2e-6),
#     2.4e-7 (Gemma 3; vs float64 2.6e-7);
#   RMS error against float64, jinterp's over transformers': at most 1.09 (logits) and 1.08 (residuals).
LOGITS_ATOL = 8e-4
RESID_REL = {"smollm2-135m": 3e-5, "gemma3-270m": 2e-6}


@pytest.mark.parametrize("name", DECODERS)
def test_logits_and_residual_stream_match_transformers(named, name):
    model, tokenizer, hf, _ = named(name)
    batch = tokenizer(PROMPTS)  # right-padded: HF positions are arange, so real tokens agree
    out = hf_run(hf, batch.tokens, batch.attention_mask)
    logits, cache = jinterp.run(model, batch.tokens, attention_mask=batch.attention_mask,
                                capture="blocks.*.resid_pre")
    exact_logits, exact = run64(model, batch.tokens, attention_mask=batch.attention_mask,
                                capture="blocks.*.resid_pre")
    real = batch.attention_mask
    ours, theirs = np.asarray(logits)[real], out.logits.numpy()[real]
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL, rtol=0)
    assert_refereed(ours, theirs, exact_logits[real], bound=LOGITS_ATOL, what=f"{name} logits")
    for layer in range(model.cfg.n_layers):
        site = f"blocks.{layer}.resid_pre"
        ours, theirs = np.asarray(cache[site])[real], out.hidden_states[layer].numpy()[real]
        # Residual norms grow to 1e4 and more (massive activations): a bound relative to the layer's scale.
        bound = RESID_REL[name] * max(1.0, float(np.abs(theirs).max()))
        np.testing.assert_allclose(ours, theirs, atol=bound, rtol=0, err_msg=f"{name} resid_pre {layer}")
        assert_refereed(ours, theirs, exact[site][real], bound=bound, what=f"{name} {site}")


def top_token(model, tokenizer, prompt):
    logits = model(np.asarray([tokenizer.encode(prompt)]))
    probs = jax.nn.softmax(logits[0, -1])
    return tokenizer.decode([int(probs.argmax())]), float(probs.max())


def test_smollm2_knows_paris_and_the_ioi_answer(named):
    model, tokenizer, _, _ = named("smollm2-135m")
    token, p = top_token(model, tokenizer, "The capital of France is")
    assert token == " Paris" and p > 0.5  # measured p 0.77
    token, p = top_token(model, tokenizer, "When Mary and John went to the store, John gave a drink to")
    assert token == " Mary" and p > 0.5  # measured p 0.92


def test_gemma3_ioi_answer(named):
    model, tokenizer, _, _ = named("gemma3-270m")
    token, p = top_token(model, tokenizer, "When Mary and John went to the store, John gave a drink to")
    assert token == " Mary" and p > 0.5  # measured p 0.85


@pytest.mark.parametrize("name", DECODERS + ["minilm-l6"])
def test_tokenizer_ids_identical_to_transformers(named, name):
    _, tokenizer, _, hf_tokenizer = named(name)
    strings = varied_strings(240)
    mismatches = [(s, tokenizer.encode(s), hf_tokenizer(s)["input_ids"]) for s in strings
                  if tokenizer.encode(s) != hf_tokenizer(s)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} of {len(strings)} differ, e.g. {mismatches[:3]}"
    for s in strings[:60]:  # decoding what we encoded gives what transformers decodes
        assert tokenizer.decode(tokenizer.encode(s)) == hf_tokenizer.decode(hf_tokenizer(s)["input_ids"])


def test_smollm2_chat_template_matches_transformers(named):
    _, tokenizer, _, hf_tokenizer = named("smollm2-135m")
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And <b>3+3</b>?"}]
    for generation in (True, False):
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation) == expected


def test_minilm_embeddings_match_bertmodel(named):
    model, tokenizer, hf, hf_tokenizer = named("minilm-l6")
    sentences = ["A man is eating food.", "A man is riding a horse on a sunny day in the park.", "Hello!"]
    batch = tokenizer(sentences)
    hidden = model(batch.tokens, attention_mask=batch.attention_mask)
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in hf_tokenizer(sentences, padding=True).items()}).last_hidden_state
    exact, _ = run64(model, batch.tokens, attention_mask=batch.attention_mask)
    real = batch.attention_mask
    ours, theirs = np.asarray(hidden)[real], ref.numpy()[real]
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)  # measured 2.6e-6
    assert_refereed(ours, theirs, exact[real], bound=2e-5, what="MiniLM hidden states")
    sentence = np.asarray(model.pool(hidden, batch.attention_mask, "mean"))
    mask = torch.tensor(real, dtype=torch.float32)[..., None]
    expected = ((ref * mask).sum(1) / mask.sum(1)).numpy()
    np.testing.assert_allclose(sentence, expected, atol=1e-5, rtol=0)  # measured 1.0e-6


@pytest.mark.parametrize("name", DECODERS)
def test_processed_weights_give_the_same_probabilities(named, name):
    model, tokenizer, _, _ = named(name)
    processed = jinterp.process_weights(model)
    tokens = tokenizer(PROMPTS[:3]).tokens
    a = jax.nn.softmax(model(tokens), -1)
    b = jax.nn.softmax(processed(tokens), -1)
    # Folded and centred weights round differently over 18 to 30 layers: measured 7.6e-6 (SmolLM2), 4.7e-6.
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=4e-5, rtol=0)


def test_models_lists_what_is_registered_and_installed():
    listed = {m["name"]: m for m in jinterp.named_models()}
    assert set(listed) == {"smollm2-135m", "gemma3-270m", "minilm-l6"}
    assert listed["smollm2-135m"]["default"] and "Gemma" in listed["gemma3-270m"]["license"]
    assert all(isinstance(m["installed"], bool) for m in listed.values())


def test_greedy_generation_equals_transformers_on_smollm2(named):
    """jinterp.generate on a padded batch gives transformers' generate(do_sample=False) tokens and texts."""
    model, tokenizer, hf, hf_tokenizer = named("smollm2-135m")
    prompts = ["The capital of France is", "When Mary and John went to the store, John gave a drink to", "Hello"]
    ours = generate(model, tokenizer, prompts, 8)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(ours.prompt_tokens, dtype=torch.long),
                             attention_mask=torch.tensor(ours.prompt_mask, dtype=torch.long), max_new_tokens=8,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = theirs[:, ours.prompt_tokens.shape[1]:].numpy()
    np.testing.assert_array_equal(ours.tokens, new)
    assert ours.texts == hf_tokenizer.batch_decode(new, skip_special_tokens=True)
    assert ours.texts[0].strip().startswith("Paris")
