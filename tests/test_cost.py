"""What interventions cost in the compiled program (times are measured in benchmarks/)."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
from conftest import random_tokens

import jinterp
from jinterp.core import apply

CFG = jinterp.Config(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, d_vocab=101, n_ctx=32,
                     norm="rms", positional="rotary", act="silu", gated_mlp=True)
TOKENS = jnp.asarray(random_tokens(CFG.d_vocab, (2, 16)))


def compiled(fn, model, tokens):
    params, static = eqx.partition(model, eqx.is_array)
    return jax.jit(lambda p, t: fn(eqx.combine(p, static), t)).lower(params, tokens).compile()


def flops(fn, model, tokens) -> float:
    return compiled(fn, model, tokens).cost_analysis()["flops"]


def test_capturing_nothing_compiles_to_the_plain_forward():
    model = jinterp.Transformer.init(CFG, jax.random.key(0))
    plain = compiled(lambda m, t: m.forward(t)[0], model, TOKENS).as_text()
    via_run = compiled(lambda m, t: apply(m, t, ())[0], model, TOKENS).as_text()
    assert operations(plain) == operations(via_run)


def operations(hlo: str) -> list[str]:
    """Every instruction's result shape and opcode (names and numbering differ between compiles)."""
    found = (re.search(r"= (.*?) ([a-z\-]+)\(", line) for line in hlo.splitlines() if " = " in line)
    return sorted(f"{m.group(1)} {m.group(2)}" for m in found if m)


def test_capturing_every_site_adds_no_arithmetic():
    model = jinterp.Transformer.init(CFG, jax.random.key(0))
    specs = model.site_specs(TOKENS)
    captures = model.plan_captures(specs, jinterp.specs.match(specs, "all"), frozenset())[0]
    base = flops(lambda m, t: m.forward(t)[0], model, TOKENS)
    everything = flops(lambda m, t: apply(m, t, captures), model, TOKENS)
    assert everything <= 1.1 * base, (everything, base)
