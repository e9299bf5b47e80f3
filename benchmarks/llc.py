"""LLC estimation speed: jinterp.llc against devinterp's SGLD on the same deep linear network, data,
true parameter and sampler settings, in one process. Prints both estimates, median seconds and the ratio.

    .venv/bin/python benchmarks/llc.py [--chains 4] [--draws 500] [--repeats 3]

Model: x -> W3 W2 W1 x, widths 10 -> 20 -> 20 -> 10, fit to noiseless data from a rank-3 map (n = 1024
Gaussian inputs) at the true parameter whose extra hidden units are switched off. Sampler, the same in
both: SGLD with step size 1e-5, localisation gamma 10, nbeta = n / log n, minibatches of 64 drawn without
replacement, ``--chains`` chains of ``--draws`` steps; the estimate is nbeta times each chain's mean
minibatch loss minus the loss at w0 (devinterp's ``compute_llc``). devinterp 2's high-level ``llc()``
takes only token datasets of language models, so its side drives devinterp's sampler (``SGMCMC.sgld``, the
update of its ``sample()``) in the ordinary torch loop, chains one after another as ``sample()`` runs
them in one process, torch on one thread (its fastest here). jinterp's first call compiles and is not
timed (its time is printed); calls alternate between the libraries.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import paired

from jinterp import llc

WIDTHS, RANK, N, BATCH, STEP, GAMMA = (10, 20, 20, 10), 3, 1024, 64, 1e-5, 10.0


def problem():
    """Inputs, targets and the true parameter (numpy float32)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, WIDTHS[0])).astype(np.float32)
    weights = []
    for fan_in, fan_out in zip(WIDTHS[:-1], WIDTHS[1:]):
        w = np.zeros((fan_out, fan_in), np.float32)
        w[:RANK, :RANK] = rng.normal(size=(RANK, RANK)) / math.sqrt(RANK)
        weights.append(w)
    weights[0][:RANK] = rng.normal(size=(RANK, WIDTHS[0])) / math.sqrt(WIDTHS[0])
    weights[-1][:, :RANK] = rng.normal(size=(WIDTHS[-1], RANK)) / math.sqrt(RANK)
    product = weights[2] @ weights[1] @ weights[0]
    return x, x @ product.T, weights


def jinterp_estimate(x, y, weights, chains, draws, seed):
    def loss(ws, batch):
        out = batch[0] @ ws[0].T @ ws[1].T @ ws[2].T
        return 0.5 * jnp.mean(jnp.sum((out - batch[1]) ** 2, -1))

    data = (jnp.asarray(x), jnp.asarray(y))
    params = [jnp.asarray(w) for w in weights]
    return lambda: llc.estimate(loss, params, data, jax.random.key(seed), step_size=STEP, gamma=GAMMA,
                                chains=chains, draws=draws, batch_size=BATCH)


def devinterp_estimate(x, y, weights, chains, draws, seed):
    from devinterp.optim.sgmcmc import SGMCMC

    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    nbeta = llc.default_nbeta(N)

    def loss(ws, xb, yb):
        return 0.5 * ((xb @ ws[0].T @ ws[1].T @ ws[2].T - yb) ** 2).sum(-1).mean()

    def run():
        with torch.no_grad():
            init = float(loss([torch.from_numpy(w) for w in weights], x_t, y_t))
        per_chain = []
        for chain in range(chains):
            params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
            sampler = SGMCMC.sgld(params, lr=STEP, localization=GAMMA, nbeta=nbeta)
            generator = torch.Generator().manual_seed(seed * 1000 + chain)
            losses = []
            for _ in range(draws):
                batch = torch.randperm(N, generator=generator)[:BATCH]
                sampler.zero_grad()
                value = loss(params, x_t[batch], y_t[batch])
                value.backward()
                sampler.step(noise_generator=generator)
                losses.append(value.item())
            per_chain.append(nbeta * (np.mean(losses) - init))
        return np.array(per_chain)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # devinterp's fastest on these small matrices (2 threads: ~10x slower per step here)
    x, y, weights = problem()
    ours = jinterp_estimate(x, y, weights, args.chains, args.draws, seed=0)
    theirs = devinterp_estimate(x, y, weights, args.chains, args.draws, seed=0)
    start = time.perf_counter()
    first = ours()
    print(f"jinterp first call (compiles): {time.perf_counter() - start:.2f} s")
    per_chain = theirs()
    se = lambda v: np.std(v) / math.sqrt(len(v))  # noqa: E731
    print(f"LLC jinterp   {first.mean:.3f} ± {first.standard_error:.3f} (std {first.std:.3f})")
    print(f"LLC devinterp {per_chain.mean():.3f} ± {se(per_chain):.3f} (std {per_chain.std():.3f})")
    combined = math.hypot(first.standard_error, se(per_chain))
    print(f"difference {first.mean - per_chain.mean():+.3f} = {(first.mean - per_chain.mean()) / combined:+.2f} "
          "combined standard errors")
    times = paired({"jinterp": ours, "devinterp": theirs}, repeats=args.repeats, warmup=0)
    steps = args.chains * args.draws
    for name, seconds in times.items():
        print(f"{name:10s} {seconds:.3f} s median ({steps / seconds:,.0f} SGLD steps/s)")
    print(f"jinterp is {times['devinterp'] / times['jinterp']:.1f}x faster")


if __name__ == "__main__":
    main()
