"""treescope renderings of models, caches and sweep results: rendered to text and HTML by treescope
itself, checked against counts and shapes worked out here by hand."""

import numpy as np
import pytest
import treescope

import jinterp
from jinterp.treescope_views import sweep_view


def test_model_shows_sizes_parameter_counts_and_sites(toy):
    text = treescope.render_to_text(toy)
    d, layers, heads, kv, d_head, d_mlp, vocab = 36, 3, 6, 2, 7, 44, 53  # TOY, spelled out
    blocks = layers * (d + heads * d * d_head + 2 * kv * d * d_head + heads * d_head * d + d + 3 * d * d_mlp)
    total = vocab * d + blocks + d + d * vocab  # W_E, blocks, ln_final, untied W_U
    assert text.startswith("Transformer(")
    assert f"# {total:,} parameters: W_E {vocab * d:,}, blocks {blocks:,}, ln_final {d}, W_U {d * vocab:,}" in text
    assert "3 layers, d_model 36, 6 heads (2 kv) x d_head 7, d_mlp 44, vocab 53" in text
    assert "W_Q=<jax.Array float32(3, 6, 36, 7)" in text  # the fields are still shown
    n_sites = 1 + layers * 25 + 3  # embed, 25 block sites per layer, ln_final.scale/normalized, logits
    assert f"29 site kinds, {n_sites} sites" in text
    page = treescope.render_to_html(toy, compressed=False)  # the folded list of site kinds, with shapes
    assert "blocks.{0..2}.attn.pattern: [batch, 6, pos, pos]" in page
    assert "blocks.{0..2}.attn.k: [batch, pos, 2, 7]" in page and "logits: [batch, pos, 53]" in page


def test_cache_lists_sites_with_shapes_without_computing_derived_ones(toy):
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    _, cache = jinterp.run(toy, tokens, capture=["embed", "blocks.1.attn.pattern", "blocks.*.attn.result"])
    text = treescope.render_to_text(cache)
    assert text.startswith("Cache({")
    assert "'blocks.1.attn.pattern': <jax.Array float32(2, 6, 5, 5)" in text
    assert "'embed': <jax.Array float32(2, 5, 36)" in text
    for layer in range(3):  # z_h @ W_O[h] per head: [batch, pos, head, d_model]
        assert f"'blocks.{layer}.attn.result': <float32[2, 5, 6, 36] from attn.z, on access>" in text
    stored = (2 * 5 * 36 + 2 * 6 * 5 * 5 + 3 * 2 * 5 * 6 * 7) * 4  # embed, pattern, z of 3 layers, float32 bytes
    assert f"# {len(cache)} sites; stored arrays {stored / 1000:.1f} kB; 3 computed on access" in text
    # The value summary of a stored site is of its own values: attention rows sum to 1, mean 1/5.
    assert "'blocks.1.attn.pattern': <jax.Array float32(2, 6, 5, 5) ≈0.2 " in text


def test_sweep_view_labels_axes_and_extremes():
    values = np.zeros((3, 4))
    values[1, 2], values[2, 0] = 0.75, -0.5
    view = sweep_view(values, tokens=["<bos>", " When", " Mary", " John"], layers=[4, 5, 6], title="resid_pre")
    text = treescope.render_to_text(view)
    assert ("# resid_pre: 3 layers x 4 positions; max 0.75 at layer 5, position 2 ' Mary'; "
            "min -0.5 at layer 6, position 0 '<bos>'") in text
    page = treescope.render_to_html(view, compressed=False)
    for label in ("layer", "position", '"<bos>", " When", " Mary", " John"', '"4", "5", "6"'):
        assert label in page  # the heatmap's axis labels (hover text)

    # treescope writes axis labels into a <script> unescaped: a token "</script>" must not end it.
    hostile = sweep_view(values, tokens=["</script><b>", " When", " Mary", " John"])
    plain = sweep_view(values, tokens=["<bos>", " When", " Mary", " John"])
    pages = [treescope.render_to_html(v, compressed=False) for v in (hostile, plain)]
    assert pages[0].count("</script") == pages[1].count("</script")

    heads = sweep_view(np.arange(6.0).reshape(2, 3), per="head")
    assert "max 5 at layer 1, head 2; min 0 at layer 0, head 0" in treescope.render_to_text(heads)


def test_sweep_view_errors_name_the_problem():
    with pytest.raises(ValueError, match="3 position labels for 4 positions"):
        sweep_view(np.zeros((2, 4)), tokens=["a", "b", "c"])
    with pytest.raises(ValueError, match="per='token' is not one of position, layer, head, head_position"):
        sweep_view(np.zeros((2, 4)), per="token")
    with pytest.raises(ValueError, match="per='head_position' means axes"):
        sweep_view(np.zeros((2, 4)), per="head_position")

