"""Every TransformerLens 3.9 hook value equals the jinterp site it aliases, on the same weights, and
jinterp's float32 is as near its float64 run as TransformerLens' float32 is."""

import numpy as np
import pytest
from conftest import random_tokens
from numerics import assert_refereed, run64

torch = pytest.importorskip("torch", reason="the `reference` extra (torch, transformers) is not installed")
from hf_models import TL_FAMILIES, build_tl

import jinterp

pytest.importorskip("transformer_lens", reason="the `reference` extra (transformer-lens<4) is not installed")

# jinterp vs TransformerLens, and jinterp's float32 vs its float64 run: measured 3.1e-6 and 4.7e-6 (llama).
ATOL = 3e-5
# TL hooks with no jinterp site: the unembedding's input (ln_final's output with its weights
# applied), the pre-norm embedding sum of BERT, and BERT's MLM head and its unembedding
# (jinterp's BERT is the encoder).
NOT_SITES = ("unembed.hook_in", "hook_full_embed", "mlm_head.")
NOT_ENCODER_SITES = ("unembed.",)


@pytest.mark.parametrize("family", TL_FAMILIES)
def test_every_transformerlens_hook_matches(reference, family):
    hf, directory, model = reference(family)
    tl = build_tl(family, hf, directory)
    tokens = random_tokens(model.cfg.d_vocab)
    with torch.no_grad():
        _, tl_cache = tl.run_with_cache(torch.tensor(tokens, dtype=torch.long))
    skip = NOT_SITES + (() if model.cfg.unembed else NOT_ENCODER_SITES)
    names = [name for name in tl_cache.keys() if not name.startswith(skip)]
    _, cache = jinterp.run(model, tokens, capture=names)  # TL names are accepted as they are
    _, exact = run64(model, tokens, capture=names)

    assert len(names) >= 10 * model.cfg.n_layers
    pooled = []  # one hook's RMS error is noisy (ratios up to 1.25 measured); all hooks' together are not
    for name in names:
        ours, theirs, expected = np.asarray(cache[name]), tl_cache[name].numpy(), exact[name]
        assert ours.shape == theirs.shape, name
        if name.endswith("attn_scores"):  # masked entries: TL uses -inf, jinterp the dtype's minimum
            visible = np.isfinite(theirs)
            assert np.array_equal(visible, ours > np.finfo(np.float32).min / 2), name
            ours, theirs, expected = ours[visible], theirs[visible], expected[visible]
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0, err_msg=f"{family}: {name}")
        assert_refereed(ours, theirs, expected, bound=ATOL, ratio=None, what=f"{family}: {name}")
        pooled.append((ours.ravel(), theirs.ravel(), expected.ravel()))
    assert_refereed(*map(np.concatenate, zip(*pooled)), bound=ATOL, what=f"{family}: every hook")
