"""Sharded runs on 8 CPU devices against the same runs on one device; run by test_sharding.py.

XLA_FLAGS must be set before JAX starts, so this runs in its own process:
``python tests/sharding_devices.py OUT.npz``. It saves, for every case, the single-device result
(``NAME.reference``) and the sharded one (``NAME.sharded``), plus facts about the layouts and the
error messages, for the test to check.
"""

import os
import sys

if __name__ == "__main__":  # (not when sharding_processes.py imports prompts from here)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
sys.path.insert(0, os.path.dirname(__file__))

import jax
import numpy as np
from conftest import TOY, toy_metric

import jinterp
from jinterp import attribution, patching, sharding


def prompts(batch: int, seed: int = 0):
    """Random TOY tokens [batch, 7] and a copy that differs at position 2 only."""
    clean = np.random.default_rng(seed).integers(0, TOY.d_vocab, (batch, 7)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % TOY.d_vocab
    return clean, corrupt


def main(out: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    model = jinterp.Transformer.init(TOY, jax.random.key(0), std=0.3)
    clean, corrupt = prompts(4)
    saved = {}

    def case(name, compute, sharded_model, mesh):
        saved[f"{name}.reference"] = np.asarray(compute(model, None))
        saved[f"{name}.sharded"] = sharding.to_host(compute(sharded_model, mesh))

    # 8 x 1: patches split 8 ways, weights replicated.
    data = sharding.mesh(8, 1)
    case("sweep_exact_8x1", lambda m, mesh: patching.sweep(m, clean, corrupt, toy_metric, "resid_pre", exact=True,
                                                             progress=False, mesh=mesh), model, data)

    # 4 x 2: patches split 4 ways, heads and MLP hidden units split 2 ways.
    both = sharding.mesh(4, 2)
    split = sharding.shard_model(model, both)
    saved["W_Q_shard_heads"] = np.int32(split.blocks.attn.W_Q.addressable_shards[0].data.shape[1])
    saved["W_K_shard_heads"] = np.int32(split.blocks.attn.W_K.addressable_shards[0].data.shape[1])
    saved["W_in_shard_hidden"] = np.int32(split.blocks.mlp.W_in.addressable_shards[0].data.shape[2])
    case("sweep_4x2", lambda m, mesh: patching.sweep(m, clean, corrupt, toy_metric, "resid_pre", progress=False,
                                                       mesh=mesh), split, both)
    case("path_patch_4x2", lambda m, mesh: patching.path_patch(m, clean, corrupt, toy_metric, ["blocks.2.attn.q"],
                                                                 progress=False, mesh=mesh), split, both)
    case("attribution_4x2", lambda m, mesh: attribution.attribution_patching(m, clean, corrupt, toy_metric, "z",
                                                                              mesh=mesh), split, both)

    def logits_and_z(m, mesh):
        logits, cache = jinterp.run(m, clean, capture="blocks.*.attn.z", mesh=mesh)
        if mesh is not None:
            saved["run_logits_batch_per_device"] = np.int32(logits.addressable_shards[0].data.shape[0])
        return np.concatenate([np.ravel(logits), np.ravel(cache.stack("attn.z"))])

    case("run_4x2", logits_and_z, split, both)

    # GQA with kv heads that do not divide the model axis: they are replicated.
    gqa = jinterp.Transformer.init(TOY.replace(d_mlp=48), jax.random.key(1), std=0.3)
    three = sharding.mesh(2, 3)
    split3 = sharding.shard_model(gqa, three)
    saved["gqa_W_Q_shard_heads"] = np.int32(split3.blocks.attn.W_Q.addressable_shards[0].data.shape[1])
    saved["gqa_W_K_shard_heads"] = np.int32(split3.blocks.attn.W_K.addressable_shards[0].data.shape[1])
    saved["run_gqa_2x3.reference"] = np.asarray(jinterp.run(gqa, clean[:2])[0])
    saved["run_gqa_2x3.sharded"] = sharding.to_host(jinterp.run(split3, clean[:2], mesh=three)[0])

    errors = []
    for attempt in (lambda: sharding.shard_model(model, sharding.mesh(2, 4)),  # 6 heads over 4
                    lambda: jinterp.run(model, clean[:3], mesh=data),  # batch 3 over 8
                    lambda: sharding.mesh(3, 3)):  # 9 devices
        try:
            attempt()
            errors.append("no error")
        except ValueError as error:
            errors.append(str(error))
    saved["errors"] = np.array(errors)
    np.savez(out, **saved)


if __name__ == "__main__":
    main(sys.argv[1])
