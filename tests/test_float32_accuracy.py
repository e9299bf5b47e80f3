"""The two places the layer code computes differently from the textbook formula for float32 accuracy
on CPU (README "Numerics"): products with the weights summed in blocks (``layers.contract``) and the
tanh-approximated GELU written with the logistic function. Both must be the same function; how much
closer to float64 they bring the models is measured against transformers in test_named_models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinterp.models import layers

SPECS = [  # every contraction the layers use: (spec, x shape, W shape, W's contracted axis)
    ("...d,de->...e", (2, 5, 301), (301, 11), 0),
    ("bsd,hde->bshe", (2, 5, 150), (3, 150, 7), 1),
    ("bshd,hde->bshe", (2, 5, 3, 301), (3, 301, 7), 1),
    ("bqhe,hed->bqd", (2, 5, 3, 256), (3, 256, 37), 1),
    ("bqhe,hed->bqhd", (2, 5, 3, 37), (3, 37, 37), 1),
    ("bkxe,bske->bkxs", (2, 1, 6, 130), (2, 3, 1, 130), 3),
]


@pytest.mark.parametrize("spec, x_shape, w_shape, axis", SPECS)
def test_contract_is_the_einsum_for_any_length(spec, x_shape, w_shape, axis):
    """Lengths that do not divide into the blocks (301, 150, 130) and too short to split (37) included."""
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
    exact = np.einsum(spec, x.astype(np.float64), W.astype(np.float64))
    ours = np.asarray(jax.jit(lambda x, W: layers.contract(spec, x, W, axis))(x, W))
    assert ours.shape == exact.shape
    # Measured at most 3.3e-7 x scale over these shapes: float32 rounding of sums of up to 768 terms.
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1.7e-6 * np.abs(exact).max())


@pytest.mark.parametrize("dtype, products", [(jnp.float32, 4), (jnp.bfloat16, 1)])
def test_contract_splits_float32_only(dtype, products):
    """A 256-term sum: four partial products in float32 (on CPU, where the suite runs); bfloat16 is
    left to the dot's own float32 accumulation."""
    x, W = jnp.ones((2, 256), dtype), jnp.ones((256, 3), dtype)
    jaxpr = str(jax.make_jaxpr(lambda x, W: layers.contract("...d,de->...e", x, W, 0))(x, W))
    assert jaxpr.count("dot_general") == products


def test_gelu_tanh_is_the_tanh_formula():
    x = np.linspace(-12, 12, 200_001)
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    with jax.enable_x64(True):
        in_float64 = np.asarray(layers.activation("gelu_tanh", jnp.asarray(x)))
    np.testing.assert_allclose(in_float64, tanh_form, rtol=0, atol=1e-14)  # measured 1.8e-15
    in_float32 = np.asarray(jax.jit(lambda v: layers.activation("gelu_tanh", v))(x.astype(np.float32)))
    # Measured 1.5e-7 x max(|gelu|, 1) (jax.nn.gelu's tanh form: 5.5e-7 on XLA:CPU).
    assert (np.abs(in_float32 - tanh_form) / np.maximum(np.abs(tanh_form), 1)).max() < 7.5e-7
