"""Generation with a KV cache and interventions: transformers' greedy `generate`, the full forward, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY
from numerics import assert_refereed, run64

import jinterp
from jinterp.generation import filter_logits, generate
from jinterp.models.transformer import KVCache

PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]  # toy ids, left-padded to 5
STEPS = 6


def close(actual, expected, atol=1e-6, relative=True):
    """fp32 agreement of differently shaped computations: ``atol``, times the values' scale if ``relative``.
    The default, 8 eps32: the cached decode is another program than the full forward, though bit-equal here."""
    expected = np.asarray(expected)
    scale = max(1.0, np.abs(expected).max()) if relative else 1.0
    np.testing.assert_allclose(np.asarray(actual), expected, atol=atol * scale, rtol=0)


def full_forward(model, generation, run=jinterp.run, **options):
    """The no-cache forward over the prompts and the new tokens fed back (all but the last)."""
    sequence = generation.sequences[:, :-1]
    mask = np.concatenate([generation.prompt_mask, np.ones_like(generation.tokens[:, :-1], bool)], 1)
    return run(model, sequence, attention_mask=mask, **options)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox", "gemma2", "olmo2", "phi3", "phi3_longrope",
                                    "mixtral", "olmoe", "qwen3_moe", "qwen2_moe"])
def test_greedy_equals_transformers_and_cached_logits_equal_the_full_forward(reference, family):
    """Left-padded prompts of 3, 9 and 6 tokens; the sliding windows of Gemma 3 (4), Gemma 2 (3) and Phi-3 (4)
    are shorter than them."""
    import torch

    hf, _, model = reference(family)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, model.cfg.d_vocab, n).tolist() for n in (3, 9, 6)]
    ours = generate(model, None, prompts, 8, stop=(), capture=["logits"])
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(ours.prompt_tokens, dtype=torch.long),
                             attention_mask=torch.tensor(ours.prompt_mask, dtype=torch.long), max_new_tokens=8,
                             do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    prompt_len = ours.prompt_tokens.shape[1]
    np.testing.assert_array_equal(ours.tokens, theirs.sequences[:, prompt_len:].numpy())
    np.testing.assert_array_equal(ours.n_generated, [8, 8, 8])
    # float32 against transformers: measured 4.3e-6 x the logits' scale (gemma2, whose soft caps go through
    # XLA:CPU's float32 tanh, about 3x torch's rounding error), 1.6e-6 (gemma3) and less; the cache against no
    # cache: measured 1.5e-6 x scale (gemma2) and less; jinterp's float32 against its float64 run: measured
    # 3.1e-6 x scale (gemma2).
    steps = slice(prompt_len - 1, None)
    theirs = torch.stack(theirs.logits, 1).numpy()
    close(ours.captures["logits"], theirs, atol=3e-5)
    logits, _ = full_forward(model, ours)  # no cache
    close(ours.captures["logits"], logits[:, steps], atol=2e-5)
    exact, _ = full_forward(model, ours, run=run64)
    # The RMS error of jinterp's cached logits equals that of its full forward and of transformers' full forward
    # (measured); transformers' one-token decode steps round less than its own full forward: ratios up to 1.43
    # measured (llama 1.36, neox 1.43, olmo2 1.28, phi3 1.30), so a multiple of 3 here.
    assert_refereed(ours.captures["logits"], theirs, exact[:, steps], bound=2e-5 * np.abs(exact).max(), ratio=3.0,
                    what=family)


def test_edits_and_captures_during_generation_equal_the_full_forward(toy):
    """Steering at every position, a head ablation, and an edit at two positions (the prompt's last
    token, -1, and new token 2's slot, P + 2) equal the same edits in one forward over the result."""
    prompt_len = 5
    vector = jax.random.normal(jax.random.key(1), (TOY.d_model,))
    common = [jinterp.Add("blocks.1.resid_post", vector, 3.0), jinterp.Zero("blocks.0.attn.z", heads=[1])]
    placed = jinterp.Add("blocks.2.resid_pre", -2 * vector, positions=[-1, prompt_len + 2])
    sites = ["logits", "blocks.*.resid_post", "blocks.1.attn.pattern", "blocks.0.attn.z", "blocks.2.mlp.post"]
    ours = generate(toy, None, PROMPTS, STEPS, stop=(), edits=[*common, placed], capture=sites)
    as_run = jinterp.Add("blocks.2.resid_pre", -2 * vector, positions=[prompt_len - 1, prompt_len + 2])
    logits, cache = full_forward(toy, ours, edits=[*common, as_run], capture=sites[1:])

    steps = slice(prompt_len - 1, None)  # the positions whose logits chose the new tokens
    close(ours.captures["logits"], logits[:, steps])
    np.testing.assert_array_equal(ours.tokens, np.asarray(logits[:, steps]).argmax(-1))
    for layer in range(TOY.n_layers):
        close(ours.captures[f"blocks.{layer}.resid_post"], cache[f"blocks.{layer}.resid_post"][:, steps])
    close(ours.captures["z", 0], cache["z", 0][:, steps])
    assert not np.asarray(ours.captures["z", 0])[:, :, 1].any()
    close(ours.captures["blocks.2.mlp.post"], cache["blocks.2.mlp.post"][:, steps])
    pattern = np.asarray(ours.captures["blocks.1.attn.pattern"])  # keys over all P + STEPS cache slots
    assert pattern.shape == (3, TOY.n_heads, STEPS, prompt_len + STEPS)
    close(pattern[..., :-1], cache["blocks.1.attn.pattern"][:, :, steps])
    assert not pattern[..., -1].any()

    unedited, _ = full_forward(toy, ours)
    assert np.abs(np.asarray(unedited[:, steps]) - np.asarray(ours.captures["logits"])).max() > 1.0  # measured 6.7


def test_stop_tokens_end_rows_independently(toy):
    free = generate(toy, None, PROMPTS, STEPS, stop=())
    first = free.tokens[0, 2]
    assert first not in free.tokens[0, :2]
    pair = free.tokens[1, 3:5].tolist()
    stopped = generate(toy, None, PROMPTS, STEPS, stop=[int(first), pair], capture=["blocks.0.resid_pre"])

    def expected_length(row):
        for t in range(STEPS):
            if row[t] == first or row[max(t - 1, 0):t + 1].tolist() == pair:
                return t + 1
        return STEPS

    lengths = [expected_length(row) for row in free.tokens]
    assert lengths[0] == 3 and lengths[1] <= 5  # measured 3 and 5
    np.testing.assert_array_equal(stopped.n_generated, lengths)
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(stopped.tokens[row, :n], free.tokens[row, :n])
        assert (stopped.tokens[row, n:] == 0).all()  # the pad id (no tokenizer: 0)
        assert not np.asarray(stopped.captures["blocks.0.resid_pre"])[row, n:].any()


def test_sampling_is_seeded_and_top_k_1_is_greedy(toy, monkeypatch):
    greedy = generate(toy, None, PROMPTS, STEPS, stop=())
    traces, empty = [], KVCache.empty  # a new trace of the decode program makes a new empty cache
    monkeypatch.setattr(KVCache, "empty", lambda *args: traces.append(args) or empty(*args))
    hot = [generate(toy, None, PROMPTS, STEPS, stop=(), temperature=t, seed=seed).tokens
           for t, seed in ((5.0, 0), (5.0, 0), (5.0, 1), (2.0, 1))]
    assert len(traces) == 1, "new seeds and temperatures must reuse the compiled decode loop"
    np.testing.assert_array_equal(hot[0], hot[1])
    assert (hot[0] != hot[2]).any() and (hot[0] != greedy.tokens).any()
    top_1 = generate(toy, None, PROMPTS, STEPS, stop=(), temperature=0.7, top_k=1, seed=5)
    np.testing.assert_array_equal(top_1.tokens, greedy.tokens)


def test_top_p_and_top_k_by_hand():
    probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda filtered: np.isfinite(np.asarray(filtered))  # noqa: E731
    # sorted: 0.5, 0.2, 0.15, 0.1, 0.05; cumulative before each: 0, 0.5, 0.7, 0.85, 0.95
    np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.75)), [False, True, False, True, True])
    np.testing.assert_array_equal(kept(filter_logits(logits, top_p=0.4)), [False, True, False, False, False])
    np.testing.assert_array_equal(kept(filter_logits(logits, top_p=1.0)), [True] * 5)
    np.testing.assert_array_equal(kept(filter_logits(logits, top_k=2)), [False, True, False, True, False])
    # top-k first, then top-p over what is left: renormalised 0.5/0.85, 0.2/0.85, 0.15/0.85
    np.testing.assert_array_equal(kept(filter_logits(logits, top_k=3, top_p=0.8)), [False, True, False, True, False])
    np.testing.assert_allclose(np.asarray(filter_logits(logits, top_p=0.75))[[1, 3, 4]], np.log(probs[[1, 3, 4]]),
                               rtol=1e-6)  # float32 logs, 8 eps32: measured 1.9e-8 relative


def test_filters_match_transformers_warpers():
    torch = pytest.importorskip("torch", reason="the `reference` extra (torch) is not installed")
    warpers = pytest.importorskip("transformers.generation.logits_process")
    logits = np.random.default_rng(0).normal(size=(6, 40)).astype(np.float32) * 3
    for top_k, top_p in ((5, None), (None, 0.3), (None, 0.9), (7, 0.6)):
        expected = torch.tensor(logits)
        if top_k is not None:
            expected = warpers.TopKLogitsWarper(top_k)(None, expected)
        if top_p is not None:
            expected = warpers.TopPLogitsWarper(top_p)(None, expected)
        ours = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected.numpy()), err_msg=f"{top_k} {top_p}")


def test_bad_inputs_are_refused_clearly(toy):
    with pytest.raises(ValueError, match="Prompt 1 .* is empty"):
        generate(toy, None, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="exceeds this model's context of n_ctx=24"):
        generate(toy, None, PROMPTS, 20)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generate(toy, None, PROMPTS, 0)
    for temperature in (-1.0, float("nan"), "hot"):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            generate(toy, None, PROMPTS, 3, temperature=temperature)
    with pytest.raises(ValueError, match="set temperature > 0"):
        generate(toy, None, PROMPTS, 3, top_k=5)
    with pytest.raises(ValueError, match="top_p must be a number in"):
        generate(toy, None, PROMPTS, 3, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match=r"top_k must be an int in 1\.\.53"):
        generate(toy, None, PROMPTS, 3, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="position -6 is before the prompt"):
        generate(toy, None, PROMPTS, 3, edits=jinterp.Zero("blocks.0.resid_pre", positions=[-6]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(toy, None, PROMPTS, 3, stop=[TOY.d_vocab])
    with pytest.raises(ValueError, match="String prompts need a tokenizer"):
        generate(toy, None, ["hello"], 3)
    patched = jinterp.Replace("blocks.0.resid_pre", np.zeros((3, 5, TOY.d_model), np.float32))  # [batch, P, d]
    with pytest.raises(ValueError, match="every decode step one"):
        generate(toy, None, PROMPTS, 3, edits=patched)
    encoder = jinterp.Transformer.init(TOY.replace(causal=False, unembed=False), jax.random.key(0))
    with pytest.raises(ValueError, match="generate needs a decoder"):
        generate(encoder, None, PROMPTS, 3)
