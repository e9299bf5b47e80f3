"""ACDC: a hand-built model whose circuit is known by construction is recovered exactly over a range of
tau; batched trials equal one-forward-per-trial; the circuit's metric is its own edge-patched run's;
a tau that keeps nothing or everything warns with the metric at both ends."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from conftest import TOY, corrupted_pair

import jinterp
from jinterp import acdc, circuits, plots

matplotlib.use("Agg")

TRUE = {("input", "L0H0.v"), ("L0H0", "L1H1.v"), ("L1H1", "logits")}


def _known_model():
    """Attention only, no norms, no positions, W_Q = W_K = 0 (uniform causal attention). Tokens embed on
    e0; L0H0 copies e0 to e2; L1H1 copies e2 to e4; the unembedding reads e4 only; every other head writes
    nothing. So the output depends on the tokens through input -> L0H0.v -> L1H1.v -> logits alone, and
    removing any other edge leaves the logits bit for bit as they were."""
    cfg = jinterp.Config(d_model=6, n_layers=2, n_heads=2, d_head=2, d_vocab=5, n_ctx=8, attn_only=True, norm=None,
                         positional=None)
    model = jinterp.Transformer.init(cfg, jax.random.key(0))
    zeros = jnp.zeros_like
    a = model.blocks.attn
    W_V = zeros(a.W_V).at[0, 0, 0, 0].set(1.0).at[1, 1, 2, 0].set(1.0)
    W_O = zeros(a.W_O).at[0, 0, 0, 2].set(1.0).at[1, 1, 0, 4].set(1.0)
    W_E = zeros(model.W_E).at[:, 0].set(jnp.asarray([1.0, -2.0, 3.0, 0.5, -1.0]))
    W_U = zeros(model.W_U).at[4].set(jnp.asarray([1.0, -1.0, 0.5, 2.0, 0.0]))
    return eqx.tree_at(lambda m: (m.blocks.attn.W_Q, m.blocks.attn.W_K, m.blocks.attn.W_V, m.blocks.attn.W_O,
                                  m.W_E, m.W_U), model, (zeros(a.W_Q), zeros(a.W_K), W_V, W_O, W_E, W_U))


CLEAN = np.asarray([[0, 2, 1, 3, 2, 4], [1, 1, 0, 2, 3, 3]], np.int32)
CORRUPT = np.asarray([[4, 2, 1, 3, 0, 4], [1, 3, 0, 2, 1, 3]], np.int32)


def test_the_known_circuit_is_recovered_exactly_over_a_range_of_tau():
    model = _known_model()
    result = acdc.acdc(model, CLEAN, CORRUPT, 1e-9, progress=False)
    assert set(result.edges) == TRUE
    true_effects = [result.effects[result.graph.upstream.index(u), result.graph.downstream.index(d)] for u, d in TRUE]
    smallest = min(true_effects)
    assert smallest > 0.01  # measured 0.389 for each (removing any one cuts the chain: the empty circuit's KL)
    others = result.effects[~result.circuit & ~np.isnan(result.effects)]
    assert (others == 0).all()  # every other edge leaves the logits bit for bit unchanged
    assert result.metric == pytest.approx(result.metric_full, abs=0)  # the circuit is the whole model's output
    for tau in (1e-6, 1e-3, 0.5 * smallest, 0.99 * smallest):
        assert set(acdc.acdc(model, CLEAN, CORRUPT, tau, progress=False).edges) == TRUE, (tau, true_effects)
    assert result.nodes == ["input", "L0H0", "L1H1", "L0H0.v", "L1H1.v", "logits"]
    plots.circuit_graph(result.circuit, result.graph, result.effects)


# Grouped-query attention (4 query heads over 2 kv heads), RMSNorm, rotary, gated MLPs: 82 edges.
SMALL = jinterp.Config(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, d_vocab=23, n_ctx=12,
                       norm="rms", positional="rotary", act="silu", gated_mlp=True)


def test_batched_trials_equal_one_forward_per_trial():
    model = jinterp.Transformer.init(SMALL, jax.random.key(0), std=0.5)
    clean, corrupt = (tokens % SMALL.d_vocab for tokens in corrupted_pair(4))
    batched = acdc.acdc(model, clean, corrupt, 2e-3, progress=False, logit_positions=[-1])
    loop = acdc.acdc(model, clean, corrupt, 2e-3, progress=False, batched=False, logit_positions=[-1])
    np.testing.assert_array_equal(batched.circuit, loop.circuit)
    tried = ~np.isnan(batched.effects)
    np.testing.assert_array_equal(tried, ~np.isnan(loop.effects))
    # vmapped chunks vs single runs: other programs, bit-equal here (measured 0); 8 eps32 x the largest effect
    # (0.74) allowed. The closest effect to tau is 5e-4 from it: far beyond rounding, so the decisions agree.
    np.testing.assert_allclose(batched.effects[tried], loop.effects[tried], atol=8e-7, rtol=0)
    assert batched.trials == loop.trials == 82 and batched.n_edges == 37  # of 82
    # The circuit's metric is the KL of its own edge-patched run from the full model.
    full, _ = jinterp.run(model, clean, logit_positions=[-1])
    _, patch = circuits.edge_patch(model, batched.circuit, corrupt, logit_positions=[-1])
    logits, _ = jinterp.run(model, clean, edits=patch, logit_positions=[-1])
    p, q = jax.nn.log_softmax(full, -1), jax.nn.log_softmax(logits, -1)
    kl = float(jnp.sum(jnp.exp(p) * (p - q), -1).mean())
    # 0.0071: the trials and the edge-patched run sum each reader's terms differently (the receiver's from the
    # other end): measured 6.3e-8 apart, each about 2.5e-8 from the same check in float64 (x64 mode); 6x margin
    assert batched.metric == pytest.approx(kl, abs=4e-7)
    assert batched.metric_empty > 100 * batched.metric  # 0.795 against 0.0071


def test_trials_resumed_at_the_receivers_layer_equal_whole_forwards():
    """A trial resumes from the clean residual stream at its receiver's layer, the earlier writers carrying
    their clean differences, and feeds the receiver its column of drops: the same metric as the whole
    edge-patched forward with that column in the drop matrix, for any drops at the readers after it (what
    ACDC's backward walk guarantees), dense or sparse (each reader's input made from either end)."""
    model = jinterp.Transformer.init(SMALL, jax.random.key(1), std=0.5)
    clean, corrupt = (jnp.asarray(tokens % SMALL.d_vocab) for tokens in corrupted_pair(2))
    graph = circuits.Graph.of(SMALL)
    clean_logits, clean_cache = jinterp.run(model, clean, capture=circuits.writer_sites(SMALL))
    _, patch = circuits.edge_patch(model, graph.valid, corrupt)
    resumable = patch.resumed_from(clean_cache)
    reference = jax.nn.log_softmax(clean_logits, -1)
    layers = acdc._layers(graph, SMALL.n_layers)
    rng = np.random.default_rng(0)
    for v in [graph.downstream.index(name) for name in ("L0H1.q", "L0MLP", "L1KV1.k", "L1MLP")]:
        for density in (0.2, 0.8):  # few drops (terms subtracted) and few kept edges (added to the corrupted value)
            later = np.arange(len(graph.downstream)) > v  # the readers ACDC has walked before v
            drop = (rng.random(graph.valid.shape) < density) & graph.valid & later[None]
            columns = (rng.random((6, graph.valid.shape[0])) < density) & graph.valid[:, v]
            trial = resumable.dropping(jnp.asarray(drop, jnp.float32), receiver=v)
            start = (jnp.int32(layers[v]), clean_cache.stack("resid_pre")[layers[v]])
            resumed = acdc._trials(model, clean, trial, jnp.asarray(columns, jnp.float32), acdc._kl, reference,
                                   None, None, start)
            whole = []
            for column in columns:
                drop[:, v] = column
                logits, _ = jinterp.run(model, clean, edits=patch.dropping(jnp.asarray(drop, jnp.float32)))
                whole.append(float(acdc._kl(logits, reference)))
            assert min(whole) > 1e-2  # the drops matter
            # Other programs (the prefix from a cache, terms summed in another order): rounding only,
            # measured 5.2e-7 relative at most.
            np.testing.assert_allclose(resumed, whole, rtol=3e-6, atol=0)


def test_a_drop_needing_writers_the_patch_does_not_record_gives_nan():
    model = jinterp.Transformer.init(SMALL, jax.random.key(1), std=0.5)
    clean, corrupt = (jnp.asarray(tokens % SMALL.d_vocab) for tokens in corrupted_pair(2))
    graph = circuits.Graph.of(SMALL)
    circuit = graph.valid.copy()
    circuit[:, -1] = False  # one reader (the logits) with every edge dropped: no writer recorded
    _, patch = circuits.edge_patch(model, circuit, corrupt)
    assert (np.asarray(patch.slot) == patch.rows - 1).all()
    logits, _ = jinterp.run(model, clean, edits=patch)
    assert np.isfinite(logits).all()
    half = jnp.asarray(graph.valid & (np.arange(graph.valid.shape[0]) % 2 == 0)[:, None], jnp.float32)
    logits, _ = jinterp.run(model, clean, edits=eqx.tree_at(lambda p: p.drop, patch, half))
    assert np.isnan(logits).all()
    with pytest.raises(ValueError, match="resumed_from"):
        patch.dropping(patch.drop, receiver=3)


def test_gqa_readers_of_a_kv_head_belong_to_its_query_heads():
    graph = circuits.Graph.of(TOY)
    writers = acdc._writers(graph, TOY)
    name = lambda rows: [graph.upstream[r] for r in rows]  # noqa: E731
    assert name(writers[graph.downstream.index("L1KV1.k")]) == ["L1H3", "L1H4", "L1H5"]
    assert name(writers[graph.downstream.index("L2H4.q")]) == ["L2H4"]
    assert name(writers[graph.downstream.index("L0MLP")]) == ["L0MLP"]
    assert name(writers[graph.downstream.index("logits")]) == []


def test_a_tau_keeping_nothing_or_everything_warns_with_both_ends():
    model = _known_model()
    with pytest.warns(UserWarning, match=r"keeps no edge: the metric is 0 with every edge and [0-9.]+ with none"):
        empty = acdc.acdc(model, CLEAN, CORRUPT, 100.0, progress=False)
    assert empty.n_edges == 0 and empty.metric == pytest.approx(empty.metric_empty, abs=0)
    with pytest.warns(UserWarning, match=r"keeps every edge \(\d+\)"):
        acdc.acdc(model, CLEAN, CORRUPT, 0.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        acdc.acdc(model, CLEAN, CORRUPT, 1e-6, progress=False)
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        acdc.acdc(model, CLEAN, CORRUPT, -1.0, progress=False)


SHORT = ["vocab=32", "n_ctx=16", "d_model=16", "n_heads=2", "min_segment=2", "max_segment=8", "steps=20",
         "batch_size=16", "checkpoint_every=10", "sequences=4", "length=6", "tau=0.000002"]  # barely trained:
# single-edge effects of 4e-7 to 6e-6 nats (empty circuit 2.4e-5); this tau keeps 8 edges after 29 trials


def test_experiment_runs_reports_and_resumes_receiver_by_receiver(tmp_path):
    import json

    from experiments import acdc as experiment
    from jinterp import runs

    cfg = runs.make_config(experiment.Config, overrides=SHORT)
    results = runs.execute(experiment.EXPERIMENT, cfg, tmp_path, quiet=True)
    graph = circuits.Graph.of(jinterp.Config(d_model=16, n_layers=2, n_heads=2, d_head=8, d_vocab=32, n_ctx=16,
                                             attn_only=True))
    assert results["circuit"].shape == graph.valid.shape and results["metric_empty"] > results["metric"] >= 0
    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert metrics["edges"] == int(results["circuit"].sum()) and metrics["of"] == graph.n_edges
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 2
    steps = json.loads((tmp_path / "run.json").read_text())["steps"]
    receivers = sorted(name for name in steps if name.startswith("acdc/0"))
    assert len(receivers) >= 2
    # Lose the results and the last receivers' checkpoints (as a run killed mid-way would): the rest are
    # restored, the lost ones recomputed, and the outcome is the same to the bit.
    store = runs.Store(tmp_path / "checkpoints", print)
    store.delete("results")
    for name in receivers[: len(receivers) // 2]:  # receivers are walked from the highest index down
        store.delete(name)
    resumed = runs.execute(experiment.EXPERIMENT, cfg, tmp_path, quiet=True)
    for key in ("circuit", "effects", "metric"):
        np.testing.assert_array_equal(resumed[key], results[key])
    steps = json.loads((tmp_path / "run.json").read_text())["steps"]
    assert steps["model"]["restored"] and steps[receivers[-1]]["restored"] and not steps[receivers[0]]["restored"]
