"""Every public entry point, called wrongly: the error names the bad value and the valid choices.

Wrong site names, wrong shapes and dtypes, out-of-vocabulary tokens, too-long sequences,
mismatched clean/corrupted lengths, unknown names; plus the opt-in NaN/inf check of a run.
(tests/test_errors.py covers interventions and configs in more depth.)
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TOY, random_tokens, toy_metric
from fuzz_cases import write_tokenizer

import jinterp
from jinterp import attribution, circuits, das, lens, patching, runs, sae, train

TOKENS = random_tokens(TOY.d_vocab, (2, 6))
LONGER = random_tokens(TOY.d_vocab, (2, 7))
OUT_OF_VOCAB = TOKENS.copy()
OUT_OF_VOCAB[1, 3] = 99
TOO_LONG = np.zeros((1, 30), np.int32)


def audit(toy):
    """(call, error type, message pattern) for each wrong use."""
    _, cache = jinterp.run(toy, TOKENS, capture=lens.site_names(toy))
    stack, _ = lens.decompose_resid(toy, cache)
    sweep = lambda *args, **kw: patching.sweep(toy, *args, progress=False, **kw)  # noqa: E731
    return [
        # site names
        (lambda: jinterp.run(toy, TOKENS, capture=["blocks.0.resid_pr"]), ValueError,
         r"Unknown site 'blocks.0.resid_pr'.*Closest valid names: blocks.0.resid_pre"),
        (lambda: jinterp.run(toy, TOKENS, capture=["blocks.9.resid_pre"]), ValueError,
         r"layer 9 is out of range; this model has 3 layers of 'resid_pre' \(0..2\)"),
        (lambda: sweep(TOKENS, TOKENS, toy_metric, "resid_pr"), ValueError,
         r"Unknown site 'resid_pr'.*Closest valid names: blocks.0.resid_pre"),
        (lambda: attribution.attribution_patching(toy, TOKENS, TOKENS, toy_metric, "mlp_outt"), ValueError,
         r"Unknown site 'mlp_outt'.*Closest valid names: blocks.0.mlp_out"),
        (lambda: patching.path_patch(toy, TOKENS, TOKENS, toy_metric, ["blocks.1.attn.zz"]), ValueError,
         r"Unknown site 'blocks.1.attn.zz'.*Closest valid names: blocks.1.attn.z"),
        (lambda: cache["blocks.1.mlp.pre"], KeyError, r"'blocks.1.mlp.pre' was not captured.*Captured: "),
        (lambda: das.fit(toy, "blocks.0.resid_pr", 1, [0], TOKENS, TOKENS, np.zeros(2, np.int32), steps=1),
         ValueError, r"Unknown site 'blocks.0.resid_pr'.*blocks.0.resid_pre"),
        # other names and options
        (lambda: jinterp.load("smollm3-135m"), jinterp.LoadError,
         r"smollm3-135m: not a registered model name.*Did you mean 'smollm2-135m'.*Registered: smollm2-135m"),
        (lambda: jinterp.load("smollm2-135m", dtype="float33"), ValueError,
         r"Unknown dtype 'float33'; valid choices: float32, bfloat16, float16"),
        (lambda: sweep(TOKENS, TOKENS, toy_metric, per="positions"), ValueError,
         r"per axis 'positions' .*valid choices: 'pos', 'd_model', 'position', 'layer'"),
        (lambda: sweep(TOKENS, TOKENS, toy_metric, direction="denoising"), ValueError,
         r"Unknown patching direction 'denoising'; valid choices: 'denoise', 'noise'"),
        (lambda: sae.train_sae(np.zeros((64, 36), np.float32), "relux", 16, steps=1, progress=False), ValueError,
         r"Unknown SAE architecture 'relux'; valid choices: 'relu', 'topk'"),
        # shapes and dtypes
        (lambda: jinterp.run(toy, TOKENS.astype(np.float32)), TypeError,
         "tokens must be integer ids, got dtype float32"),
        (lambda: jinterp.run(toy, TOKENS, attention_mask=np.ones((2, 5))), ValueError,
         r"attention_mask has shape \(2, 5\), tokens have \(2, 6\)"),
        (lambda: jinterp.run(toy, TOKENS, edits=jinterp.Add("blocks.0.resid_pre", jnp.ones(36, jnp.int32))),
         TypeError, "Add vector at 'resid_pre' must be a float array, got dtype int32"),
        (lambda: jinterp.run(toy, TOKENS, edits=jinterp.Replace("blocks.0.resid_pre", jnp.ones((2, 5, 36)))),
         ValueError, r"has shape \(2, 5, 36\), which does not broadcast to the site's shape \(2, 6, 36\)"),
        (lambda: jinterp.run(toy, TOKENS, edits=jinterp.Zero("blocks.0.attn.z", heads=[9])), ValueError,
         r"head 9 is out of range: there are 6 heads \(valid 0..5\)"),
        (lambda: sweep(TOKENS, TOKENS, lambda logits: logits[:, -1]), ValueError,
         r"metric must return a scalar, got shape \(2, 53\)"),
        (lambda: lens.direct_logit_attribution(toy, cache, stack, jnp.ones((2, 35))), ValueError,
         r"directions must be \[batch=2, d_model=36\].*got shape \(2, 35\)"),
        (lambda: das.fit(toy, "blocks.0.resid_pre", 99, [0], TOKENS, TOKENS, np.zeros(2, np.int32), steps=1),
         ValueError, r"k=99 is out of range.*1..36"),
        # out-of-range ids and positions
        (lambda: jinterp.run(toy, OUT_OF_VOCAB), ValueError,
         r"Token id 99 at \[batch 1, position 3\] is outside the vocabulary \(valid ids 0..52\)"),
        (lambda: sweep(TOKENS, OUT_OF_VOCAB, toy_metric), ValueError, r"Token id 99 .*valid ids 0..52"),
        (lambda: attribution.integrated_gradients(toy, OUT_OF_VOCAB, toy_metric), ValueError,
         r"Token id 99 .*valid ids 0..52"),
        (lambda: lens.logit_directions(toy, [3, 60]), ValueError, r"token ids \[3, 60\].*valid ids 0..52"),
        (lambda: lens.logit_lens(toy, cache, position=10), ValueError,
         r"position=10 is out of range for 6 cached positions: valid -6..5"),
        (lambda: lens.accumulated_resid(toy, cache, layer=7), ValueError, r"layer=7 is out of range: valid 1..3"),
        # too long, mismatched lengths
        (lambda: jinterp.run(toy, TOO_LONG), ValueError, r"Sequence length 30 exceeds .*n_ctx=24"),
        (lambda: sweep(TOO_LONG, TOO_LONG, toy_metric), ValueError, r"Sequence length 30 exceeds .*n_ctx=24"),
        (lambda: sweep(TOKENS, LONGER, toy_metric), ValueError,
         r"clean inputs \(2, 6\) and corrupted inputs \(2, 7\) must have the same shape"),
        (lambda: attribution.attribution_patching(toy, TOKENS, LONGER, toy_metric), ValueError,
         r"clean inputs \(2, 6\) and corrupted inputs \(2, 7\)"),
        (lambda: circuits.edge_attribution(toy, TOKENS, LONGER, toy_metric), ValueError,
         r"clean inputs \(2, 6\) and corrupted inputs \(2, 7\)"),
        # counts that would silently give nothing
        (lambda: attribution.integrated_gradients(toy, TOKENS, toy_metric, steps=0), ValueError,
         "steps must be a positive int .*got 0"),
        (lambda: circuits.edge_attribution(toy, TOKENS, TOKENS, toy_metric, ig_steps=-1), ValueError,
         "ig_steps must be a non-negative int .*got -1"),
        (lambda: train.train(toy, lambda p, b: 0.0, optax.sgd(1.0), lambda s: s, steps=0), ValueError,
         "steps must be a positive int, got 0"),
    ]


def test_every_wrong_call_names_the_value_and_the_choices(toy):
    for call, error, pattern in audit(toy):
        with pytest.raises(error, match=pattern):
            call()


def test_run_configs_and_experiments():
    @dataclasses.dataclass
    class Config:
        name: str = "x"
        n: int = 3

    with pytest.raises(ValueError, match=r"Unknown Config key 'nme'; valid choices: 'n', 'name'"):
        runs.make_config(Config, overrides=["nme=3"])
    with pytest.raises(ValueError, match=r"Config key 'n' must be int, got 'abc'"):
        runs.make_config(Config, overrides=["n=abc"])
    with pytest.raises(ValueError, match=r"Unknown experiment 'iio'; valid choices: 'ioi', 'sae'"):
        runs.by_name({"ioi": None, "sae": None}, "iio")


def test_tokenizer_misuse(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = jinterp.Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        tokenizer(["ab"], padding_side="middle")
    with pytest.raises(TypeError, match="encode takes a string, got list"):
        tokenizer.encode(["ab"])


def test_check_finds_nan_and_inf_a_plain_run_returns_silently(toy):
    """``check=True``: the first NaN-making operation, or the site holding a NaN or inf, is named."""
    clean, _ = jinterp.run(toy, TOKENS, capture=["blocks.1.resid_pre"], check=True)
    # Another program (checkify's): rounding only, measured 6.7e-6.
    np.testing.assert_allclose(clean, jinterp.run(toy, TOKENS)[0], atol=5e-5, rtol=0)
    blow_up = jinterp.Scale("blocks.1.resid_pre", jnp.float32(np.inf))
    assert np.isnan(np.asarray(jinterp.run(toy, TOKENS, edits=blow_up)[0])).all()  # silent without check
    with pytest.raises(FloatingPointError, match="nan generated by primitive"):
        jinterp.run(toy, TOKENS, edits=blow_up, check=True)


def test_check_names_the_site_holding_an_inf():
    """An inf that never turns into a NaN is caught by the check of what the run returns."""
    from jinterp.checks import checked

    double = lambda x: (x * 2, {"blocks.0.resid_pre": x})  # noqa: E731  (output, cache) like the forward
    with pytest.raises(FloatingPointError, match=r"output has 1 non-finite values of 3 \(the first at index \(1,\)\)"):
        checked(double, jnp.array([1.0, np.inf, 2.0]))
    assert checked(double, jnp.array([1.0, 2.0]))[0].tolist() == [2.0, 4.0]
