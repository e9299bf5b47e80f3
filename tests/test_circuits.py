"""Edge attribution (EAP, EAP-IG), pruning and faithfulness by edge patching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LINEAR, TOY, corrupted_pair
from conftest import toy_metric as metric

import jinterp
from jinterp import circuits

CLEAN, CORRUPT = corrupted_pair(2)


def test_graph_of_a_gqa_model():
    graph = circuits.Graph.of(TOY)
    H, K, L = TOY.n_heads, TOY.n_kv_heads, TOY.n_layers
    assert len(graph.upstream) == 1 + L * (H + 1) and len(graph.downstream) == L * (H + 2 * K + 1) + 1
    up, down = graph.upstream.index("L1H2"), graph.downstream.index
    assert graph.valid[up, down("L2H0.q")] and graph.valid[up, down("L1MLP")] and graph.valid[up, down("logits")]
    assert not graph.valid[up, down("L1H0.q")] and not graph.valid[up, down("L0MLP")]
    assert graph.valid[graph.upstream.index("L1MLP"), down("L2KV1.v")]
    assert not graph.valid[graph.upstream.index("L1MLP"), down("L1MLP")]
    parallel = circuits.Graph.of(TOY.replace(parallel=True))
    assert not parallel.valid[parallel.upstream.index("L1H2"), parallel.downstream.index("L1MLP")]


def test_keeping_every_edge_is_the_clean_run_and_none_the_corrupted_run(toy):
    graph = circuits.Graph.of(TOY)
    full = circuits.faithfulness(toy, graph.valid, CLEAN, CORRUPT, metric)
    empty = circuits.faithfulness(toy, np.zeros_like(graph.valid), CLEAN, CORRUPT, metric)
    # Other programs than the plain runs: bit-equal here (measured 0 and 0); 8 eps32 x the metric (1.6) allowed.
    assert full["circuit"] == pytest.approx(full["clean"], abs=2e-6)
    assert full["normalized"] == pytest.approx(1, abs=1e-5)
    assert empty["circuit"] == pytest.approx(empty["corrupted"], abs=1e-6)  # measured 6e-8
    assert empty["normalized"] == pytest.approx(0, abs=1e-6)  # measured 7e-8


def test_eap_is_exact_for_edges_into_a_linear_readout():
    """No norm, attention only: dropping one edge into the logits changes the metric by exactly
    that edge's score (noising direction: scores at the clean run)."""
    model = jinterp.Transformer.init(LINEAR, jax.random.key(0), std=0.3)
    clean, corrupt = CLEAN % 17, CORRUPT % 17
    scores, graph = circuits.edge_attribution(model, clean, corrupt, metric, direction="noise", progress=False)
    base = circuits.faithfulness(model, graph.valid, clean, corrupt, metric)["circuit"]
    for u in range(len(graph.upstream)):
        keep = graph.valid.copy()
        keep[u, -1] = False
        changed = circuits.faithfulness(model, keep, clean, corrupt, metric)["circuit"] - base
        assert changed == pytest.approx(float(scores[u, -1]), abs=1e-5)  # measured 8.1e-7


def test_eap_ig_with_one_step_at_the_midpoint_and_many_steps(toy):
    eap, graph = circuits.edge_attribution(toy, CLEAN, CORRUPT, metric, progress=False)
    ig, _ = circuits.edge_attribution(toy, CLEAN, CORRUPT, metric, ig_steps=4, progress=False)
    assert eap.shape == ig.shape == graph.valid.shape
    assert not np.asarray(eap)[~graph.valid].any() and not np.allclose(np.asarray(eap), np.asarray(ig))


def test_prune():
    graph = circuits.Graph.of(TOY)
    scores = jnp.asarray(np.random.default_rng(0).normal(size=graph.valid.shape))
    top = circuits.prune(scores, graph, n_edges=10)
    assert top.sum() == 10 and not (top & ~graph.valid).any()
    assert np.abs(np.asarray(scores))[top].min() >= np.abs(np.asarray(scores))[graph.valid & ~top].max()
    assert (circuits.prune(scores, graph, threshold=1.0) == (graph.valid & (np.abs(np.asarray(scores)) >= 1))).all()
    with pytest.raises(ValueError, match="exactly one of"):
        circuits.prune(scores, graph)
    with pytest.raises(ValueError, match="outside 0..304"):
        circuits.prune(scores, graph, n_edges=10**6)


def test_models_without_additive_writes_are_refused():
    with pytest.raises(ValueError, match="needs a pre-norm decoder"):
        circuits.Graph.of(TOY.replace(norm_placement="sandwich"))


def test_ioi_circuit_on_smollm2(named):
    """EAP on SmolLM2-135M IOI prompts: a circuit of 3000 of its ~70k edges recovers most of the
    logit difference (printed); the full graph recovers all of it."""
    from test_patching import answer_metric

    model, tokenizer, _, _ = named("smollm2-135m")
    pairs = [(" Mary", " John"), (" Tom", " James"), (" Anna", " Lisa")]
    clean = np.array([tokenizer.encode(f"When{a} and{b} went to the store,{b} gave a drink to") for a, b in pairs])
    corrupt = np.array([tokenizer.encode(f"When{a} and{b} went to the store,{a} gave a drink to") for a, b in pairs])
    answers = np.array([(tokenizer.encode(a)[0], tokenizer.encode(b)[0]) for a, b in pairs])
    score = answer_metric(answers)
    scores, graph = circuits.edge_attribution(model, clean, corrupt, score, logit_positions=[-1], progress=False)
    result = circuits.faithfulness(model, circuits.prune(scores, graph, n_edges=3000), clean, corrupt, score,
                                   logit_positions=[-1])
    print(f"SmolLM2 IOI: 3000 of {graph.n_edges} edges recover {result['normalized']:.2f} of the logit difference")
    assert result["normalized"] > 0.8  # measured 0.94
