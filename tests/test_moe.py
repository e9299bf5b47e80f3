"""Mixtures of experts (Mixtral, OLMoE, Qwen3-MoE, Qwen2-MoE with its shared expert) against transformers on the
same random weights, unpadded and padded on either side: logits, hidden states, attention patterns and router
logits, refereed by jinterp's float64 run; the expert sites (router_logits, weights, expert_out), edits with
``experts=``, sweeps per expert and ``jinterp.moe.expert_usage``."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import edit_config, random_tokens
from numerics import EPS32, RATIO, assert_refereed, run64
from test_families_hf import REL, batch, compared, transformers_run

torch = pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")

import jinterp
from jinterp import LoadError, patching

FAMILIES = ("mixtral", "olmoe", "qwen3_moe", "qwen2_moe")


def router_logits(hf, tokens, mask):
    """transformers' router logits per layer, ``[n_layers, batch, pos, n_experts]``, with jinterp's positions."""
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    as_torch = lambda x: torch.tensor(np.asarray(x, np.int64))  # noqa: E731
    with torch.no_grad():
        out = hf(as_torch(tokens), attention_mask=as_torch(mask), position_ids=as_torch(positions),
                 output_router_logits=True)
    return np.stack([r.numpy().reshape(*tokens.shape, -1) for r in out.router_logits])


# Every family unpadded and padded (left and right padding in one batch).
CASES = [(family, padded) for family in FAMILIES for padded in (False, True)]


# Bounds as test_families_hf.py (REL x scale): measured at most 7.5e-7 x scale against transformers (qwen3_moe) and
# 5.0e-7 against the float64 run; RMS ratios at most 1.08 (logits, hidden states, patterns and router logits).
@pytest.mark.parametrize("family, padded", CASES)
def test_logits_hidden_states_patterns_and_router_logits_match_transformers(reference, family, padded):
    hf, _, model = reference(family)
    cfg = model.cfg
    tokens, mask = batch(cfg.d_vocab, padded)
    side = "padded" if padded else "unpadded"
    logits_hf, hidden, patterns = transformers_run(hf, tokens, mask)
    routers = router_logits(hf, tokens, mask)
    sites = ["blocks.*.resid_pre", "blocks.*.attn.pattern", "blocks.*.moe.router_logits"]
    options = dict(capture=sites, attention_mask=mask if padded else None)
    logits, cache = jinterp.run(model, tokens, **options)
    exact_logits, exact = run64(model, tokens, **options)

    def check(ours, theirs, expected, what, ratio=RATIO):
        return compared(ours, theirs, expected, mask, f"{family} {side} {what}", ratio)

    assert np.abs(logits_hf).max() > 1.0
    check(logits, logits_hf, exact_logits, "logits")
    pooled = {"pattern": [], "router": []}  # small per layer: the RMS ratio over all layers (tests/README.md)
    for layer in range(cfg.n_layers):
        name = f"blocks.{layer}.resid_pre"
        check(cache[name], hidden[layer], exact[name], name)
        name = f"blocks.{layer}.attn.pattern"
        to_queries = lambda a: np.moveaxis(np.asarray(a), 1, 2)  # noqa: E731
        pooled["pattern"].append(check(to_queries(cache[name]), to_queries(patterns[layer]), to_queries(exact[name]),
                                       name, ratio=None))
        name = f"blocks.{layer}.moe.router_logits"
        pooled["router"].append(check(cache[name], routers[layer], exact[name], name, ratio=None))
    for what, arrays in pooled.items():
        assert_refereed(*(np.concatenate([a[i] for a in arrays]) for i in range(3)),
                        bound=REL * max(1.0, np.abs(arrays[0][2]).max()), what=f"{family} {side} {what}s")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_sites(reference, family):
    """weights: k non-zero entries per token, the softmax of the router logits over the top k (renormalised for
    Mixtral); expert_out: each expert's weighted output, summing with the shared expert's to mlp_out."""
    _, _, model = reference(family)
    cfg = model.cfg
    tokens = random_tokens(cfg.d_vocab, (2, 9), seed=5)
    sites = ["blocks.*.moe.router_logits", "blocks.*.moe.weights", "blocks.*.moe.expert_out", "blocks.*.mlp_out",
             "blocks.*.mlp.post", "blocks.*.ln2.normalized"]
    _, cache = jinterp.run(model, tokens, capture=[s for s in sites if cfg.has_dense_mlp or "mlp.post" not in s])
    logits, weights = np.asarray(cache.stack("moe.router_logits")), np.asarray(cache.stack("moe.weights"))
    assert ((weights > 0).sum(-1) == cfg.n_experts_per_token).all()
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[..., :cfg.n_experts_per_token]
    expected = np.zeros_like(probs)
    np.put_along_axis(expected, top, np.take_along_axis(probs, top, -1), -1)
    if cfg.norm_topk:
        expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights, expected, atol=1e-6, rtol=0)  # float32 softmaxes: measured 1.2e-7
    routed = np.asarray(cache.stack("moe.expert_out")).sum(-2)
    mlp_out = np.asarray(cache.stack("mlp_out"))
    if cfg.has_dense_mlp:  # Qwen2-MoE: plus the shared expert, gated by sigmoid(x . w)
        W_out, W_gate = np.asarray(model.blocks.mlp.W_out), np.asarray(model.blocks.moe.W_shared_gate)
        w2 = np.asarray(model.blocks.ln2.w)
        normed = np.asarray(cache.stack("ln2.normalized")) * w2[:, None, None]
        gate = 1 / (1 + np.exp(-np.einsum("lbsd,ld->lbs", normed, W_gate)))
        routed = routed + gate[..., None] * np.einsum("lbsm,lmd->lbsd", np.asarray(cache.stack("mlp.post")), W_out)
    scale = np.abs(mlp_out).max()
    # The same sums in another order, and the shared expert recomputed in numpy: measured 1.1e-7 x scale.
    np.testing.assert_allclose(routed, mlp_out, atol=8 * EPS32 * scale, rtol=0)
    assert "moe.expert_out" in jinterp.models.declaration.kinds(cfg).on_demand
    assert f"{cfg.n_experts} experts (top {cfg.n_experts_per_token})" in jinterp.treescope_views.model_summary(cfg)


def test_zeroing_an_experts_weight_removes_that_expert(reference):
    """Zero("moe.weights", experts=[e]) equals the model with expert e's output projection zeroed."""
    _, _, model = reference("mixtral")
    tokens = random_tokens(model.cfg.d_vocab, (2, 9), seed=6)
    edited, _ = jinterp.run(model, tokens, edits=jinterp.Zero("blocks.1.moe.weights", experts=[2]))
    W_out = model.blocks.moe.W_out.at[1, 2].set(0.0)
    surgery = dataclasses.replace(model, blocks=dataclasses.replace(
        model.blocks, moe=dataclasses.replace(model.blocks.moe, W_out=W_out)))
    plain = np.asarray(model(tokens))
    expected = np.asarray(surgery(tokens))
    assert np.abs(expected - plain).max() > 0.05  # the expert matters: measured 0.42
    # Another program (a weight zeroed instead of a projection), bit-equal here (measured 0): 8 eps32 x scale.
    np.testing.assert_allclose(np.asarray(edited), expected, atol=8 * EPS32 * np.abs(expected).max(), rtol=0)
    # Lowering its router logit routes around it instead: another expert fills the top k, weights still sum to 1.
    _, cache = jinterp.run(model, tokens, edits=jinterp.Add("blocks.1.moe.router_logits", -1e4, experts=[2]),
                           capture="blocks.1.moe.weights")
    weights = np.asarray(cache["blocks.1.moe.weights"])
    assert not weights[..., 2].any() and ((weights > 0).sum(-1) == 2).all()
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)  # float32 normalisation: measured 1.2e-7
    with pytest.raises(ValueError, match=r"expert 5 is out of range: there are 5 experts"):
        jinterp.run(model, tokens, edits=jinterp.Zero("blocks.1.moe.weights", experts=[5]))


def test_sweep_per_expert_equals_single_patched_runs(reference):
    _, _, model = reference("olmoe")
    clean = random_tokens(model.cfg.d_vocab, (2, 8), seed=7)
    corrupt = clean.copy()
    corrupt[:, 3] = (corrupt[:, 3] + 11) % model.cfg.d_vocab

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 9]).mean()

    scores = np.asarray(patching.sweep(model, clean, corrupt, metric, "moe.weights", per="expert", exact=True))
    assert scores.shape == (model.cfg.n_layers, model.cfg.n_experts)
    _, source = jinterp.run(model, clean, capture="blocks.*.moe.weights")
    scale = float(np.abs(np.asarray(jinterp.run(model, corrupt)[0])).max())
    for layer, expert in ((0, 1), (0, 3), (1, 4)):
        name = f"blocks.{layer}.moe.weights"
        patch = jinterp.Replace(name, source[name], experts=[expert])
        logits, _ = jinterp.run(model, corrupt, edits=patch)
        # Not bit-equal at expert sites (bit-equal at dense ones, test_patching.py): the sweep's patched runs
        # resume from the patch's layer and the first differing token, another program. Measured 3.6e-7 (at
        # logits' scale 3.9): 8 eps32 x scale.
        assert scores[layer, expert] == pytest.approx(float(metric(logits)), abs=8 * EPS32 * scale, rel=0)
    assert np.abs(scores - float(metric(jinterp.run(model, corrupt)[0]))).max() > 0.03  # measured 0.17


def test_expert_usage(reference):
    hf, _, model = reference("qwen3_moe")
    cfg = model.cfg
    tokens, mask = batch(cfg.d_vocab, True)
    usage = np.asarray(jinterp.moe.expert_usage(model, tokens, attention_mask=mask))
    assert usage.shape == (cfg.n_layers, cfg.n_experts)
    np.testing.assert_allclose(usage.sum(-1), cfg.n_experts_per_token, rtol=1e-6)  # float32 division of counts: 8 eps32
    routers = router_logits(hf, tokens, mask)[:, mask]  # transformers' top k over the real tokens
    top = np.argsort(-routers, -1)[..., :cfg.n_experts_per_token]
    counts = np.stack([np.bincount(t.ravel(), minlength=cfg.n_experts) for t in top]) / mask.sum()
    np.testing.assert_allclose(usage, counts, rtol=1e-6)  # (as above)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        jinterp.moe.expert_usage(jinterp.Transformer.init(jinterp.Config(
            d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=8, d_vocab=11, n_ctx=8), jax.random.key(0)), tokens % 11)


# --- refusals ----------------------------------------------------------------------------------------------

def test_unsupported_mixture_options_are_refused_by_name(copy_of):
    directory = copy_of("qwen3_moe")
    edit_config(directory, mlp_only_layers=[1])
    with pytest.raises(LoadError, match=r"config.json: dense MLP layers among the expert layers "
                                        r"\(mlp_only_layers=\[1\]"):
        jinterp.load(directory)
    directory = copy_of("olmoe")
    edit_config(directory, clip_qkv=8.0)
    with pytest.raises(LoadError, match=r"config.json: clip_qkv=8.0 is not supported"):
        jinterp.load(directory)


def test_expert_tensors_that_disagree_with_the_config_are_refused(copy_of):
    directory = copy_of("mixtral")
    edit_config(directory, intermediate_size=24)
    with pytest.raises(LoadError, match=r"tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight' has shape "
                                        r"\(20, 48\), config implies \(24, 48\)"):
        jinterp.load(directory)
    edit_config(directory, intermediate_size=20, num_local_experts=6)
    with pytest.raises(LoadError, match=r"tensor 'model.layers.0.block_sparse_moe.gate.weight' has shape \(5, 48\), "
                                        r"config implies \(6, 48\)"):
        jinterp.load(directory)


def test_fused_expert_tensors_load_the_same_model(reference, copy_of):
    """transformers 5's own layout: ``mlp.gate`` and fused ``mlp.experts.gate_up_proj`` / ``down_proj`` tensors."""
    from safetensors.numpy import load_file, save_file

    _, _, model = reference("mixtral")
    directory = copy_of("mixtral")
    tensors = load_file(directory / "model.safetensors")
    fused = {}
    for name, value in tensors.items():
        if ".block_sparse_moe.experts." in name:
            continue
        fused[name.replace(".block_sparse_moe.", ".mlp.")] = value
    def each(i, w):
        return np.stack([tensors[f"model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight"]
                         for j in range(model.cfg.n_experts)])

    for i in range(model.cfg.n_layers):
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([each(i, "w1"), each(i, "w3")], 1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = each(i, "w2")
    save_file(fused, directory / "model.safetensors", metadata={"format": "pt"})
    loaded, _ = jinterp.load(directory)
    tokens = random_tokens(model.cfg.d_vocab, (2, 9), seed=8)
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))  # the same weights


def test_the_memory_estimate_counts_one_experts_working_set(reference):
    """The experts run one at a time: the plain forward holds one expert's gate, up, product and output."""
    _, _, model = reference("mixtral")
    cfg = model.cfg
    specs = jinterp.models.declaration.site_specs(cfg, 2, 9)
    expert_out = specs["blocks.0.moe.expert_out"]
    held = np.prod(expert_out.shape) * 4 * expert_out.held
    assert held == pytest.approx(2 * 9 * (3 * cfg.d_expert + cfg.d_model) * 4, rel=1e-12)
    per_layer = sum(np.prod(s.shape) * 4 * s.held for s in specs.values() if s.layer == 0)  # expert_out included
    top = sum(np.prod(s.shape) * 4 for s in specs.values() if s.layer is None)
    assert jinterp.memory.run_bytes(specs) == pytest.approx(per_layer + top, rel=1e-12)
    # Captured, the whole [n_layers, batch, pos, n_experts, d_model] buffer counts.
    captured = jinterp.memory.run_bytes(specs, [f"blocks.{i}.moe.expert_out" for i in range(cfg.n_layers)])
    assert captured - jinterp.memory.run_bytes(specs) == cfg.n_layers * np.prod(expert_out.shape) * 4


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_few_tokens_compute_only_their_chosen_experts(reference, family, monkeypatch):
    """Fewer chosen (token, expert) pairs than experts (one-token decoding): only those experts run, their
    weights gathered; the result is the dense mixture's (capturing moe.weights keeps the dense path)."""
    _, _, model = reference(family)
    cfg = model.cfg
    tokens = random_tokens(cfg.d_vocab, (1, (cfg.n_experts - 1) // cfg.n_experts_per_token), seed=9)
    traced = []
    sparse_path = jinterp.models.layers.chosen_experts
    monkeypatch.setattr(jinterp.models.layers, "chosen_experts", lambda *a: traced.append(1) or sparse_path(*a))
    sparse = np.asarray(jax.jit(lambda m, t: m(t))(model, tokens))
    assert traced  # the gathered path ran
    dense, _ = jinterp.run(model, tokens, capture="blocks.*.moe.weights")
    # Another program (per-token products instead of every expert's matrix product): measured 1.2e-6 at scale 2.6
    # (mixtral; qwen2_moe 0), 3.9 eps32 x scale: 20 eps32 x scale.
    np.testing.assert_allclose(sparse, np.asarray(dense), atol=20 * EPS32 * np.abs(sparse).max(), rtol=0)
