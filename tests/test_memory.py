"""Memory budgets: the activation estimate, ``jinterp.collect`` in chunks onto the host, sweeps,
and SAE activation streaming (``ModelActivations(memory_budget=)``)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOY, corrupted_pair, random_tokens, toy_metric

import jinterp
from jinterp import memory, patching, probes
from jinterp.collection import collect
from jinterp.sae import ModelActivations, train_sae

# The module (jinterp.collect is the function).
collect_module = importlib.import_module("jinterp.collection")


def close(actual, expected):
    """Equal up to float32 rounding of differently shaped computations: bit-equal here (measured 0);
    8 eps32 x the values' scale allowed."""
    np.testing.assert_allclose(actual, expected, atol=1e-6 * max(1.0, float(np.abs(expected).max())), rtol=0)


def toy_sequence_bytes(seq: int, resid_post_layers: int = 0, n_logits: int = 0) -> int:
    """TOY's estimate written out by hand (float32, one sequence): the sites the forward computes outside
    the blocks (embed, ln_final's scale and output, the logits) and in one block (8 residual-sized, 2
    scales, q, rot_q and z of 6 heads, k, v and rot_k of 2 kv heads, scores and pattern, 3 MLP-sized; not
    attn.result or the per-head inputs, computed only on demand), and a resid_post capture (its [n_layers,
    ...] buffer, plus the gathered copy when only some layers are captured)."""
    top = seq * (36 + 1 + 36) + n_logits * 53
    block = seq * (8 * 36 + 2 + 3 * 6 * 7 + 3 * 2 * 7 + 2 * 6 * seq + 3 * 44)
    captured = 0 if not resid_post_layers else seq * 36 * (3 + (resid_post_layers if resid_post_layers < 3 else 0))
    return 4 * (top + block + captured)


def specs_of(cfg, seq: int, n_logits: int | None = 0):
    return jinterp.models.declaration.site_specs(cfg, 1, seq, n_logits)


def test_the_estimate_counts_the_working_set_captures_and_logits():
    specs = specs_of(TOY, 7)
    assert memory.run_bytes(specs) == toy_sequence_bytes(7)
    assert memory.run_bytes(specs, [f"blocks.{i}.resid_post" for i in range(3)]) == toy_sequence_bytes(7, 3)
    assert memory.run_bytes(specs, ["blocks.1.resid_post"]) == toy_sequence_bytes(7, 1)
    assert memory.run_bytes(specs_of(TOY, 7, 2)) == toy_sequence_bytes(7, n_logits=2)
    assert memory.values_bytes(specs, ["blocks.1.resid_post", "blocks.2.attn.pattern"]) == 4 * (7 * 36 + 6 * 7 * 7)
    half = specs_of(TOY.replace(dtype="bfloat16"), 7)  # norm statistics stay float32: 2 bytes more per scale
    assert memory.run_bytes(half) == toy_sequence_bytes(7) // 2 + 2 * 7 * (1 + 36 + 2 + 2 * 36)


def chunks_seen(monkeypatch) -> list[int]:
    """The batch sizes of the forwards ``collect`` computes."""
    sizes, real = [], collect_module._chunk

    def counting(model, tokens, *args):
        values = real(model, tokens, *args)
        if not isinstance(next(iter(values.values())), jax.core.Tracer):  # not jax.eval_shape's call
            sizes.append(tokens.shape[0])
        return values

    monkeypatch.setattr(collect_module, "_chunk", counting)
    return sizes


def test_collect_every_position_equals_one_run_on_the_whole_batch(toy, monkeypatch):
    tokens = random_tokens(TOY.d_vocab, (5, 7), seed=4)
    mask = np.ones((5, 7), bool)
    mask[1, :3] = mask[3, 5:] = False  # a left-padded row and a right-padded one
    sites = ["embed", "blocks.*.resid_post", "blocks.1.attn.pattern", "blocks.2.attn.result", "logits"]
    names = ["embed", *(f"blocks.{i}.resid_post" for i in range(3)), "blocks.1.attn.pattern", "blocks.2.attn.result",
             "logits"]
    specs = specs_of(TOY, 7, None)
    each = memory.run_bytes(specs, names) + memory.values_bytes(specs, names)  # and the values returned
    sizes = chunks_seen(monkeypatch)
    got = collect(toy, tokens, sites, attention_mask=mask, memory_budget=2.5 * each, progress=False)
    assert sizes == [2, 2, 2]  # two sequences fit; the last chunk is padded with a copy of the last sequence
    logits, cache = jinterp.run(toy, tokens, capture=names, attention_mask=mask)
    assert list(got) == names
    for name in names:
        assert isinstance(got[name], np.ndarray) and got[name].shape == cache[name].shape
        close(got[name], np.asarray(cache[name]))
    close(got["logits"], np.asarray(logits))
    # At positions: the same values picked out, padding skipped by counting real tokens.
    last = collect(toy, tokens, "blocks.*.resid_post", np.full(5, -1), attention_mask=mask, progress=False)
    last_real = np.array([6, 6, 6, 4, 6])
    close(last["blocks.2.resid_post"], got["blocks.2.resid_post"][np.arange(5), last_real])
    assert probes.collect is collect


def test_the_batch_size_shrinks_with_the_budget(toy, monkeypatch):
    tokens = random_tokens(TOY.d_vocab, (6, 7), seed=5)
    each = toy_sequence_bytes(7, 3) + 4 * 3 * 7 * 36  # and the three layers' values returned
    sizes = chunks_seen(monkeypatch)
    for fit in (6, 3, 1):
        collect(toy, tokens, "blocks.*.resid_post", memory_budget=fit * each + 1, progress=False)
    assert sizes == [6, 3, 3, 1, 1, 1, 1, 1, 1]
    collect(toy, tokens, "blocks.*.resid_post", batch_size=4, memory_budget=1, progress=False)  # batch_size wins
    assert sizes[-2:] == [4, 4]


def test_a_budget_too_small_for_one_sequence_says_what_to_change(toy):
    tokens = random_tokens(TOY.d_vocab, (2, 7))
    with pytest.raises(ValueError, match=r"memory_budget=1,000 bytes .* too small: one input "
                                         r"capturing 3 site\(s\) needs about [\d,]+ bytes .* capture fewer sites"):
        collect(toy, tokens, "blocks.*.resid_post", memory_budget=1000, progress=False)
    clean, corrupt = corrupted_pair(0)
    with pytest.raises(ValueError, match=r"one patch \(a run of the 3 inputs\) needs about .* fewer or shorter inputs"):
        patching.sweep(toy, clean, corrupt, toy_metric, memory_budget=1000, progress=False)
    with pytest.raises(ValueError, match=r"too small: after [\d,]+ bytes for the copy of the 2 layers' weights run, "
                                         "one sequence of 6 tokens"):
        ModelActivations(toy, jnp.asarray(random_tokens(TOY.d_vocab, (4, 6))), "blocks.1.resid_post", 2,
                         memory_budget=1000)
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes, got -1"):
        collect(toy, tokens, "embed", memory_budget=-1, progress=False)


def test_streamed_activations_are_the_same_under_a_small_budget(toy):
    tokens = jnp.asarray(random_tokens(TOY.d_vocab, (12, 6), seed=6))
    site = "blocks.1.resid_post"
    free = ModelActivations(toy, tokens, site, sequences_per_batch=5, skip=1)
    # Room for 2 sequences per forward: a step's 5 run as 3 sub-batches of 2 (the last padded).
    two_layers = toy.first_layers(2)  # the layers run; the budget holds a copy of their weights too
    weights = sum(a.nbytes for a in jax.tree.leaves(two_layers.blocks))
    small = ModelActivations(toy, tokens, site, sequences_per_batch=5, skip=1,
                             memory_budget=weights + 2.5 * memory.run_bytes(specs_of(two_layers.cfg, 6), [site]))
    assert small.sequences_per_forward(5) == 2
    # The same rows bit for bit: each sequence's forward does not depend on the others in its batch.
    np.testing.assert_array_equal(small(jnp.int32(3)), free(jnp.int32(3)))
    np.testing.assert_array_equal(small.all(), free.all())
    np.testing.assert_array_equal(small.sample(20), free.sample(20))
    trained = [train_sae(source, "topk", 48, k=4, steps=4, lr=1e-3, eval_every=2, sample_size=40, progress=False)
               for source in (free, small)]
    np.testing.assert_array_equal(trained[1].sae.W_dec, trained[0].sae.W_dec)
    np.testing.assert_array_equal(trained[1].history["loss"], trained[0].history["loss"])
