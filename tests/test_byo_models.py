"""Bring your own model: an Equinox MLP, a Flax linen CNN and a Flax nnx transformer, each
trained or built here, get captures, edits, sweeps and attribution checked against hand-written math
(manual calls of the same weights, and Flax's own ``capture_intermediates``)."""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jinterp
from jinterp import attribution, byo, patching

# --- an Equinox MLP that marks its own site, trained on XOR quadrants ----------------------------


class MLP(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden, self.out = eqx.nn.Linear(2, 16, key=k1), eqx.nn.Linear(16, 2, key=k2)

    def __call__(self, x, hook=None):  # x: [batch, 2]
        h = jinterp.byo.site("hidden", jax.nn.relu(jax.vmap(self.hidden)(x)), hook)
        return jax.vmap(self.out)(h)


def _train(loss, params, steps, lr=0.03):
    optimizer = optax.adam(lr)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def _xor(n, seed):
    x = jax.random.uniform(jax.random.key(seed), (n, 2), minval=-1, maxval=1)
    return x, (x[:, 0] * x[:, 1] > 0).astype(jnp.int32)


@pytest.fixture(scope="module")
def mlp():
    x, y = _xor(512, 0)
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    model = _train(loss, MLP(jax.random.key(1)), 200, lr=0.05)
    test_x, test_y = _xor(256, 2)
    assert (model(test_x).argmax(-1) == test_y).mean() > 0.9  # it learned the task: measured 0.98
    return model


def shapes(specs) -> dict:
    return {name: spec.shape for name, spec in specs.items()}


def _hidden(model, x):
    W, b = np.asarray(model.hidden.weight), np.asarray(model.hidden.bias)
    return np.maximum(np.asarray(x) @ W.T + b, 0)


def _readout(model, h):
    return h @ np.asarray(model.out.weight).T + np.asarray(model.out.bias)


def _margin(out):  # logit of "same sign" minus "different sign", averaged over the batch
    return (out[:, 1] - out[:, 0]).mean()


CLEAN_X = jnp.asarray([[0.5, 0.7], [-0.6, -0.4], [0.3, 0.9]])
CORRUPT_X = CLEAN_X * jnp.asarray([1.0, -1.0])


def test_equinox_capture_and_edits(mlp):
    wrapped = byo.wrap(mlp)
    assert shapes(jinterp.sites(wrapped, CLEAN_X)) == {"hidden": (3, 16)}
    out, cache = jinterp.run(wrapped, CLEAN_X, capture="hidden")
    h = _hidden(mlp, CLEAN_X)
    # numpy float32 against XLA float32: a few roundings. Measured 0 (cache) and 8e-8 relative (out).
    np.testing.assert_allclose(cache["hidden"], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, mlp(CLEAN_X), rtol=1e-6)
    v = np.linspace(-1, 1, 16).astype(np.float32)
    out, cache = jinterp.run(wrapped, CLEAN_X, capture="hidden", edits=jinterp.Add("hidden", v, scale=0.5))
    np.testing.assert_allclose(out, _readout(mlp, h + 0.5 * v), rtol=1e-5, atol=1e-5)  # measured 0
    np.testing.assert_allclose(cache["hidden"], h + 0.5 * v, rtol=1e-5, atol=1e-6)  # after the edit; measured 0
    zeroed, _ = jinterp.run(wrapped, CLEAN_X, edits=jinterp.Zero("hidden"))
    np.testing.assert_array_equal(zeroed, np.broadcast_to(np.asarray(mlp.out.bias), (3, 2)))  # 0 @ W + b is b
    basis = np.random.default_rng(1).normal(size=(16, 2)).astype(np.float32)
    out, cache = jinterp.run(wrapped, CLEAN_X, capture="hidden", edits=jinterp.Project("hidden", basis))
    q = np.linalg.qr(basis)[0]
    np.testing.assert_allclose(cache["hidden"], h - h @ q @ q.T, rtol=1e-5, atol=2e-6)  # measured 2.4e-7
    # A Capture listed before an edit records the value before it.
    _, cache = jinterp.run(wrapped, CLEAN_X, edits=[jinterp.Capture("hidden"), jinterp.Zero("hidden")])
    np.testing.assert_allclose(cache["hidden"], h, rtol=1e-5, atol=1e-6)  # measured 0


def test_equinox_sweep_and_attribution(mlp):
    wrapped = byo.wrap(mlp)
    scores = patching.sweep(wrapped, CLEAN_X, CORRUPT_X, _margin, "hidden")  # per hidden unit (its last axis)
    clean, corrupt = _hidden(mlp, CLEAN_X), _hidden(mlp, CORRUPT_X)
    expected = []
    for unit in range(16):
        patched = corrupt.copy()
        patched[:, unit] = clean[:, unit]
        expected.append(_margin(_readout(mlp, patched)))
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-6)  # measured 1.9e-6 at 29 (8.9e-8 relative)
    # The margin is linear in the hidden layer: gradient = W_out[1] - W_out[0] over the batch.
    grad = np.asarray(mlp.out.weight[1] - mlp.out.weight[0]) / len(clean)
    estimate = attribution.attribution_patching(wrapped, CLEAN_X, CORRUPT_X, _margin, "hidden")
    np.testing.assert_allclose(estimate, ((clean - corrupt) * grad).sum(0), rtol=1e-5, atol=1e-6)  # measured 1.9e-6
    np.testing.assert_allclose(estimate, scores - _margin(_readout(mlp, corrupt)), rtol=1e-4,
                               atol=1e-5)  # measured 4.1e-6 (2.2e-6 relative)
    whole = patching.sweep(wrapped, CLEAN_X, CORRUPT_X, _margin, "hidden", per=())  # the whole site at once
    np.testing.assert_allclose(whole, _margin(_readout(mlp, clean)), rtol=1e-6)  # measured 7.4e-8 relative


def test_equinox_jit_vmap_grad_through_an_edit(mlp):
    wrapped = byo.wrap(mlp)
    h = _hidden(mlp, CLEAN_X)
    steered = jax.jit(lambda v: _margin(jinterp.run(wrapped, CLEAN_X, edits=jinterp.Add("hidden", v))[0]))
    vectors = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    np.testing.assert_allclose(jax.vmap(steered)(vectors), [_margin(_readout(mlp, h + v)) for v in vectors],
                               rtol=1e-5, atol=1e-5)  # measured 3.8e-6 at 56 (2.4e-7 relative)
    grad = jax.grad(steered)(jnp.zeros(16))
    np.testing.assert_allclose(grad, np.asarray(mlp.out.weight[1] - mlp.out.weight[0]), rtol=1e-6,
                               atol=1e-6)  # measured 4.8e-7 (9e-8 relative)


def test_equinox_errors(mlp):
    wrapped = byo.wrap(mlp)
    with pytest.raises(TypeError, match=r"Equinox implements jinterp's site protocol already"):
        byo.wrap(wrapped)
    with pytest.raises(TypeError, match=r"Transformer implements jinterp's site protocol already"):
        byo.wrap(jinterp.Transformer.init(jinterp.Config(d_model=8, n_layers=1, n_heads=2, d_head=4, d_vocab=5,
                                                         n_ctx=4, attn_only=True), jax.random.key(0)))
    with pytest.raises(ValueError, match="Unknown site 'hiden'.*Closest valid names: hidden"):
        jinterp.run(wrapped, CLEAN_X, edits=jinterp.Zero("hiden"))
    with pytest.raises(ValueError, match="Unknown site 'hiden'.*Closest valid names: hidden"):
        jinterp.run(wrapped, CLEAN_X, capture="hiden")
    with pytest.raises(ValueError, match=r"positions= given but this site has no 'pos' axis \(axes \('batch', 'd'\)\)"):
        jinterp.run(wrapped, CLEAN_X, edits=jinterp.Zero("hidden", positions=[0]))
    named = byo.wrap(mlp, axes={"hid*": ("batch", "pos")})  # name the axes: positions= index the units
    out, _ = jinterp.run(named, CLEAN_X, edits=jinterp.Zero("hidden", positions=[0, -1]))
    h = _hidden(mlp, CLEAN_X)
    h[:, [0, -1]] = 0
    np.testing.assert_allclose(out, _readout(mlp, h), rtol=1e-5, atol=1e-5)  # measured 0 (numpy vs XLA)
    with pytest.raises(ValueError, match=r"Add vector at 'hidden' has shape \(3,\).*\(3, 16\)"):
        jinterp.run(wrapped, CLEAN_X, edits=jinterp.Add("hidden", jnp.ones(3)))
    with pytest.raises(TypeError, match="attention_mask: options this Equinox model does not take"):
        jinterp.run(wrapped, CLEAN_X, attention_mask=jnp.ones((3, 2)))
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        patching.sweep(wrapped, CLEAN_X, CLEAN_X, jnp.sum, "hidden", mesh=object())
    with pytest.raises(TypeError, match="Cannot wrap a function"):
        byo.wrap(lambda x: x)


# --- a Flax linen CNN, trained to tell where a bright spot is ---------------------------------


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # [batch, 6, 6, 1]
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(2)(x.mean((1, 2)))


def _spots(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.1, (n, 6, 6, 1)).astype(np.float32)
    rows, cols = rng.integers(0, 6, n), rng.integers(0, 6, n)
    images[np.arange(n), rows, cols, 0] += 2.0
    return jnp.asarray(images), jnp.asarray((cols >= 3).astype(np.int32))


@pytest.fixture(scope="module")
def cnn():
    model, (x, y) = CNN(), _spots(128, 0)
    variables = model.init(jax.random.key(0), x[:1])
    loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()
    variables = _train(loss, variables, 100)
    test_x, test_y = _spots(128, 1)
    assert (model.apply(variables, test_x).argmax(-1) == test_y).mean() > 0.85  # measured 0.99
    return model, variables


def test_linen_capture_equals_capture_intermediates(cnn):
    model, variables = cnn
    wrapped = byo.wrap(model, variables)
    x = _spots(3, 5)[0]
    assert shapes(jinterp.sites(wrapped, x)) == {"Conv_0": (3, 6, 6, 4), "Conv_1": (3, 6, 6, 4), "Dense_0": (3, 2)}
    out, cache = jinterp.run(wrapped, x, capture="all")
    expected_out, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    # Another compiled program over the same Flax code: bit-equal here (measured 0), a few roundings allowed.
    np.testing.assert_allclose(out, expected_out, rtol=1e-6)
    for name in ("Conv_0", "Conv_1", "Dense_0"):
        np.testing.assert_allclose(cache[name], state["intermediates"][name]["__call__"][0], rtol=1e-5, atol=1e-6)


def _cnn_after_conv0(variables, h0):
    """The CNN from Conv_0's output on, by hand from the same parameters."""
    params = variables["params"]
    h1 = nn.Conv(4, (3, 3)).apply({"params": params["Conv_1"]}, jax.nn.relu(h0))
    return nn.Dense(2).apply({"params": params["Dense_0"]}, jax.nn.relu(h1).mean((1, 2)))


def test_linen_sweep_and_attribution_per_channel(cnn):
    model, variables = cnn
    wrapped = byo.wrap(model, variables)
    clean = _spots(4, 7)[0]
    corrupt = jnp.flip(clean, axis=2)  # the spot in the other half
    metric = lambda logits: (logits[:, 1] - logits[:, 0]).mean()
    scores = patching.sweep(wrapped, clean, corrupt, metric, "Conv_0", per="channel")
    conv0 = jax.jit(lambda x: nn.Conv(4, (3, 3)).apply({"params": variables["params"]["Conv_0"]}, x))
    h_clean, h_corrupt = conv0(clean), conv0(corrupt)
    rest = jax.jit(lambda h: metric(_cnn_after_conv0(variables, h)))
    expected = [rest(h_corrupt.at[..., c].set(h_clean[..., c])) for c in range(4)]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)  # measured 0 (other programs)
    grad = jax.jit(jax.grad(rest))(h_corrupt)
    estimate = attribution.attribution_patching(wrapped, clean, corrupt, metric, "Conv_0", per="channel")
    np.testing.assert_allclose(estimate, ((h_clean - h_corrupt) * grad).sum((0, 1, 2)), rtol=1e-5,
                               atol=1e-6)  # measured 0 (another summation order: a few roundings of 8.4)
    # per (height, width): one patch per pixel of every channel
    grid = patching.sweep(wrapped, clean, corrupt, metric, "Conv_0", per=("height", "width"))
    assert grid.shape == (6, 6)
    patched = h_corrupt.at[:, 2, 4].set(h_clean[:, 2, 4])
    np.testing.assert_allclose(grid[2, 4], rest(patched), rtol=1e-5, atol=1e-5)  # measured 0 (other programs)


# --- a small Flax nnx transformer ------------------------------------------------------------

VOCAB, D, HEADS, SEQ = 11, 16, 2, 6


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
        self.out = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        b, s, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3 * HEADS, D // HEADS), 3, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS)
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
        z = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v)
        return self.out(z.reshape(b, s, D))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.ln1, self.ln2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
        self.attn = Attention(rngs)
        self.mlp_in, self.mlp_out = nnx.Linear(D, 4 * D, rngs=rngs), nnx.Linear(4 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))


class TinyTransformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (SEQ, D)))
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.ln_final = nnx.LayerNorm(D, rngs=rngs)
        self.unembed = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


def _manual_forward(model, tokens, attn_edit=lambda layer, a: a):
    """The transformer by hand, block by block, with ``attn_edit(layer, attn output)`` applied."""
    x = model.embed(tokens) + model.pos[...]
    for layer, block in enumerate(model.blocks):
        x = x + attn_edit(layer, block.attn(block.ln1(x)))
        x = x + block.mlp_out(jax.nn.gelu(block.mlp_in(block.ln2(x))))
    return model.unembed(model.ln_final(x))


def _attn_outputs(model, *tokens):
    """Each block's attention output for each token array, by hand (one compiled program)."""
    def outputs(tokens):
        found = {}
        _manual_forward(model, tokens, lambda layer, a: found.setdefault(layer, a))
        return found

    return jax.jit(lambda all_tokens: [outputs(t) for t in all_tokens])(tokens)


TOKENS_CLEAN = jnp.asarray([[1, 4, 2, 7, 3, 5], [2, 9, 9, 1, 0, 6]], jnp.int32)
TOKENS_CORRUPT = TOKENS_CLEAN.at[:, 1].set(8)


def _logit_diff(logits):
    return (logits[:, -1, 3] - logits[:, -1, 5]).mean()


@pytest.fixture(scope="module")
def transformer():
    return nnx.jit(lambda: TinyTransformer(nnx.Rngs(0)))()  # one compiled init, not one per op


def test_nnx_sites_and_capture(transformer):
    wrapped = byo.wrap(transformer)
    found = jinterp.sites(wrapped, TOKENS_CLEAN)
    assert list(found)[:6] == ["embed", "blocks.0.ln1", "blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.0.attn",
                               "blocks.0.ln2"]
    assert found["blocks.1.attn"].shape == (2, SEQ, D) and found["unembed"].shape == (2, SEQ, VOCAB)
    logits, cache = jinterp.run(wrapped, TOKENS_CLEAN, capture=["blocks.*.attn", "embed"])
    np.testing.assert_allclose(logits, transformer(TOKENS_CLEAN), rtol=1e-5, atol=5e-6)  # measured 8.2e-7
    outputs, = _attn_outputs(transformer, TOKENS_CLEAN)
    for layer in range(2):  # measured 6.6e-7
        np.testing.assert_allclose(cache[f"blocks.{layer}.attn"], outputs[layer], rtol=1e-5, atol=5e-6)
    np.testing.assert_array_equal(cache["embed"], transformer.embed(TOKENS_CLEAN))  # a lookup: the same bits
    assert sorted(cache) == ["blocks.0.attn", "blocks.1.attn", "embed"]
    with pytest.raises(ValueError, match=r"Unknown site 'blocks\.0\.atn'.*Closest valid names: blocks\.0\.attn"):
        jinterp.run(wrapped, TOKENS_CLEAN, edits=jinterp.Zero("blocks.0.atn"))


def test_nnx_edits_with_layers_positions_and_per_layer(transformer):
    wrapped = byo.wrap(transformer)
    v = jnp.linspace(-1, 1, D)
    logits, _ = jinterp.run(wrapped, TOKENS_CLEAN, edits=jinterp.Add("blocks.*.attn", v, positions=[-1], layers=[1]))
    expected = jax.jit(lambda: _manual_forward(transformer, TOKENS_CLEAN,
                                               lambda layer, a: a.at[:, -1].add(v) if layer == 1 else a))()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)  # measured 8.3e-7
    # Patching every layer from another run's cache: a per-layer Replace, as for jinterp's transformers.
    _, corrupt_cache = jinterp.run(wrapped, TOKENS_CORRUPT, capture="blocks.*.attn")
    stacked = jnp.stack([corrupt_cache[f"blocks.{layer}.attn"] for layer in range(2)])
    logits, _ = jinterp.run(wrapped, TOKENS_CLEAN, edits=jinterp.Replace("blocks.*.attn", stacked, per_layer=True,
                                                                          positions=[2]))
    outputs, = _attn_outputs(transformer, TOKENS_CORRUPT)
    expected = jax.jit(lambda: _manual_forward(transformer, TOKENS_CLEAN,
                                               lambda layer, a: a.at[:, 2].set(outputs[layer][:, 2])))()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)  # measured 9.5e-7


def test_nnx_sweep_attribution_and_vmap(transformer):
    wrapped = byo.wrap(transformer)
    scores = patching.sweep(wrapped, TOKENS_CLEAN, TOKENS_CORRUPT, _logit_diff, "blocks.*.attn")
    assert scores.shape == (2, SEQ)
    clean, corrupt = _attn_outputs(transformer, TOKENS_CLEAN, TOKENS_CORRUPT)
    layers, positions = jnp.repeat(jnp.arange(2), SEQ), jnp.tile(jnp.arange(SEQ), 2)
    at = lambda layer, p, i: (i == layer) & (jnp.arange(SEQ) == p)[None, :, None]  # layer i is `layer`, at position p

    def patched(layer, p):
        return _logit_diff(_manual_forward(transformer, TOKENS_CORRUPT,
                                           lambda i, a: jnp.where(at(layer, p, i), clean[i], a)))

    expected = jax.jit(jax.vmap(patched))(layers, positions).reshape(2, SEQ)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)  # measured 8.5e-7
    # Position 0 is the same in both runs: each layer's patch there changes nothing, in one compiled sweep.
    np.testing.assert_array_equal(scores[:, 0], np.broadcast_to(scores[0, 0], (2,)))

    deltas = {layer: jnp.zeros_like(corrupt[layer]) for layer in range(2)}
    grads = jax.jit(jax.grad(lambda d: _logit_diff(_manual_forward(transformer, TOKENS_CORRUPT,
                                                                   lambda i, a: a + d[i]))))(deltas)
    estimate = attribution.attribution_patching(wrapped, TOKENS_CLEAN, TOKENS_CORRUPT, _logit_diff, "blocks.*.attn")
    expected = jnp.stack([((clean[layer] - corrupt[layer]) * grads[layer]).sum((0, 2)) for layer in range(2)])
    np.testing.assert_allclose(estimate, expected, rtol=1e-5, atol=1e-7)  # measured 6e-8

    # vmap over traced positions and layers: one compiled program ablating each (layer, position).
    ablate = lambda layer, p: _logit_diff(jinterp.run(wrapped, TOKENS_CLEAN, edits=jinterp.Zero(
        "blocks.*.attn", layers=layer[None], positions=p[None]))[0])
    got = jax.jit(jax.vmap(ablate))(layers, positions)
    zeroed = lambda layer, p: _logit_diff(_manual_forward(transformer, TOKENS_CLEAN,
                                                          lambda i, a: jnp.where(at(layer, p, i), 0, a)))
    np.testing.assert_allclose(got, jax.jit(jax.vmap(zeroed))(layers, positions), rtol=1e-5,
                               atol=1e-6)  # measured 0 (other programs: a few roundings of 0.97)


# --- site naming: layers of different shapes, shared modules, scoped Equinox submodules --------


class Growing(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 5, rngs=rngs)])

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(3)
        return dense(jax.nn.relu(dense(x)))


class Stack(eqx.Module):
    blocks: list

    def __call__(self, x, hook=None):
        for i, block in enumerate(self.blocks):  # the same code for every block: names prefixed per block
            x = jinterp.byo.site("out", jnp.tanh(jax.vmap(block)(x)), byo.scope(hook, f"blocks.{i}"))
        return x


def test_site_naming():
    x = jnp.asarray([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    growing = Growing(nnx.Rngs(0))
    wrapped = byo.wrap(growing)
    assert shapes(jinterp.sites(wrapped, x)) == {"layers.0": (2, 4), "layers.1": (2, 5)}
    # "layers.*" with layers=[1]: a value of layer 1's shape never meets layer 0's.
    out, cache = jinterp.run(wrapped, x, capture="layers.*", edits=jinterp.Replace("layers.*", jnp.ones(5), layers=[1]))
    kernel, bias = np.asarray(growing.layers[0].kernel[...]), np.asarray(growing.layers[0].bias[...])
    np.testing.assert_allclose(cache["layers.0"], np.asarray(x) @ kernel + bias, rtol=1e-5, atol=1e-6)  # measured 0
    np.testing.assert_array_equal(out, np.ones((2, 5)))  # relu(1) after the replaced layer
    assert "__call__" not in vars(nnx.List) and not hasattr(nnx.Linear.__call__, "__wrapped__")  # classes restored
    # Built inside vmap, an edit's layer is traced: it acts at the one layer whose shape it fits.
    values = jnp.arange(15.0).reshape(3, 5) - 7
    out = jax.vmap(lambda v: jinterp.run(wrapped, x, edits=jinterp.Replace("layers.1", v))[0])(values)
    np.testing.assert_array_equal(out, np.broadcast_to(np.maximum(values, 0)[:, None], (3, 2, 5)))
    # Sweeps over layers of different shapes: each patched alone (a traced layer would meet both shapes).
    metric = lambda out: out.sum()
    clean_out = metric(growing(x))
    np.testing.assert_allclose(patching.sweep(wrapped, x, -x, metric, "layers.*", per=()), [clean_out] * 2,
                               rtol=1e-6)  # measured 0 (other programs: a few roundings)
    h_clean, h_corrupt = (np.asarray(x) @ kernel + bias), (-np.asarray(x) @ kernel + bias)
    kernel1, bias1 = np.asarray(growing.layers[1].kernel[...]), np.asarray(growing.layers[1].bias[...])
    expected = []
    for unit in range(4):
        h = h_corrupt.copy()
        h[:, unit] = h_clean[:, unit]
        expected.append(np.maximum(np.maximum(h, 0) @ kernel1 + bias1, 0).sum())
    np.testing.assert_allclose(patching.sweep(wrapped, x, -x, metric, "layers.0"), expected, rtol=1e-6,
                               atol=1e-6)  # measured 2.4e-7 at 6.9

    twice = Twice()
    variables = twice.init(jax.random.key(0), x)
    shared = byo.wrap(twice, variables)
    assert list(jinterp.sites(shared, x)) == ["Dense_0", "Dense_0:1"]  # the second call of one module
    out, cache = jinterp.run(shared, x, capture="all", edits=jinterp.Scale("Dense_0", 2.0))
    dense = lambda h: nn.Dense(3).apply({"params": variables["params"]["Dense_0"]}, h)
    np.testing.assert_allclose(cache["Dense_0"], 2 * dense(x), rtol=1e-5, atol=1e-6)  # measured 0
    np.testing.assert_allclose(out, dense(jax.nn.relu(2 * dense(x))), rtol=1e-5, atol=1e-6)  # measured 0

    keys = jax.random.split(jax.random.key(3), 2)
    stack = byo.wrap(Stack([eqx.nn.Linear(3, 3, key=k) for k in keys]))
    assert list(jinterp.sites(stack, x)) == ["blocks.0.out", "blocks.1.out"]
    out, cache = jinterp.run(stack, x, capture="blocks.*.out", edits=jinterp.Zero("blocks.*.out", layers=[0]))
    np.testing.assert_array_equal(cache["blocks.0.out"], 0)
    np.testing.assert_allclose(out, np.tanh(np.asarray(jax.vmap(stack.module.blocks[1])(jnp.zeros((2, 3))))),
                               rtol=1e-6)  # measured 1.3e-7 relative (numpy tanh vs XLA)


def test_a_probe_on_captured_equinox_activations_reads_what_the_inputs_do_not_show(mlp):
    """XOR is not linear in the inputs, but the trained MLP's hidden layer makes it so: a linear probe on
    the captured site finds it, the same probe on the raw inputs cannot."""
    x, y = _xor(1024, 3)
    _, cache = jinterp.run(byo.wrap(mlp), x, capture="hidden")
    on_hidden = jinterp.probes.train_probe(np.asarray(cache["hidden"]), np.asarray(y), steps=300, progress=False)
    on_inputs = jinterp.probes.train_probe(np.asarray(x), np.asarray(y), steps=300, progress=False)
    assert on_hidden.held_out_accuracy > 0.9 and on_inputs.held_out_accuracy < 0.7  # measured 0.98 and 0.51
