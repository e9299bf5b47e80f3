"""One process's results of a sweep, a training run and an SAE training, as sha256 digests.

``python tests/determinism_job.py SEED`` prints ``{"sweep": ..., "train": ..., "sae": ...}``;
tests/test_determinism.py runs it in two fresh processes and compares.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

import jinterp
from jinterp import patching, train
from jinterp.models import flat
from jinterp.sae import train_sae

CFG = jinterp.Config(d_model=16, n_layers=2, n_heads=2, d_head=8, d_mlp=32, d_vocab=23, n_ctx=12, norm="rms",
                     positional="rotary", act="silu", gated_mlp=True)


def digest(tree) -> str:
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        leaf = np.asarray(leaf)
        h.update(f"{leaf.dtype}{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def main(seed: int) -> dict:
    import equinox as eqx
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(seed)
    # numpy-drawn weights: Transformer.init compiles a random-number program per shape (slow here)
    model = flat.from_flat(CFG, {name: (rng.normal(0, 0.3, shape) + name.endswith(".w")).astype(np.float32)
                                 for name, shape in flat.shapes(CFG).items()})
    clean = rng.integers(0, 23, (3, 8)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % 23
    scores = patching.sweep(model, clean, corrupt, lambda logits: (logits[:, -1, 3] - logits[:, -1, 7]).mean(),
                            progress=False)

    data = jnp.asarray(rng.integers(0, 23, (32, 9)), jnp.int32)
    pick = train.shuffled_batches(32, 8, seed=seed)
    batches = eqx.Partial(lambda data, step: data[pick(step)], data)

    def loss(params, tokens):
        return optax.softmax_cross_entropy_with_integer_labels(params(tokens[:, :-1]), tokens[:, 1:]).mean()

    trained = train.train(model, loss, optax.adamw(1e-2), batches, steps=10, eval_every=10, progress=False)

    activations = rng.normal(size=(512, 16)).astype(np.float32)
    sae = train_sae(activations, "topk", 32, k=4, steps=10, batch_size=64, eval_every=10, seed=seed,
                    sample_size=128, progress=False)
    return {"sweep": digest(scores), "train": digest((eqx.filter(trained.params, eqx.is_array), trained.history)),
            "sae": digest((eqx.filter(sae.sae, eqx.is_array), sae.history))}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
