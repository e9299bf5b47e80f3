"""Site names: listing with shapes, TransformerLens aliases, short forms, helpful errors."""

import numpy as np
import pytest
from conftest import TOY, random_tokens

import jinterp
from jinterp import names as S

TOKENS = random_tokens(TOY.d_vocab, (2, 5))


def test_sites_lists_every_site_with_the_shape_it_captures(toy):
    listed = jinterp.sites(toy, TOKENS)
    _, cache = jinterp.run(toy, TOKENS, capture="all")
    assert set(listed) == set(cache)
    for name, spec in listed.items():
        assert cache[name].shape == spec.shape and cache[name].dtype == spec.dtype, name
        assert len(spec.axes) == len(spec.shape) and S.site_name(spec.kind, spec.layer) == name
    symbolic = jinterp.sites(toy)
    assert symbolic["blocks.0.attn.pattern"].shape == ("batch", TOY.n_heads, "pos", "pos")
    assert symbolic["blocks.0.attn.k"].shape == ("batch", "pos", TOY.n_kv_heads, TOY.d_head)
    assert symbolic["blocks.0.attn.k"].axes == ("batch", "pos", "kv_head", "d_head")


@pytest.mark.parametrize("alias, canonical", [
    ("blocks.1.hook_resid_pre", "blocks.1.resid_pre"),
    ("blocks.2.attn.hook_z", "blocks.2.attn.z"),
    ("blocks.0.attn.hook_attn_scores", "blocks.0.attn.scores"),
    ("blocks.0.ln1.hook_scale", "blocks.0.ln1.scale"),
    ("blocks.1.mlp.hook_pre_linear", "blocks.1.mlp.pre_linear"),
    ("hook_embed", "embed"),
    ("ln_final.hook_normalized", "ln_final.normalized"),
    ("unembed.hook_out", "logits"),
    (("z", 2), "blocks.2.attn.z"),
    (("resid_pre", 1), "blocks.1.resid_pre"),
    (("scale", 1, "ln2"), "blocks.1.ln2.scale"),
    (("normalized",), "ln_final.normalized"),
    (("attn", 0), "blocks.0.attn.pattern"),
    (("rot_k", 0), "blocks.0.attn.rot_k"),
    ("k2", "blocks.2.attn.k"),
    ("pre1", "blocks.1.mlp.pre"),
    ("scale2ln1", "blocks.2.ln1.scale"),
])
def test_aliases_resolve_to_the_same_values(toy, alias, canonical):
    assert jinterp.specs.lookup(jinterp.sites(toy), alias).name == canonical
    _, by_alias = jinterp.run(toy, TOKENS, capture=[alias])
    _, by_name = jinterp.run(toy, TOKENS, capture=[canonical])
    assert np.array_equal(np.asarray(by_alias[alias]), np.asarray(by_name[canonical]))
    assert np.array_equal(np.asarray(by_alias[canonical]), np.asarray(by_name[alias]))


def test_edits_accept_aliases(toy):
    a = jinterp.run(toy, TOKENS, edits=jinterp.Zero("blocks.1.attn.hook_z", heads=[2]))[0]
    b = jinterp.run(toy, TOKENS, edits=jinterp.Zero(("z", 1), heads=[2]))[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("typo, suggestion", [
    ("blocks.0.resid_pr", "blocks.0.resid_pre"),
    ("blocks.1.attn.hook_zz", "blocks.1.attn.z"),
    ("blocks.2.attn.patern", "blocks.2.attn.pattern"),
    ("ln_final.normalised", "ln_final.normalized"),
    ("blocks.0.mlp.hook_psot", "blocks.0.mlp.post"),
])
def test_mistyped_names_list_the_closest_valid_ones(toy, typo, suggestion):
    with pytest.raises(ValueError, match="Unknown site") as error:
        jinterp.run(toy, TOKENS, capture=[typo])
    assert suggestion in str(error.value)


def test_layer_out_of_range(toy):
    with pytest.raises(ValueError, match=r"layer 7 is out of range.*3 layers"):
        jinterp.run(toy, TOKENS, capture=["blocks.7.resid_pre"])
    with pytest.raises(ValueError, match=r"layer 5 is out of range"):
        jinterp.run(toy, TOKENS, edits=jinterp.Zero("blocks.5.attn_out"))


def test_block_site_without_a_layer(toy):
    with pytest.raises(ValueError, match=r"blocks\.\{layer\}\.resid_pre"):
        jinterp.run(toy, TOKENS, capture=["resid_pre"])
    with pytest.raises(ValueError, match="name a layer"):
        jinterp.Zero("resid_pre")


def test_site_missing_from_this_architecture():
    attn_only = jinterp.Transformer.init(
        jinterp.Config(d_model=16, n_layers=2, n_heads=2, d_head=8, d_vocab=20, n_ctx=8, attn_only=True, norm=None,
                       positional=None), __import__("jax").random.key(0))
    with pytest.raises(ValueError, match="has no site 'mlp_out'"):
        jinterp.run(attn_only, TOKENS % 20, capture=["blocks.0.mlp_out"])
    with pytest.raises(ValueError, match="has no site 'ln1.scale'"):
        jinterp.run(attn_only, TOKENS % 20, edits=jinterp.Zero("blocks.0.ln1.scale"))


def test_globs_and_cache_helpers(toy):
    _, cache = jinterp.run(toy, TOKENS, capture=["blocks.*.attn.pattern", "blocks.1.attn.*"])
    assert "blocks.0.attn.pattern" in cache and "blocks.1.attn.rot_q" in cache and "blocks.0.attn.q" not in cache
    assert cache.stack("attn.pattern").shape == (TOY.n_layers, 2, TOY.n_heads, 5, 5)
    with pytest.raises(KeyError, match="was not captured.*Closest captured: blocks.0.attn.pattern"):
        cache["blocks.0.attn.patern"]
    with pytest.raises(ValueError, match="matches no site"):
        jinterp.run(toy, TOKENS, capture=["blocks.*.nothing*"])
