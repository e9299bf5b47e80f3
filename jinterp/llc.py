"""The local learning coefficient (LLC, Lau et al. 2023) of a trained parameter ``w0``.

SGLD samples the localised, tempered posterior

    p(w) ∝ exp(-nβ L_n(w) - γ/2 |w - w0|²),      nβ = n / log n by default,

and the estimate is ``λ̂ = nβ (E_w[L_n(w)] - L_n(w0))``, with the expectation over the chains' draws
(each draw's loss is the minibatch loss its gradient step used, as in Lau et al. and devinterp). One
SGLD step with step size ε (devinterp's ``lr``) is

    w ← w - ε/2 (nβ ∇L_m(w) + γ (w - w0)) + N(0, ε),

BlackJAX's overdamped Langevin solver with its step size ε/2. A chain is one ``lax.scan``, the chains
are ``vmap``ped, and the whole estimate is one compiled program, a pure function of
(loss, parameters, data, key).

*Refined* LLCs sample only part of the weights: ``restrict`` is an equinox-style filter or a pytree of
boolean masks the shape of the parameters; gradients and noise are zero elsewhere. Masks are arrays,
so ``vmap`` over masks estimates many refined LLCs in one program: ``per_head`` does this for every
attention head of a jinterp ``Transformer``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from jinterp._compile import jit


class LLCWarning(UserWarning):
    """A chain diverged (NaN or inf), the step size looks unstable (a chain's mean loss below the loss at
    w0), or the chains have not mixed (split R-hat above ``RHAT_LIMIT``)."""


RHAT_LIMIT = 1.1  # the classic threshold (Gelman et al.) for the split R-hat of the loss traces


@dataclasses.dataclass(frozen=True)
class LLC:
    """An LLC estimate: ``mean`` and ``std`` over chains, ``per_chain`` ``[chains]``, each chain's
    ``loss_trace`` ``[chains, draws]`` (after burn-in), ``init_loss`` = L_n(w0), the ``nbeta`` used, and
    ``warnings`` (also issued as ``LLCWarning``). ``rhat``: the split R-hat of the traces (``split_rhat``)."""

    mean: float
    std: float
    per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    nbeta: float
    warnings: tuple[str, ...] = ()

    @property
    def rhat(self) -> float:
        return split_rhat(self.loss_trace[np.isfinite(self.loss_trace).all(1)])

    @property
    def standard_error(self) -> float:
        """Standard error of ``mean`` over the chains (std / sqrt(chains))."""
        return self.std / math.sqrt(len(self.per_chain))


def default_nbeta(n: int) -> float:
    """Lau et al.'s inverse temperature n β* with β* = 1 / log n."""
    if n < 2:
        raise ValueError(f"need n >= 2 examples for nbeta = n / log n, got n={n}")
    return n / math.log(n)


def masks(params, restrict=None):
    """Boolean masks (one per inexact array of ``params``, broadcast to its shape; None elsewhere) of the
    coordinates ``restrict`` selects. ``restrict``: None (everything), a function of a leaf returning a
    bool, or a pytree prefix of ``params`` holding bools or boolean arrays of the leaves' shapes."""
    floats = eqx.filter(params, eqx.is_inexact_array)
    if restrict is None:
        return jax.tree.map(lambda x: jnp.ones(x.shape, bool), floats)
    if callable(restrict) and not isinstance(restrict, eqx.Module):  # a module of masks is callable too
        return jax.tree.map(lambda x: jnp.full(x.shape, bool(restrict(x))), floats)

    def expand(spec, subtree):
        def one(x):
            mask = jnp.asarray(spec, bool)
            if mask.ndim and mask.shape != x.shape:
                raise ValueError(f"A restrict mask of shape {mask.shape} does not match its parameter's "
                                 f"shape {x.shape}")
            return jnp.broadcast_to(mask, x.shape)

        return jax.tree.map(one, subtree)

    return jax.tree.map(expand, restrict, floats, is_leaf=lambda x: x is None or isinstance(x, (bool, np.ndarray,
                                                                                                  jax.Array)))


def _index(data, i):
    return jax.tree.map(lambda x: x[i], data)


def _n_examples(data) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(data)}
    if len(sizes) != 1:
        raise ValueError(f"Every array of data must have the same leading (example) axis, got sizes {sorted(sizes)}")
    return sizes.pop()


@jit
def _chains(loss, params, mask, data, keys, nbeta, gamma, step_size, *, draws: int, burnin: int, batch_size: int):
    """Loss traces ``[chains, burnin + draws]`` of SGLD chains started at ``params``, one per key."""
    w0, static = eqx.partition(params, eqx.is_inexact_array)
    n = _n_examples(data)
    # Imported here: importing blackjax runs JAX computations, which would start the XLA backend
    # before jax.distributed.initialize could run (and slow every `import jinterp`).
    from blackjax.sgmcmc.diffusions import overdamped_langevin

    langevin = overdamped_langevin()

    def potential(w, batch):
        return loss(eqx.combine(w, static), batch)

    def step(w, key):
        k_batch, k_noise = jax.random.split(key)
        batch = data if batch_size == n else _index(data, jax.random.choice(k_batch, n, (batch_size,), replace=False))
        value, grad = jax.value_and_grad(potential)(w, batch)
        logdensity_grad = jax.tree.map(lambda g, x, x0: -(nbeta * g + gamma * (x - x0)), grad, w, w0)
        moved = langevin(k_noise, w, logdensity_grad, step_size / 2)
        return jax.tree.map(lambda x, new, m: jnp.where(m, new, x), w, moved, mask), value

    def chain(key):
        return jax.lax.scan(step, w0, jax.random.split(key, burnin + draws))[1]

    return jax.vmap(chain)(keys)


def estimate(loss: Callable[[Any, Any], Array], params, data, key: jax.Array, *, step_size: float = 1e-4,
             gamma: float = 100.0, nbeta: float | None = None, chains: int = 8, draws: int = 1000, burnin: int = 0,
             batch_size: int | None = None, restrict=None, warn: bool = True) -> LLC:
    """The LLC of ``params`` (w0) under ``loss(params, batch) -> scalar`` (the mean loss of a batch).

    ``data``: a pytree of arrays whose leading axis indexes the n examples; each step draws
    ``batch_size`` of them without replacement (None: all, full-batch gradients). ``step_size``: SGLD's
    ε; ``gamma``: the localisation strength; ``nbeta``: default n / log n. ``draws`` steps per chain are
    averaged after ``burnin`` discarded ones. ``restrict``: which coordinates are sampled (see ``masks``);
    the rest stay at w0. Any Equinox module or pytree works; non-float leaves pass through.
    """
    batch_size, nbeta = _check(data, step_size, gamma, nbeta, chains, draws, burnin, batch_size)
    mask = masks(params, restrict)
    traces = _chains(loss, params, mask, data, jax.random.split(key, chains), nbeta, gamma, step_size,
                     draws=draws, burnin=burnin, batch_size=batch_size)
    init_loss = jit(loss)(params, data)
    return summarise(np.asarray(traces)[:, burnin:], float(init_loss), nbeta, warn=warn)


def _check(data, step_size, gamma, nbeta, chains, draws, burnin, batch_size):
    n = _n_examples(data)
    for name, value in (("step_size", step_size), ("gamma", gamma)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0) or \
                (name == "step_size" and value == 0):
            raise ValueError(f"{name} must be a finite number > 0 (gamma may be 0), got {value!r}")
    for name, value, least in (("chains", chains, 1), ("draws", draws, 1), ("burnin", burnin, 0)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    batch_size = n if batch_size is None else batch_size
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be an int in 1..n={n} (or None: full batch), got {batch_size!r}")
    nbeta = default_nbeta(n) if nbeta is None else float(nbeta)
    if not nbeta > 0:
        raise ValueError(f"nbeta must be > 0, got {nbeta}")
    return batch_size, nbeta


def summarise(traces: Float[np.ndarray, "chains draws"], init_loss: float, nbeta: float, *,
              warn: bool = True) -> LLC:
    """The estimate from loss traces and L_n(w0), with diagnostics: a chain whose trace holds NaN or inf
    diverged (it is left out of mean and std, which are NaN if every chain diverged); a chain whose mean
    loss is below L_n(w0) (a negative LLC) means the step size is too large or w0 is not a local minimum;
    chains that have not mixed (``split_rhat`` above ``RHAT_LIMIT``) drift or disagree."""
    traces = np.asarray(traces, np.float64)
    per_chain = nbeta * (traces.mean(1) - init_loss)
    problems = []
    finite = np.isfinite(traces).all(1)
    for c in np.nonzero(~finite)[0]:
        first = int(np.argmin(np.isfinite(traces[c])))
        problems.append(f"chain {c} diverged: its loss is {traces[c, first]} at draw {first}; lower step_size "
                        "or raise gamma")
    for c in np.nonzero(finite & (per_chain < 0))[0]:
        problems.append(f"chain {c}'s mean loss {traces[c].mean():.6g} is below the loss at w0 {init_loss:.6g} "
                        f"(LLC {per_chain[c]:.4g} < 0): the step size is unstable or w0 is not a local minimum")
    rhat = split_rhat(traces[finite])
    if rhat > RHAT_LIMIT:
        halves = traces[finite][:, :traces.shape[1] // 2].mean(), traces[finite][:, traces.shape[1] // 2:].mean()
        problems.append(f"the chains have not mixed: split R-hat of the loss traces is {rhat:.3g} > {RHAT_LIMIT} (mean "
                        f"loss {halves[0]:.6g} in the first half of the draws, {halves[1]:.6g} in the second, "
                        f"{init_loss:.6g} at w0), so the spread over chains understates the error; a loss that keeps "
                        "rising means the chains are leaving w0's basin (lower step_size or raise gamma), otherwise "
                        "raise draws or burnin")
    if warn:
        for problem in problems:
            warnings.warn(problem, LLCWarning, stacklevel=3)
    kept = per_chain[finite]
    mean = float(kept.mean()) if kept.size else float("nan")
    std = float(kept.std()) if kept.size else float("nan")
    return LLC(mean, std, per_chain, traces, float(init_loss), float(nbeta), tuple(problems))


def split_rhat(traces: Float[np.ndarray, "chains draws"]) -> float:
    """Gelman-Rubin's potential scale reduction of the loss traces with each chain split in halves
    (BlackJAX's ``potential_scale_reduction``; Gelman et al., Bayesian Data Analysis, 3rd ed., 11.4):
    near 1 when every half-chain samples the same distribution; above 1 when chains disagree or
    drift (a chain still climbing out of w0's basin, or too few draws for how slowly it mixes)."""
    from blackjax.diagnostics import potential_scale_reduction  # lazily: importing BlackJAX starts JAX's backend

    half = traces.shape[1] // 2
    if half < 2 or len(traces) == 0:
        return float("nan")
    return float(potential_scale_reduction(np.concatenate([traces[:, :half], traces[:, half:2 * half]])))


# Refined LLCs for attention heads -----------------------------------------------------------------

def head_mask(model, layer: int, head: int) -> Any:
    """Masks (see ``masks``) of one attention head's weights in a jinterp ``Transformer``: its rows of
    ``W_Q``, ``W_O`` (and ``b_Q``) and the ``W_K``, ``W_V`` (``b_K``, ``b_V``) of the key/value head it
    reads (shared with the other query heads of its group under grouped-query attention)."""
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
        raise ValueError(f"head L{layer}H{head} is not in this model: layers 0..{cfg.n_layers - 1}, "
                         f"heads 0..{cfg.n_heads - 1}")
    kv_head = head // cfg.group_size
    none = jax.tree.map(lambda x: jnp.zeros(x.shape, bool), eqx.filter(model, eqx.is_inexact_array))

    def select(mask, index):
        return None if mask is None else mask.at[layer, index].set(True)

    attn = none.blocks.attn
    chosen = {name: select(getattr(attn, name), head) for name in ("W_Q", "W_O", "b_Q")}
    chosen |= {name: select(getattr(attn, name), kv_head) for name in ("W_K", "W_V", "b_K", "b_V")}
    return eqx.tree_at(lambda m: [getattr(m.blocks.attn, k) for k in chosen], none, list(chosen.values()),
                       is_leaf=lambda x: x is None)


@dataclasses.dataclass(frozen=True)
class HeadLLCs:
    """Refined LLCs of every head: ``mean``, ``std`` ``[layer, head]``, ``per_chain`` ``[layer, head, chains]``,
    ``loss_trace`` ``[layer, head, chains, draws]``, ``init_loss`` and ``nbeta``, ``warnings``."""

    mean: np.ndarray
    std: np.ndarray
    per_chain: np.ndarray
    loss_trace: np.ndarray
    init_loss: float
    nbeta: float
    warnings: tuple[str, ...] = ()


def per_head(loss: Callable, model, data, key: jax.Array, *, step_size: float = 1e-4, gamma: float = 100.0,
             nbeta: float | None = None, chains: int = 8, draws: int = 1000, burnin: int = 0,
             batch_size: int | None = None, warn: bool = True) -> HeadLLCs:
    """The refined LLC of every attention head of a jinterp ``Transformer`` (``head_mask``), all heads in
    one program (the chains vmapped over the heads' masks); same arguments as ``estimate``. Every head's
    chains use the same keys, so differences between heads are not sampling noise in the minibatches."""
    batch_size, nbeta = _check(data, step_size, gamma, nbeta, chains, draws, burnin, batch_size)
    cfg = model.cfg
    heads = [(layer, head) for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    stacked = jax.tree.map(lambda *m: jnp.stack(m), *[head_mask(model, layer, head) for layer, head in heads])
    keys = jax.random.split(key, chains)
    run = lambda mask: _chains(loss, model, mask, data, keys, nbeta, gamma, step_size,  # noqa: E731
                               draws=draws, burnin=burnin, batch_size=batch_size)
    traces = np.asarray(jit(jax.vmap(run))(stacked))[:, :, burnin:]
    init_loss = float(jit(loss)(model, data))
    results = [summarise(t, init_loss, nbeta, warn=False) for t in traces]
    problems = tuple(f"L{layer}H{head}: {p}" for (layer, head), r in zip(heads, results) for p in r.warnings)
    if warn:
        for problem in problems:
            warnings.warn(problem, LLCWarning, stacklevel=2)
    shape = (cfg.n_layers, cfg.n_heads)
    return HeadLLCs(np.array([r.mean for r in results]).reshape(shape),
                    np.array([r.std for r in results]).reshape(shape),
                    np.stack([r.per_chain for r in results]).reshape(*shape, chains),
                    traces.reshape(*shape, *traces.shape[1:]), init_loss, nbeta, problems)


def as_arrays(result: LLC | HeadLLCs) -> dict[str, np.ndarray]:
    """The result's arrays (for a run checkpoint); warnings are recomputed from them by ``summarise``."""
    return {"mean": np.asarray(result.mean, np.float64), "std": np.asarray(result.std, np.float64),
            "per_chain": np.asarray(result.per_chain), "loss_trace": np.asarray(result.loss_trace),
            "init_loss": np.asarray(result.init_loss, np.float64), "nbeta": np.asarray(result.nbeta, np.float64)}


def over_training(snapshots: dict[int, Any], loss: Callable, data, key: jax.Array, *, run=None, name: str = "llc",
                  heads: bool = False, description: str = "LLC", **settings) -> dict[str, np.ndarray]:
    """The LLC (and with ``heads=True`` every head's refined LLC) of each parameter snapshot ``{step: params}``
    (e.g. ``train(..., snapshot_every=k).snapshots``), with the same key for each, so the curve over training
    is not noise in the draws. With a ``run`` each snapshot's result is a checkpointed step ``NAME/STEP``:
    a rerun restores it, bit for bit. ``settings`` are ``estimate``'s. Returns stacked arrays: ``step``,
    ``mean``, ``std``, ``per_chain``, ``loss_trace``, ``init_loss``, ``nbeta`` (and ``head_mean``,
    ``head_std``, ``head_per_chain`` ``[snapshots, layer, head, ...]``)."""
    if not snapshots:
        raise ValueError("No snapshots to estimate: train with snapshot_every=... to keep some")

    def one(params):
        values = as_arrays(estimate(loss, params, data, key, warn=False, **settings))
        if heads:
            refined = per_head(loss, params, data, key, warn=False, **settings)
            values |= {"head_mean": refined.mean, "head_std": refined.std, "head_per_chain": refined.per_chain}
        return values

    results = []
    steps = sorted(snapshots)
    for step in tqdm(steps, desc=description, unit="snapshot", disable=run is None or run.quiet):
        compute = lambda params=snapshots[step]: one(params)
        results.append(compute() if run is None else run.step(f"{name}/{step:09d}", compute))
    stacked = {key: np.stack([np.asarray(r[key]) for r in results]) for key in results[0]}
    return {"step": np.asarray(steps, np.int64), **stacked}


NO_PROBLEMS = ("no chain diverged, no chain's mean loss fell below the loss at its snapshot, and the chains mixed "
               f"(split R-hat at most {RHAT_LIMIT} at every snapshot).")


def rhats(results: dict[str, np.ndarray]) -> np.ndarray:
    """The split R-hat (``split_rhat``) of every snapshot of ``over_training``'s results, finite chains only."""
    traces = np.asarray(results["loss_trace"], np.float64)
    return np.asarray([split_rhat(t[np.isfinite(t).all(1)]) for t in traces])


def problems(results: dict[str, np.ndarray]) -> list[str]:
    """The diagnostics (``summarise``'s warnings) of every snapshot of ``over_training``'s results."""
    found = []
    for i, step in enumerate(results["step"]):
        summary = summarise(results["loss_trace"][i], float(results["init_loss"][i]), float(results["nbeta"][i]),
                            warn=False)
        found += [f"step {int(step)}: {p}" for p in summary.warnings]
    return found


__all__ = ["LLC", "NO_PROBLEMS", "RHAT_LIMIT", "HeadLLCs", "LLCWarning", "as_arrays", "default_nbeta", "estimate",
           "head_mask", "masks", "over_training", "per_head", "problems", "rhats", "split_rhat", "summarise"]
