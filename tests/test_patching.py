"""Patching sweeps and path patching: equal to single patched runs, to TransformerLens, and to
hand-written references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY, corrupted_pair
from conftest import toy_metric as metric
from numerics import assert_refereed, float64

import jinterp
from jinterp import names as S
from jinterp import patching

CLEAN, CORRUPT = corrupted_pair(0)
RNG = np.random.default_rng(0)


PER = {"position": ("pos",), "layer": (), "head": ("head",), "head_position": ("head", "pos")}


def single_patches(model, kind, per, direction="denoise"):
    """The reference: one jinterp.run per patch, in a Python loop over layers and per-axis indices."""
    base, source = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    _, cache = jinterp.run(model, source, capture=f"blocks.*.{kind}")
    spec = jinterp.sites(model, base)[f"blocks.0.{kind}"]
    sizes = [next(size for axis, size in zip(spec.axes, spec.shape) if S.role(axis) == role) for role in PER[per]]
    out = []
    for layer in range(model.cfg.n_layers):
        for index in np.ndindex(*sizes):
            at = dict(zip(PER[per], index))
            edit = jinterp.Replace(f"blocks.{layer}.{kind}", cache[f"blocks.{layer}.{kind}"],
                                   positions=[at["pos"]] if "pos" in at else None,
                                   heads=[at["head"]] if "head" in at else None)
            out.append(metric(jinterp.run(model, base, edits=edit)[0]))
    return np.asarray(out).reshape(model.cfg.n_layers, *sizes)


@pytest.mark.parametrize("site, per, shape", [
    ("resid_pre", "position", (3, 7)), ("resid_mid", "position", (3, 7)), ("attn_out", "position", (3, 7)),
    ("mlp_out", "layer", (3,)), ("z", "head", (3, 6)), ("q", "head_position", (3, 6, 7)), ("k", "head", (3, 2)),
    ("v", "head_position", (3, 2, 7)), ("pattern", "head", (3, 6))])
def test_exact_sweep_equals_a_loop_of_single_patches_bit_for_bit(toy, site, per, shape):
    kind = patching.SHORT_NAMES.get(site, site)
    swept = patching.sweep(toy, CLEAN, CORRUPT, metric, site, per=per, exact=True, chunk_size=4, progress=False)
    assert swept.shape == shape
    assert np.array_equal(np.asarray(swept), single_patches(toy, kind, per))


@pytest.mark.parametrize("site, per", [("resid_pre", "position"), ("resid_post", "layer"), ("z", "head"),
                                       ("q", "head_position"), ("k", "head_position"), ("v", "head"),
                                       ("pattern", "head_position")])
def test_vmapped_sweep_matches_to_float32_rounding_whatever_the_chunking(toy, site, per):
    """The default sweep skips patches that change nothing and runs only the positions from the
    first differing token on (2 here), attending to cached keys and values before it."""
    kind = patching.SHORT_NAMES.get(site, site)
    reference = single_patches(toy, kind, per)
    for chunk in (None, 5, 1000):
        swept = patching.sweep(toy, CLEAN, CORRUPT, metric, site, per=per, chunk_size=chunk, progress=False)
        # Other programs than the loop's: measured 0; 8 eps32 x the metric's scale (2.1) allowed.
        np.testing.assert_allclose(np.asarray(swept), reference, atol=2e-6, rtol=0)


def test_forward_from_cached_keys_and_values_equals_the_full_forward(toy):
    mask = np.ones_like(CLEAN)
    mask[1, :3] = 0
    logits, cache = jinterp.run(toy, CLEAN, capture=["blocks.*.attn.rot_k", "blocks.*.attn.v"], attention_mask=mask)
    for first in (1, 4):
        prefix = (cache.stack("attn.rot_k")[:, :, :first], cache.stack("attn.v")[:, :, :first])
        suffix = toy.forward(jnp.asarray(CLEAN), (), jnp.asarray(mask), prefix=prefix)[0]
        np.testing.assert_allclose(np.asarray(suffix), np.asarray(logits[:, first:]), atol=5e-5,
                                   rtol=0)  # measured 5.9e-6


def test_cached_prefix_is_refused_for_encoders():
    encoder = jinterp.Transformer.init(TOY.replace(causal=False), jax.random.key(0))
    _, cache = jinterp.run(encoder, CLEAN, capture=["blocks.*.attn.rot_k", "blocks.*.attn.v"])
    prefix = (cache.stack("attn.rot_k")[:, :, :2], cache.stack("attn.v")[:, :, :2])
    with pytest.raises(ValueError, match="needs a causal model"):
        encoder.forward(jnp.asarray(CLEAN), prefix=prefix)


@pytest.mark.parametrize("family", ["gemma", "gpt2", "neox"])
def test_vmapped_sweep_on_other_families_with_left_padding(family):
    """Sliding-window layers with q/k norm (Gemma 3), learned positions (GPT-2), parallel blocks and
    partial rotary (NeoX); rows of different lengths, left-padded, with a metric over every position."""
    cfg = {"gemma": TOY.replace(layer_types=("local", "global", "local"), sliding_window=3, qk_norm=True,
                                norm_placement="sandwich", act="gelu_tanh"),
           "gpt2": jinterp.Config(d_model=24, n_layers=3, n_heads=4, d_head=6, d_mlp=40, d_vocab=53, n_ctx=16,
                                  norm="layer", positional="learned", act="gelu"),
           "neox": TOY.replace(parallel=True, n_kv_heads=6, rotary_dim=4, norm="layer")}[family]
    model = jinterp.Transformer.init(cfg, jax.random.key(1), std=0.3)
    mask = np.ones_like(CLEAN)
    mask[0, :2] = 0  # row 0 is left-padded by two tokens

    def every_position(logits):
        return (logits[..., 3] * np.arange(1, 8)).mean()

    base, source = CORRUPT, CLEAN
    _, cache = jinterp.run(model, source, capture="blocks.*.attn.z", attention_mask=mask)
    expected = np.zeros((cfg.n_layers, cfg.n_heads))
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            edit = jinterp.Replace(f"blocks.{layer}.attn.z", cache[f"blocks.{layer}.attn.z"], heads=[head])
            expected[layer, head] = every_position(jinterp.run(model, base, edits=edit, attention_mask=mask)[0])
    swept = patching.sweep(model, CLEAN, CORRUPT, every_position, "z", attention_mask=mask, progress=False)
    np.testing.assert_allclose(np.asarray(swept), expected, atol=1e-5, rtol=0)  # measured 9.5e-7


def test_noising_direction_and_layer_subsets(toy):
    noised = patching.sweep(toy, CLEAN, CORRUPT, metric, "resid_pre", direction="noise", exact=True,
                            progress=False)
    assert np.array_equal(np.asarray(noised), single_patches(toy, "resid_pre", "position", "noise"))
    subset = patching.sweep(toy, CLEAN, CORRUPT, metric, "resid_pre", layers=[2, 0], exact=True, progress=False)
    everything = patching.sweep(toy, CLEAN, CORRUPT, metric, "resid_pre", exact=True, progress=False)
    assert np.array_equal(np.asarray(subset), np.asarray(everything)[[0, 2]])


def test_sanity_of_resid_patching(toy):
    """Patching the clean residual into every position at layer 0 gives the clean run, and
    positions the corruption does not reach (before position 2) change nothing at layer 0."""
    swept = patching.sweep(toy, CLEAN, CORRUPT, metric, "resid_pre", progress=False)
    clean_score, corrupt_score = float(metric(toy(CLEAN))), float(metric(toy(CORRUPT)))
    # Other programs than the plain runs: measured 0 and 0; 8 eps32 x the metric's scale (1.1) allowed.
    np.testing.assert_allclose(np.asarray(swept[0, :2]), corrupt_score, atol=1e-6)
    np.testing.assert_allclose(float(swept[0, 2]), clean_score, atol=1e-6)  # the only differing token


def test_patches_that_change_nothing_are_not_computed(toy):
    """The residual streams differ only from the corrupted position 2 on, and at layer 0 (the
    embeddings, before any attention) only there: 1 + 5 + 5 of 21 patches change anything."""
    chunks = patching.sweep_chunks(toy, CLEAN, CORRUPT, metric, "resid_pre", chunk_size=1)
    assert chunks.n == 11 and "10 change nothing" in chunks.description
    assert patching.sweep_chunks(toy, CLEAN, CORRUPT, metric, "resid_pre", chunk_size=1, exact=True).n == 21
    assert patching.sweep_chunks(toy, CLEAN, CORRUPT, metric, "z", chunk_size=1).n == 3 * 6  # z: all positions


def test_logit_positions_limits_the_unembedding(toy):
    full = patching.sweep(toy, CLEAN, CORRUPT, metric, "z", progress=False)
    last = patching.sweep(toy, CLEAN, CORRUPT, metric, "z", logit_positions=[-1], progress=False)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full), atol=2e-6)  # measured 0; 8 eps32 x 2.1


def test_sweep_errors(toy):
    with pytest.raises(ValueError, match="must have the same shape"):
        patching.sweep(toy, CLEAN, CORRUPT[:, :5], metric)
    with pytest.raises(ValueError, match=r"Unknown site 'resid_pr'.*Closest valid names: blocks.0.resid_pre"):
        patching.sweep(toy, CLEAN, CORRUPT, metric, "resid_pr")
    with pytest.raises(ValueError, match="Unknown per axis 'channel' for site 'blocks.0.attn.z' .*valid choices: "
                                         "'pos', 'head', 'd_head'"):
        patching.sweep(toy, CLEAN, CORRUPT, metric, "z", per="channel")
    with pytest.raises(ValueError, match=r"layer 5 is not among the swept sites' layers \(0, 1, 2\)"):
        patching.sweep(toy, CLEAN, CORRUPT, metric, "z", layers=[5])
    with pytest.raises(ValueError, match="Unknown patching direction 'backwards'"):
        patching.sweep(toy, CLEAN, CORRUPT, metric, direction="backwards")


def test_path_patching_matches_a_hand_written_reference(toy):
    """Sender (l, h) -> receiver q of layer 2, heads 1 and 4, noising direction."""
    receivers = [("blocks.2.attn.q", [1, 4])]
    result = patching.path_patch(toy, CLEAN, CORRUPT, metric, receivers, direction="noise", progress=False)
    _, clean = jinterp.run(toy, CLEAN, capture="blocks.*.attn.z")
    _, corrupt = jinterp.run(toy, CORRUPT, capture="blocks.*.attn.z")
    expected = np.zeros((TOY.n_layers, TOY.n_heads))
    for layer in range(TOY.n_layers):
        for head in range(TOY.n_heads):
            freeze = [jinterp.Replace(f"blocks.{i}.attn.z", clean[f"blocks.{i}.attn.z"]) for i in range(TOY.n_layers)]
            sender = jinterp.Replace(f"blocks.{layer}.attn.z", corrupt[f"blocks.{layer}.attn.z"], heads=[head])
            _, step1 = jinterp.run(toy, CLEAN, edits=freeze + [sender], capture="blocks.2.attn.q")
            patched = jinterp.Replace("blocks.2.attn.q", step1["blocks.2.attn.q"], heads=[1, 4])
            expected[layer, head] = metric(jinterp.run(toy, CLEAN, edits=patched)[0])
    # Other programs: measured 0 and 0; 8 eps32 x the metric's scale (1.1) allowed.
    np.testing.assert_allclose(np.asarray(result), expected, atol=1e-6)
    clean_score = float(metric(toy(CLEAN)))
    np.testing.assert_allclose(np.asarray(result[2]), clean_score, atol=1e-6)  # same-layer senders cannot reach q
    assert np.abs(np.asarray(result[:2]) - clean_score).max() > 1e-3  # measured 0.41


def test_path_patching_to_the_final_residual(toy):
    result = patching.path_patch(toy, CLEAN, CORRUPT, metric, ["blocks.2.resid_post"], direction="noise",
                                 progress=False)
    assert result.shape == (TOY.n_layers, TOY.n_heads) and np.isfinite(np.asarray(result)).all()
    with pytest.raises(ValueError, match="must name one layer"):
        patching.path_patch(toy, CLEAN, CORRUPT, metric, ["blocks.*.resid_post"])


@pytest.fixture(scope="module")
def gpt2_tl(reference):
    from hf_models import build_tl

    hf, directory, model = reference("gpt2")
    return model, build_tl("gpt2", hf, directory)


def _tl_sweeps(tl, clean, corrupt, answers):
    import torch
    from transformer_lens import patching as tl_patching

    def tl_metric(logits):
        last = logits[:, -1]
        return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).mean()

    with torch.no_grad():
        _, clean_cache = tl.run_with_cache(clean)
        resid = tl_patching.get_act_patch_resid_pre(tl, corrupt, clean_cache, tl_metric)
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(tl, corrupt, clean_cache, tl_metric)
    return resid.numpy(), heads.numpy()


def answer_metric(answers):
    answers = jnp.asarray(answers)

    def jax_metric(logits):
        last = logits[:, -1]
        return (jnp.take_along_axis(last, answers[:, :1], 1) - jnp.take_along_axis(last, answers[:, 1:], 1)).mean()

    return jax_metric


def test_sweeps_equal_transformerlens_on_gpt2(gpt2_tl):
    torch = pytest.importorskip("torch")
    model, tl = gpt2_tl
    clean = RNG.integers(0, model.cfg.d_vocab, (2, 8)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 3] = (corrupt[:, 3] + 11) % model.cfg.d_vocab
    answers = np.array([[5, 9], [17, 2]])
    tl_resid, tl_heads = _tl_sweeps(tl, torch.tensor(clean).long(), torch.tensor(corrupt).long(),
                                    torch.tensor(answers))
    ours_resid = patching.sweep(model, clean, corrupt, answer_metric(answers), "resid_pre", progress=False)
    ours_heads = patching.sweep(model, clean, corrupt, answer_metric(answers), "z", progress=False)
    with jax.enable_x64(True):
        exact_resid, exact_heads = (np.asarray(patching.sweep(float64(model), clean, corrupt, answer_metric(answers),
                                                              site, progress=False)) for site in ("resid_pre", "z"))
    # Measured 7.2e-7 and 5.4e-7 from TransformerLens; 6.6e-7 and 6.8e-7 from the float64 sweeps. The RMS of 24
    # and 15 values is noisy (ratios to TransformerLens' error measured 1.39 and 1.22): a multiple of 3.
    for ours, theirs, exact, site in ((ours_resid, tl_resid, exact_resid, "resid_pre"),
                                      (ours_heads, tl_heads, exact_heads, "z")):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=5e-6, rtol=0, err_msg=site)
        assert_refereed(np.asarray(ours), theirs, exact, bound=5e-6, ratio=3.0, what=site)
    assert np.abs(tl_resid).max() > 0.1  # the corruption matters: measured 0.91
    # SmolLM2-135M against TransformerLens' loop takes minutes: benchmarks/sweep.py checks it (1e-4).
