"""Transcoders: trained on (input, target) pairs they recover a planted sparse map and stand in for a
toy model's MLPs; spliced in place of an MLP they change exactly what a hand computation says. The
attribution graph's edges are direct effects that add up to each node's value, and pruning keeps
what carries the influence on the logits."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LINEAR, TOY, random_tokens

import jinterp
from jinterp.sae import SAE, ArrayActivations, ModelActivations, SAESplice, load_saelens, save_saelens, train_sae
from jinterp.sae.graph import AttributionGraph, attribution_graph, influence, normalized, prune_graph
from jinterp.sae.transcoder import mlp_sites, transcoder_activations

D_IN, D_OUT, N_FEATURES, D_SAE = 32, 40, 64, 128
STEPS, BATCH, LR = 400, 256, 1e-2


def planted_map(n=8192, seed=0):
    """Inputs that are sparse codes (each feature on with probability 1/16) times a random unit
    input dictionary, plus an offset; targets the same codes times an output dictionary (another
    width, another scale and offset); and the output dictionary."""
    fixed = np.random.default_rng(0)  # the same map for every sample
    unit = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in (fixed.normal(size=(N_FEATURES, D_IN)),
                                                                  fixed.normal(size=(N_FEATURES, D_OUT)))]
    rng = np.random.default_rng(seed)
    codes = (rng.random((n, N_FEATURES)) < 1 / 16) * rng.uniform(0.5, 1.5, (n, N_FEATURES))
    inputs, targets = codes @ unit[0] + 0.3, 3 * codes @ unit[1] - 0.5
    return inputs.astype(np.float32), targets.astype(np.float32), unit[1]


INPUTS, TARGETS, OUTPUT_DICTIONARY = planted_map()


def explained_variance(prediction, target) -> float:
    prediction, target = np.asarray(prediction, np.float64), np.asarray(target, np.float64)
    return 1 - np.sum((prediction - target) ** 2) / np.sum((target - target.mean(0)) ** 2)


# topk here, jumprelu on the toy model below (each architecture compiles its own training step):
# the transcoder-specific code (pairs, two scales, the encoder's initialisation) is shared by all
# four, whose sparsity mechanisms tests/test_sae.py covers.
def test_a_transcoder_recovers_a_planted_sparse_map():
    result = train_sae((INPUTS, TARGETS), "topk", D_SAE, k=6, steps=STEPS, batch_size=BATCH, lr=LR, progress=False)
    sae = result.sae
    assert (sae.d_in, sae.d_out, sae.is_transcoder, sae.apply_b_dec_to_input) == (D_IN, D_OUT, True, False)
    # The returned transcoder maps raw inputs to raw targets (both scales folded in), as well as
    # the loop measured in normalised units.
    held_out_inputs, held_out_targets, _ = planted_map(1024, seed=1)
    ev = explained_variance(sae(jnp.asarray(held_out_inputs)), held_out_targets)
    assert ev > 0.75 and abs(ev - float(result.history["explained_variance"][-1])) < 0.05  # measured 0.81, 0.019
    assert result.target_scale != result.input_scale
    rows = np.asarray(sae.W_dec) / np.linalg.norm(np.asarray(sae.W_dec), axis=1, keepdims=True)
    recovered = np.abs(OUTPUT_DICTIONARY @ rows.T).max(axis=1)  # each planted output direction's best match
    assert recovered.mean() > 0.95  # measured 0.991
    # Unit decoder rows in training, divided by the targets' scale after.
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1) * result.target_scale, 1.0, atol=1e-6)  # 1.2e-7


# A toy model's MLP ----------------------------------------------------------------------------

LAYER = 1
READS, WRITES = f"blocks.{LAYER}.ln2.normalized", f"blocks.{LAYER}.mlp_out"
TOKENS = random_tokens(TOY.d_vocab, (2, 9))


@pytest.fixture(scope="module")
def toy_transcoders(toy):
    """A jumprelu transcoder per layer of the toy model (one compiled training step for the three),
    trained on 384 sequences; and each layer's (inputs, targets) on 16 held-out ones."""
    sites = [mlp_sites(TOY, layer) for layer in range(TOY.n_layers)]
    _, cache = jinterp.run(toy, random_tokens(TOY.d_vocab, (400, 12), seed=1), capture=sum(sites, ()))
    held_out = 16 * 12  # the last 16 sequences' tokens
    trained, tests = [], []
    for reads, writes in sites:
        inputs, targets = (np.asarray(cache[site]).reshape(-1, TOY.d_model) for site in (reads, writes))
        trained.append(train_sae((inputs[:-held_out], targets[:-held_out]), "jumprelu", D_SAE, l0_coefficient=0.1,
                                 steps=STEPS, batch_size=BATCH, lr=2e-2, progress=False, site=reads,
                                 target_site=writes))
        tests.append((inputs[-held_out:], targets[-held_out:]))
    return trained, tests


def test_transcoders_stand_in_for_a_toy_models_mlps(toy_transcoders):
    assert mlp_sites(TOY, LAYER) == (READS, WRITES)
    for layer, (result, (inputs, targets)) in enumerate(zip(*toy_transcoders)):
        assert explained_variance(result.sae(jnp.asarray(inputs)), targets) > 0.85  # measured 0.87 to 0.89
        assert float(result.history["l0"][-1]) < 16 and np.all(np.asarray(result.sae.threshold) >= 0)  # l0 10.7-11.9
        assert (result.sae.site, result.sae.target_site) == mlp_sites(TOY, layer)


def test_model_activations_serve_matching_input_target_pairs(toy):
    source = transcoder_activations(toy, TOKENS, LAYER, sequences_per_batch=2, skip=1)
    assert (source.site, source.target_site, source.d_in, source.d_out) == (READS, WRITES, TOY.d_model, TOY.d_model)
    inputs, targets = (np.asarray(a) for a in source(jnp.int32(3)))
    every = [np.asarray(value[:, 1:]).reshape(-1, TOY.d_model) for value in clean(toy)[1:3]]  # READS, WRITES
    rows = np.abs(inputs[:, None] - every[0][None]).max(-1).argmin(-1)  # the token each input row is
    assert inputs.shape == targets.shape == (16, TOY.d_model)
    # Streamed by another program than the capture's: measured 0 and 0; 8 eps32 x the scales (3, 14) allowed.
    np.testing.assert_allclose(inputs, every[0][rows], atol=3e-6, rtol=0)
    np.testing.assert_allclose(targets, every[1][rows], atol=2e-5, rtol=0)  # ... and its target is that token's
    sample = source.sample(12)
    assert isinstance(sample, tuple) and sample[0].shape == sample[1].shape == (12, TOY.d_model)


# Splicing -------------------------------------------------------------------------------------

def random_transcoder(architecture="topk", d_in=TOY.d_model, d_out=TOY.d_model, site=READS, target_site=WRITES,
                      seed=4):
    """An untrained transcoder with every array nonzero and several latents active per token."""
    keys = jax.random.split(jax.random.key(seed), 3)
    sae = SAE.init(d_in, 40, architecture, key=keys[0], k=5 if "topk" in architecture else None, threshold=0.1,
                   d_out=d_out, site=site, target_site=target_site)
    return eqx.tree_at(lambda s: (s.b_enc, s.b_dec), sae, (0.1 * jax.random.normal(keys[1], (40,)),
                                                           0.1 * jax.random.normal(keys[2], (d_out,))))


def clean(toy, also=()):
    logits, cache = jinterp.run(toy, TOKENS, capture=[READS, WRITES, "blocks.0.ln2.normalized"])
    return logits, cache[READS], cache[WRITES], *(cache[site] for site in also)


def test_splicing_a_transcoder_with_its_error_leaves_the_forward_unchanged(toy):
    logits, x, mlp_out = clean(toy)
    transcoder = random_transcoder()
    assert np.abs(np.asarray(transcoder(x) - mlp_out)).max() > 0.1  # a poor stand-in: the error term matters
    spliced, cache = jinterp.run(toy, TOKENS, capture=[WRITES], edits=[SAESplice(None, transcoder)])
    np.testing.assert_allclose(spliced, logits, atol=1e-5, rtol=0)  # measured 1.3e-6
    np.testing.assert_allclose(cache[WRITES], mlp_out, atol=1e-5, rtol=0)  # measured 9.5e-7


def test_splicing_without_the_error_replaces_the_mlp_by_the_transcoder(toy):
    logits, x, _, first_x = clean(toy, also=["blocks.0.ln2.normalized"])
    transcoder = random_transcoder()
    splice = SAESplice(None, transcoder, keep_error=False)
    assert (splice.reads, splice.site) == ("ln2.normalized", "mlp_out")
    spliced, cache = jinterp.run(toy, TOKENS, capture=[WRITES], edits=[splice])
    by_hand, _ = jinterp.run(toy, TOKENS, edits=[jinterp.Replace(WRITES, transcoder(x))])
    # Other programs: measured 0 and 0; 8 eps32 x the values' scale (2.3, 5.3) allowed.
    np.testing.assert_allclose(cache[WRITES], transcoder(x), atol=3e-6, rtol=0)
    np.testing.assert_allclose(spliced, by_hand, atol=5e-6, rtol=0)
    assert np.abs(np.asarray(spliced - logits)).max() > 1e-2
    # Two layers at once, each splice holding its own input: as layer 0's MLP patched by hand
    # followed by layer 1's splice (checked above).
    first = random_transcoder("jumprelu", site="blocks.0.ln2.normalized", target_site="blocks.0.mlp_out", seed=5)
    both, _ = jinterp.run(toy, TOKENS, edits=[SAESplice(None, first, keep_error=False), splice])
    by_hand, _ = jinterp.run(toy, TOKENS, edits=[jinterp.Replace("blocks.0.mlp_out", first(first_x)), splice])
    np.testing.assert_allclose(both, by_hand, atol=5e-6, rtol=0)  # measured 0; 8 eps32 x 5.7
    assert np.abs(np.asarray(both - spliced)).max() > 1e-2


def test_clamping_a_transcoder_latent_moves_mlp_out_by_its_decoder_row(toy):
    _, x, mlp_out = clean(toy)
    transcoder = random_transcoder(d_out=TOY.d_model)
    latents = transcoder.encode(x)
    _, cache = jinterp.run(toy, TOKENS, capture=[WRITES], edits=[SAESplice(None, transcoder).clamp([7], 2.5)])
    np.testing.assert_allclose(cache[WRITES] - mlp_out, (2.5 - latents[..., 7:8]) * transcoder.W_dec[7],
                               atol=1e-5, rtol=0)  # measured 8.6e-7
    first = int(np.argmax(np.asarray(latents[0, 3])))
    ablated = SAESplice(None, transcoder, positions=[3]).ablate(first)
    _, cache = jinterp.run(toy, TOKENS, capture=[WRITES], edits=[ablated])
    change = np.asarray(cache[WRITES] - mlp_out)
    np.testing.assert_allclose(change[:, 3], -latents[:, 3, first, None] * transcoder.W_dec[first], atol=1e-5,
                               rtol=0)  # measured 7.2e-7
    assert np.abs(np.asarray(latents[0, 3, first])) > 1e-2 and not np.abs(np.delete(change, 3, axis=1)).max() > 1e-5


def test_gradients_reach_the_mlp_input_through_the_transcoder_only(toy):
    _, x, _ = clean(toy)
    transcoder = random_transcoder()

    def metric(edits):
        logits, _ = jinterp.run(toy, TOKENS, edits=edits)
        return logits[:, -1, 3].sum()

    # Nudges (zero: the forward is unchanged) before the splice at its input, after it at its output.
    at_input, splice, at_output = eqx.filter_grad(metric)([jinterp.Add(READS, jnp.zeros((2, 9, TOY.d_model))),
                                                          SAESplice(None, transcoder),
                                                          jinterp.Add(WRITES, jnp.zeros((2, 9, TOY.d_model)))])
    at_output = at_output.vector
    np.testing.assert_allclose(splice.shift, transcoder.W_dec @ at_output.sum((0, 1)), rtol=1e-5,
                               atol=3e-7)  # measured 3e-8
    # Nudging the MLP's input moves the output through the transcoder's encoder and decoder (its
    # Jacobian, by jax.vjp on the transcoder alone), not through the MLP it stands in for.
    np.testing.assert_allclose(at_input.vector, jax.vjp(transcoder, x)[1](at_output)[0], rtol=1e-5,
                               atol=1e-7)  # measured 0; 8 eps32 x the scale (0.09) allowed
    assert np.abs(np.asarray(at_input.vector)).max() > 1e-3


@pytest.mark.parametrize("architecture, saelens_name", [("relu", "transcoder"), ("jumprelu", "jumprelu_transcoder"),
                                                       ("batchtopk", "jumprelu_transcoder")])
def test_transcoders_round_trip_the_saelens_layout(tmp_path, architecture, saelens_name):
    transcoder = random_transcoder(architecture, d_out=TOY.d_model + 3)
    save_saelens(transcoder, tmp_path)
    config = json.loads((tmp_path / "cfg.json").read_text())
    assert config["architecture"] == saelens_name and config["d_out"] == TOY.d_model + 3
    assert config["metadata"]["hook_name"] == f"blocks.{LAYER}.ln2.hook_normalized"
    assert config["metadata"]["hook_name_out"] == f"blocks.{LAYER}.hook_mlp_out"
    loaded = load_saelens(tmp_path)
    assert (loaded.site, loaded.target_site, loaded.apply_b_dec_to_input) == (READS, WRITES, False)
    x = jax.random.normal(jax.random.key(5), (6, TOY.d_model))
    np.testing.assert_array_equal(loaded.encode(x), transcoder.encode(x))
    np.testing.assert_array_equal(loaded(x), transcoder(x))


@pytest.mark.parametrize("architecture", ["relu", "jumprelu"])
def test_saelens_reads_the_transcoders_jinterp_writes_and_back(tmp_path, architecture):
    saelens = pytest.importorskip("sae_lens", reason="sae-lens (the reference library) is not installed")
    import torch

    transcoder = random_transcoder(architecture, d_out=TOY.d_model + 3)
    save_saelens(transcoder, tmp_path)
    theirs = saelens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == {"relu": "Transcoder", "jumprelu": "JumpReLUTranscoder"}[architecture]
    x = np.array(jax.random.normal(jax.random.key(6), (6, TOY.d_model)))
    with torch.no_grad():
        latents = theirs.encode(torch.from_numpy(x))
        output = theirs.decode(latents)
    # SAELens' float32 against jinterp's: bit-equal here (measured 0); 8 eps32 x the scale (2.7) allowed.
    np.testing.assert_allclose(latents.numpy(), transcoder.encode(x), atol=3e-6, rtol=0)
    np.testing.assert_allclose(output.numpy(), transcoder(x), atol=3e-6, rtol=0)
    theirs.save_model(tmp_path / "saved by SAELens")
    back = load_saelens(tmp_path / "saved by SAELens")
    assert (back.site, back.target_site, back.architecture) == (READS, WRITES, architecture)
    np.testing.assert_allclose(back(x), output.numpy(), atol=3e-6, rtol=0)  # measured 0


def test_mismatched_sites_and_shapes_get_clear_errors(toy):
    with pytest.raises(ValueError, match="writes d_out=20"):
        jinterp.run(toy, TOKENS, edits=[SAESplice(None, random_transcoder(d_out=20))])
    with pytest.raises(ValueError, match="reads d_in=30"):
        jinterp.run(toy, TOKENS, edits=[SAESplice(None, random_transcoder(d_in=30))])
    with pytest.raises(ValueError, match="needs the site it reads"):
        SAESplice(WRITES, random_transcoder(site=None))
    with pytest.raises(ValueError, match=r"layer 0\) and site='blocks.1.mlp_out'"):
        SAESplice(None, random_transcoder(site="blocks.0.ln2.normalized"))
    with pytest.raises(ValueError, match="comes before it"):
        jinterp.run(toy, TOKENS, edits=[SAESplice(None, random_transcoder(site="blocks.1.resid_post"))])
    with pytest.raises(ValueError, match="apply_b_dec_to_input=False"):
        SAE.init(4, 8, "relu", key=jax.random.key(0), d_out=6, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="SAELens has no topk transcoder.*relu, batchtopk, jumprelu"):
        save_saelens(random_transcoder(), "never-written")
    with pytest.raises(ValueError, match="not \\(input, target\\) pairs"):
        train_sae(INPUTS, "relu", 16, steps=1, target_site=WRITES)
    with pytest.raises(ValueError, match="targets must be \\[n=8192, d_out\\]"):
        ArrayActivations(jnp.asarray(INPUTS), 16, targets=jnp.asarray(TARGETS[:10]))
    with pytest.raises(ValueError, match="no MLPs"):
        mlp_sites(LINEAR, 0)
    with pytest.raises(ValueError, match="name its layer"):
        ModelActivations(toy, TOKENS, READS, 1, target_site="blocks.*.mlp_out")
    no_norm = jinterp.Config(d_model=8, n_layers=1, n_heads=2, d_head=4, d_mlp=16, d_vocab=10, n_ctx=8, norm=None,
                             positional="learned")
    assert mlp_sites(no_norm, 0) == ("blocks.0.mlp_in", "blocks.0.mlp_out")


# Attribution graphs ---------------------------------------------------------------------------

PROMPT = random_tokens(TOY.d_vocab, (1, 7), seed=3)[0]
FROZEN = ["blocks.*.attn.pattern", "blocks.*.ln1.scale", "blocks.*.ln2.scale", "ln_final.scale"]


def prompt_run(toy):
    """The prompt's logits and values at every site the graph tests read (one compiled forward)."""
    return jinterp.run(toy, PROMPT[None], capture=FROZEN + ["blocks.*.mlp_out", "blocks.*.ln2.normalized"])


@pytest.fixture(scope="module")
def graph_transcoders(toy_transcoders):
    """The toy model's trained transcoders without their decoder biases (which the error nodes then
    carry): every input reaches the targets through some node, so each target's edges sum to its
    value minus its encoder bias."""
    return [eqx.tree_at(lambda s: s.b_dec, result.sae, jnp.zeros(TOY.d_model)) for result in toy_transcoders[0]]


@pytest.fixture(scope="module")
def graph(toy, graph_transcoders):
    return attribution_graph(toy, PROMPT, graph_transcoders, max_logits=3)


def test_the_edges_into_each_node_add_up_to_its_value(toy, graph, graph_transcoders):
    transcoders = graph_transcoders
    reads = [f"blocks.{layer}.ln2.normalized" for layer in range(TOY.n_layers)]
    logits, cache = prompt_run(toy)
    n_f = graph.n_features
    assert n_f > 3 * 7 * 5  # over 5 active latents per layer and position
    for node, (layer, position, latent) in enumerate(graph.features):  # measured 1.4e-6 at most
        pre = transcoders[layer].pre_activations(cache[reads[layer]][0, position])[latent]
        assert graph.adjacency[node].sum() + transcoders[layer].b_enc[latent] == pytest.approx(float(pre), abs=1e-5)
    last = np.asarray(logits[0, -1])
    expected = last[graph.logit_tokens] - last.mean()  # logits minus their mean, as circuit-tracer
    np.testing.assert_allclose(graph.adjacency[-len(graph.logit_tokens):].sum(axis=1), expected, atol=1e-5,
                               rtol=0)  # measured 7.2e-7
    assert list(graph.logit_tokens[:1]) == [int(np.argmax(last))] and not graph.adjacency[n_f:-3].any()


def test_edges_are_direct_effects_through_frozen_attention_and_norms(toy, graph, graph_transcoders):
    transcoders = graph_transcoders
    _, cache = prompt_run(toy)
    frozen = [jinterp.Replace(site, cache.stack(site) if "*" in site else cache[site], per_layer="*" in site)
              for site in FROZEN + ["blocks.*.mlp_out"]]  # the replacement model: nothing flows through MLPs

    def change(write_layer, position, vector):
        """The frozen model's response to adding ``vector`` at one position of one layer's mlp_out."""
        sites = ["blocks.2.ln2.normalized"]
        base = jinterp.run(toy, PROMPT[None], capture=sites, edits=frozen)
        push = jinterp.Add(f"blocks.{write_layer}.mlp_out", vector, positions=[position])
        moved = jinterp.run(toy, PROMPT[None], capture=sites, edits=frozen + [push])
        return moved[1][sites[0]][0] - base[1][sites[0]][0], moved[0][0, -1] - base[0][0, -1]

    # Layer-0 features at position 2 drive layer-2 features at position 5 through attention only:
    # the strongest such edge.
    sources, targets = ([n for n, (layer, p, _) in enumerate(graph.features) if (layer, p) == at]
                        for at in ((0, 2), (2, 5)))
    block = np.abs(graph.adjacency[np.ix_(targets, sources)])
    target, source = targets[block.argmax() // len(sources)], sources[block.argmax() % len(sources)]
    (_, p_s, i_s), (_, p_t, i_t) = graph.features[source], graph.features[target]
    moved, _ = change(0, p_s, graph.activations[source] * transcoders[0].W_dec[i_s])
    # Measured 1.3e-7 (this edge) and 1.1e-7 (the error node's, below).
    assert graph.adjacency[target, source] == pytest.approx(float(moved[p_t] @ transcoders[2].W_enc[:, i_t]), abs=1e-6)
    assert abs(graph.adjacency[target, source]) > 1e-3
    # An error node's edge to the top logit (minus the mean logit).
    error = cache["blocks.1.mlp_out"][0, 4] - transcoders[1](cache["blocks.1.ln2.normalized"][0, 4])
    _, logits = change(1, 4, error)
    expected = logits[graph.logit_tokens[0]] - logits.mean()
    assert graph.adjacency[graph.logit_index(0), graph.error_index(1, 4)] == pytest.approx(float(expected), abs=1e-6)
    assert not graph.adjacency[target, graph.error_index(2, 1)]  # a layer's MLP writes after its own input


def test_pruning_keeps_the_nodes_and_edges_that_carry_the_influence_on_the_logits():
    # One token, one layer: features f0, f1, f2, the error, the embedding, one logit.
    adjacency = np.zeros((6, 6))
    f0, f1, f2, error, embedding, logit = range(6)
    adjacency[logit, [f0, f1, error]] = [9.0, -1.0, 0.0]  # f0 carries 0.9 of the logit's input
    adjacency[[f0, f1], embedding] = [2.0, 1.0]
    adjacency[f2, embedding] = 5.0  # f2 reaches nothing
    graph = AttributionGraph(np.array([4]), adjacency, np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2]]), np.ones(3), 1,
                             np.array([7]), np.array([1.0]))
    # By hand: influence = weights @ (A + A^2) with rows of |A| normalised: f0 0.9, f1 0.1, the
    # embedding 0.9 + 0.1 = 1; cumulative shares 0.5, 0.95, 1: 80% needs the embedding and f0.
    kept = prune_graph(graph, node_threshold=0.8)
    np.testing.assert_allclose(kept.influence, [0.9, 0.1, 0, 0, 1.0, 0])
    assert np.flatnonzero(kept.node_mask).tolist() == [f0, embedding, logit]
    assert sorted(zip(*np.nonzero(kept.edge_mask))) == [(f0, embedding), (logit, f0)]
    assert prune_graph(graph, node_threshold=1.0).node_mask.tolist() == [True, True, False, False, True, True]
    # The iteration equals the closed form weights @ ((I - A)^-1 - I) on a random acyclic graph.
    rng = np.random.default_rng(0)
    A = np.tril(rng.normal(size=(12, 12)), -1)
    weights = rng.random(12)
    closed = weights @ (np.linalg.inv(np.eye(12) - normalized(A)) - np.eye(12))
    np.testing.assert_allclose(influence(A, weights), closed, rtol=5e-15, atol=0)  # float64: measured 3.8e-16


def test_a_pruned_toy_graph_keeps_influential_connected_nodes(toy, graph, graph_transcoders):
    kept = prune_graph(graph)
    n, n_f, n_sources = len(graph.adjacency), graph.n_features, graph.n_features + TOY.n_layers * graph.n_pos
    assert kept.node_mask[n_sources:].all()  # embeddings and logits stay
    assert 0 < kept.node_mask[:n_f].sum() < n_f
    # The features and errors kept are among those that carry 80% of the influence, by hand...
    order = np.argsort(-kept.influence)
    share = np.cumsum(kept.influence[order]) / kept.influence.sum()
    assert set(np.flatnonzero(kept.node_mask[:n_sources])) <= set(order[:np.searchsorted(share, 0.8) + 1])
    # ... each with a kept edge out, features with one in, and edges only between kept nodes.
    edges = kept.edge_mask
    assert edges[:, kept.node_mask[:n_sources].nonzero()[0]].any(axis=0).all()
    assert edges[kept.node_mask[:n_f].nonzero()[0]].any(axis=1).all()
    assert not edges[~kept.node_mask].any() and not edges[:, ~kept.node_mask].any()
    labels = graph.labels()
    assert labels[0].startswith("feature L0 p") and labels[-1].startswith("logit '#") and len(labels) == n
    transcoders = graph_transcoders
    with pytest.raises(ValueError, match="one transcoder per layer"):
        attribution_graph(toy, PROMPT, transcoders[:2])
    with pytest.raises(ValueError, match=r"transcoders\[1\] must read a site of block 1"):
        attribution_graph(toy, PROMPT, [transcoders[0], transcoders[0], transcoders[2]])
