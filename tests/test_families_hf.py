"""Gemma 2, OLMo 2 and Phi-3 against transformers on the same random weights, unpadded and padded on either
side: logits, every residual-stream state (HF hidden states) and every attention pattern (HF attention
weights), refereed by jinterp's own float64 run; and what each family's configuration switches on matters."""

import dataclasses

import numpy as np
import pytest
from conftest import edit_config, random_tokens
from numerics import RATIO, assert_refereed, run64

torch = pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")

import jinterp
from jinterp import LoadError

FAMILIES = ("gemma2", "olmo2", "phi3", "phi3_longrope")
# jinterp vs transformers in float32, times the values' scale (largest magnitude, at least 1), as in
# test_models_hf.py: measured at most 2.6e-6 (gemma2; every family, site and padding). The same bound holds
# jinterp's float32 to its float64 run: measured 2.3e-6 x scale (gemma2). RMS ratios (numerics.RATIO, 1.5):
# measured at most 1.10 for logits and hidden states, 1.14 for gemma2's patterns pooled over layers (its
# soft cap goes through XLA:CPU's float32 tanh, whose RMS error is 3x torch's), 1.05 for the others'.
REL = 2e-5


def scaled(values) -> float:
    return REL * max(1.0, float(np.abs(values).max()))


def compared(ours, theirs, expected, mask, what: str, ratio=RATIO):
    """Real tokens of jinterp's, transformers' and the float64 values: within REL x scale of transformers and of
    float64, refereed (tests/README.md (c)); returns the three as compared."""
    ours, theirs, expected = (np.asarray(a)[mask] for a in (ours, theirs, expected))
    np.testing.assert_allclose(ours, theirs, atol=scaled(theirs), rtol=0, err_msg=what)
    assert_refereed(ours, theirs, expected, bound=scaled(expected), ratio=ratio, what=what)
    return ours, theirs, expected


def batch(d_vocab: int, padded: bool):
    """Six rows of 11 positions (enough values for stable RMS errors); ``padded``: the first holds 8 real tokens
    after 3 padding positions (left padding), the second 8 real tokens before 3 (right padding)."""
    tokens = random_tokens(d_vocab, (6, 11), seed=4)
    mask = np.ones_like(tokens, bool)
    if padded:
        mask[0, :3] = False
        mask[1, 8:] = False
    tokens[~mask] = 0
    return tokens, mask


def transformers_run(hf, tokens, mask):
    """HF's logits, hidden states and attention weights, with jinterp's positions (real tokens counted)."""
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    as_torch = lambda x: torch.tensor(np.asarray(x, np.int64))  # noqa: E731
    with torch.no_grad():
        out = hf(as_torch(tokens), attention_mask=as_torch(mask), position_ids=as_torch(positions),
                 output_hidden_states=True, output_attentions=True)
    return (out.logits.numpy(), [h.numpy() for h in out.hidden_states], [a.numpy() for a in out.attentions])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_hidden_states_and_patterns_match_transformers(reference, family, padded):
    hf, _, model = reference(family)
    cfg = model.cfg
    tokens, mask = batch(cfg.d_vocab, padded)
    side = "padded" if padded else "unpadded"
    logits_hf, hidden, patterns = transformers_run(hf, tokens, mask)
    sites = ["blocks.*.resid_pre", "blocks.*.attn.pattern", "ln_final.normalized"]
    options = dict(capture=sites, attention_mask=mask if padded else None)
    logits, cache = jinterp.run(model, tokens, **options)
    exact_logits, exact = run64(model, tokens, **options)

    def check(ours, theirs, expected, what, ratio=RATIO):
        return compared(ours, theirs, expected, mask, f"{family} {side} {what}", ratio)

    assert np.abs(logits_hf).max() > 1.0  # the check means something
    check(logits, logits_hf, exact_logits, "logits")
    assert len(hidden) == len(patterns) + 1 == cfg.n_layers + 1
    pooled = []
    for layer in range(cfg.n_layers):
        name = f"blocks.{layer}.resid_pre"
        check(cache[name], hidden[layer], exact[name], name)
        name = f"blocks.{layer}.attn.pattern"  # [batch, head, query, key]: real queries, every key
        to_queries = lambda a: np.moveaxis(np.asarray(a), 1, 2)  # noqa: E731
        # One layer's pattern is too small for a stable RMS error (tests/README.md): the bound per layer,
        # the ratio over all layers pooled.
        pooled.append(check(to_queries(cache[name]), to_queries(patterns[layer]), to_queries(exact[name]), name,
                            ratio=None))
    assert_refereed(*(np.concatenate([p[i] for p in pooled]) for i in range(3)), bound=REL,
                    what=f"{family} {side} patterns")
    w = np.asarray(model.ln_final.w, np.float64)  # HF's last hidden state is the final norm's output
    name = "ln_final.normalized"
    check(np.asarray(cache[name]) * w, hidden[-1], exact[name] * w, name)


def variant(model, **changes):
    return dataclasses.replace(model, cfg=model.cfg.replace(**changes))


def largest_change(model, other, tokens) -> float:
    return float(np.abs(np.asarray(model(tokens)) - np.asarray(other(tokens))).max())


def test_gemma2_windows_and_soft_caps_bind(reference):
    """The test model's window (3) is shorter than its prompts, and both soft caps change the result."""
    _, _, model = reference("gemma2")
    cfg = model.cfg
    assert cfg.layer_types == ("local", "global") * 2 and cfg.sliding_window == 3
    assert not cfg.qk_norm and cfg.norm_placement == "sandwich" and not cfg.tied_embeddings
    tokens = random_tokens(cfg.d_vocab, (2, 11), seed=4)
    assert largest_change(model, variant(model, layer_types=("global",) * 4), tokens) > 1.0  # measured 5.3
    assert largest_change(model, variant(model, attn_softcap=None), tokens) > 0.8  # measured 4.3
    logits = np.asarray(model(tokens))
    assert np.abs(logits).max() > 0.5 * cfg.final_softcap  # measured 0.98 x the cap: tanh far from linear


def test_phi3_window_and_partial_rotary(reference):
    _, _, model = reference("phi3")
    cfg = model.cfg
    assert cfg.layer_types == ("local",) * 3 and cfg.sliding_window == 4 and cfg.rotary_dim == cfg.d_head // 2
    tokens = random_tokens(cfg.d_vocab, (2, 11), seed=4)
    assert largest_change(model, variant(model, layer_types=("global",) * 3), tokens) > 0.1  # measured 0.67


# --- refusals ----------------------------------------------------------------------------------------------

def test_phi3_longrope_within_its_original_context(reference):
    """longrope's short factors and attention factor apply (and matter); its long factors, for sequences past the
    original context, are not implemented: the model's context ends there, and longer inputs are refused."""
    _, _, model = reference("phi3_longrope")
    cfg = model.cfg
    scaling = dict(cfg.rope_scaling)
    assert cfg.n_ctx == 32 and scaling["short_factor"] == (1.0, 2.5, 7.0)
    assert scaling["attention_factor"] == pytest.approx((1 + np.log(2) / np.log(32)) ** 0.5, rel=1e-12)
    tokens = random_tokens(cfg.d_vocab, (2, 11), seed=4)
    assert largest_change(model, variant(model, rope_scaling=None), tokens) > 0.1  # measured 0.66
    with pytest.raises(ValueError, match="Sequence length 33 exceeds this model's context of n_ctx=32"):
        model(random_tokens(cfg.d_vocab, (1, 33)))


def test_config_and_fused_tensors_that_disagree_are_refused(copy_of):
    directory = copy_of("phi3")
    edit_config(directory, num_key_value_heads=3)  # the fused projection holds 6 + 2 + 2 heads, not 6 + 3 + 3
    with pytest.raises(LoadError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.qkv_proj.weight' has "
                                        r"shape \(120, 72\), config implies \(144, 72\)"):
        jinterp.load(directory)


def test_olmo2_qk_norm_of_the_wrong_size_is_refused(copy_of, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = copy_of("olmo2")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.1.self_attn.q_norm.weight"] = tensors["model.layers.1.self_attn.q_norm.weight"][:10]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"tensor 'model.layers.1.self_attn.q_norm.weight' has shape \(10,\), "
                                        r"config implies \(90,\)"):
        jinterp.load(directory)


def test_gemma2_bidirectional_attention_is_refused_by_name(copy_of):
    directory = copy_of("gemma2")
    edit_config(directory, use_bidirectional_attention=True)
    with pytest.raises(LoadError, match=r"config.json: use_bidirectional_attention=True \(gemma2 embedding models\) "
                                        r"is not supported"):
        jinterp.load(directory)
