"""The local learning coefficient against answers known from theory and against devinterp.

All models here are fit to noiseless data, so L_n(w) - L_n(w0) is exactly the population-style loss K(w)
of the empirical input covariance, and the inverse temperature nβ is passed explicitly: the LLC is an
nβ -> infinity limit, so a large nβ (1e4) on a 100-example dataset keeps the tests both fast and close to
the limit. Full-batch gradients remove minibatch noise. Tolerances are stated at each test.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinterp
from jinterp import llc

N_EXAMPLES = 100


def test_regular_linear_regression_gives_half_the_parameter_count():
    """d = 4 parameters: λ = d/2. For a quadratic loss the stationary SGLD chain is Gaussian with a known
    covariance, so the expected estimate is exact: with Hessian eigenvalues h (of nβ L_n), A = h + γ and
    step ε, each direction contributes h / (2 A (1 - ε A / 4)) (the Euler discretisation's variance). The
    test asserts that value within 4 standard errors over chains, and that it is within 3% of d/2."""
    d, nbeta, gamma, eps = 4, 1e4, 1.0, 5e-6
    x = jax.random.normal(jax.random.key(0), (N_EXAMPLES, d))
    w0 = jnp.arange(1.0, d + 1)
    loss = lambda w, batch: 0.5 * jnp.mean((batch[0] @ w - batch[1]) ** 2)
    result = llc.estimate(loss, w0, (x, x @ w0), jax.random.key(1), step_size=eps, gamma=gamma, nbeta=nbeta,
                          chains=8, draws=2000, burnin=300)
    h = nbeta * np.linalg.eigvalsh(np.asarray(x, np.float64).T @ np.asarray(x, np.float64) / N_EXAMPLES)
    expected = float(np.sum(h / (2 * (h + gamma) * (1 - eps * (h + gamma) / 4))))
    assert abs(expected - d / 2) < 0.03 * d / 2  # measured 0.024 (of 0.06)
    # Statistical bounds (fixed seeds): measured 0.46 standard errors here.
    assert abs(result.mean - expected) < 4 * result.standard_error, (result.mean, expected, result.standard_error)
    assert result.loss_trace.shape == (8, 2000) and result.per_chain.shape == (8,) and not result.warnings
    assert result.init_loss == pytest.approx(0.0, abs=1e-10)


def test_minimally_singular_product_gives_one_half():
    """y = a b x at the true parameter (a, b) = (1, 0), on the line of true parameters {b = 0}: locally
    K = s a² b² / 2 with one flat and one quadratic direction, λ = 1/2 (2 parameters, so a regular model
    would give 1). Given a, b is Gaussian and nβ K contributes t / (2 (t + γ)) with t = nβ s a²; the
    localisation keeps a near 1 (γ = 100: sd 0.1), so the expectation is 1/2 * (1 - O(γ / nβ)) = 0.495.
    Asserted within 4 standard errors of that plus the 0.5% the t / (t + γ) factor spans for a in 1 ± 0.3."""
    x = jax.random.normal(jax.random.key(0), (N_EXAMPLES,))
    loss = lambda w, batch: 0.5 * jnp.mean((w["a"] * w["b"] * batch) ** 2)
    w0 = {"a": jnp.float32(1.0), "b": jnp.float32(0.0)}
    nbeta, gamma = 1e4, 100.0
    result = llc.estimate(loss, w0, x, jax.random.key(1), step_size=2e-6, gamma=gamma, nbeta=nbeta, chains=16,
                          draws=1500, burnin=300)
    t = nbeta * float(jnp.mean(x**2))
    expected = t / (2 * (t + gamma))
    # Measured 0.065 (of 0.142).
    assert abs(result.mean - expected) < 4 * result.standard_error + 0.005, (result.mean, result.standard_error)
    assert abs(result.mean - 1.0) > 0.3  # far from the regular answer d/2 = 1: measured 0.57


def aoyagi_watanabe(N: int, H: int, M: int, r: int) -> float:
    """The learning coefficient of reduced-rank regression (a 2-layer deep linear network) x -> B A x with
    A [H, N], B [M, H] and a true map of rank r (Aoyagi and Watanabe 2005, Theorem 1)."""
    if N + r <= M + H and M + r <= N + H and H + r <= N + M:
        odd = (N + M + H + r) % 2
        return (2 * (H + r) * (N + M) - (N - M) ** 2 - (H + r) ** 2 + odd) / 8
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    return N * M / 2


def deep_linear(N, H, M, r, key):
    """Noiseless data from a rank-r map, and the true parameter with the H - r extra hidden units switched
    off (zero rows of A and columns of B): the most singular true parameter, where the local learning
    coefficient is the global one."""
    k_x, k_a, k_b = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (N_EXAMPLES, N))
    A = jnp.zeros((H, N)).at[:r].set(jax.random.normal(k_a, (r, N)))
    B = jnp.zeros((M, H)).at[:, :r].set(jax.random.normal(k_b, (M, r)))
    loss = lambda w, batch: 0.5 * jnp.mean(jnp.sum((batch[0] @ (w[1] @ w[0]).T - batch[1]) ** 2, -1))
    return loss, (A, B), (x, x @ (B @ A).T)


def test_aoyagi_watanabe_formula_on_known_cases():
    assert aoyagi_watanabe(1, 1, 1, 0) == 0.5  # y = a b x at the origin
    assert aoyagi_watanabe(3, 3, 3, 1) == 4.0
    assert aoyagi_watanabe(2, 2, 2, 0) == 1.5
    assert aoyagi_watanabe(2, 4, 2, 1) == 2.0  # H + r > N + M: the regular count of the N x M map
    assert aoyagi_watanabe(5, 1, 2, 1) == (1 * 2 - 1 + 5) / 2  # M + H < N + r


def test_deep_linear_network_matches_aoyagi():
    """Input 3, hidden 3, output 3, true rank 1: λ = 4 against d/2 = 9 for a regular model. Tolerance 10% of
    λ: the estimate converges to λ as nβ grows with the localisation γ small against nβ; at nβ = 1e4 it
    measured 4.10 ± 0.07 (γ = 10), and it moves by about 10% when γ changes tenfold (3.68 at γ = 100)."""
    N, H, M, r, gamma, eps = 3, 3, 3, 1, 10.0, 1e-5
    loss, w0, data = deep_linear(N, H, M, r, jax.random.key(2))
    result = llc.estimate(loss, w0, data, jax.random.key(3), step_size=eps, gamma=gamma, nbeta=1e4, chains=8,
                          draws=3000, burnin=500)
    expected = aoyagi_watanabe(N, H, M, r)
    assert abs(result.mean - expected) < 0.1 * expected, (result.mean, result.standard_error, expected)  # 2.4%
    assert result.mean < 0.5 * H * (N + M) - 2  # measured 3.9 (of 7)


def test_restrict_samples_only_the_selected_weights():
    """Refined LLC of the regression's first two weights: a regular 2-parameter model, λ = 1 (within the
    same exact-Gaussian reasoning as the full test, here just 4 standard errors of 1 plus 3%). A boolean
    mask and a pytree of leaf-level bools select the same way as a boolean array."""
    d = 4
    x = jax.random.normal(jax.random.key(0), (N_EXAMPLES, d))
    w0 = {"first": jnp.array([1.0, 2.0]), "rest": jnp.array([3.0, 4.0])}
    loss = lambda w, b: 0.5 * jnp.mean((b[0] @ jnp.concatenate([w["first"], w["rest"]]) - b[1]) ** 2)
    data = (x, x @ jnp.arange(1.0, d + 1))
    kwargs = dict(step_size=2e-5, gamma=1.0, nbeta=1e4, chains=8, draws=1500, burnin=300)
    by_leaf = llc.estimate(loss, w0, data, jax.random.key(1), restrict={"first": True, "rest": False}, **kwargs)
    by_mask = llc.estimate(loss, w0, data, jax.random.key(1), restrict={"first": jnp.array([True, True]),
                                                                          "rest": jnp.array([False, False])}, **kwargs)
    assert abs(by_leaf.mean - 1.0) < 4 * by_leaf.standard_error + 0.03  # measured 0.031 (of 0.15)
    np.testing.assert_array_equal(by_leaf.loss_trace, by_mask.loss_trace)
    with pytest.raises(ValueError, match=r"shape \(3,\) does not match .* \(2,\)"):
        llc.estimate(loss, w0, data, jax.random.key(1), restrict={"first": jnp.ones(3, bool), "rest": False})


def test_per_head_refined_llc_on_a_transformer():
    """Every head of a 1-layer attention-only model in one program: the masks cover exactly one head's
    Q/K/V/O slices, each head gets its own estimate, and a rerun is bit-identical."""
    cfg = jinterp.Config(d_model=16, n_layers=1, n_heads=2, d_head=8, d_vocab=11, n_ctx=8, attn_only=True,
                         norm=None, positional="learned")
    model = jinterp.Transformer.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (64, 8), 0, 11)

    def loss(m, batch):
        logits = m(batch)[:, :-1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], -1))

    mask = llc.head_mask(model, 0, 1)
    attn = mask.blocks.attn
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        selected = getattr(attn, name)
        assert selected[0, 1].all() and not selected[0, 0].any(), name
    assert int(sum(m.sum() for m in jax.tree.leaves(mask))) == 4 * 16 * 8  # nothing else: no embeddings
    with pytest.raises(ValueError, match="L1H0 is not in this model"):
        llc.head_mask(model, 1, 0)

    kwargs = dict(step_size=1e-4, gamma=100.0, chains=2, draws=40, batch_size=16, warn=False)
    heads = llc.per_head(loss, model, tokens, jax.random.key(2), **kwargs)
    assert heads.mean.shape == (1, 2) and heads.loss_trace.shape == (1, 2, 2, 40)
    assert not np.array_equal(heads.loss_trace[0, 0], heads.loss_trace[0, 1])  # each head moved its own weights
    np.testing.assert_array_equal(heads.loss_trace[0, 0, :, 0], heads.loss_trace[0, 1, :, 0])  # same w0 and batch
    again = llc.per_head(loss, model, tokens, jax.random.key(2), **kwargs)
    np.testing.assert_array_equal(heads.loss_trace, again.loss_trace)


def test_warnings_for_divergence_and_instability():
    x = jax.random.normal(jax.random.key(0), (N_EXAMPLES, 2))
    loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
    data = (x, x @ jnp.ones(2))
    with pytest.warns(llc.LLCWarning, match="diverged"):
        result = llc.estimate(loss, jnp.ones(2), data, jax.random.key(1), step_size=1.0, nbeta=1e4, chains=2,
                              draws=200)
    assert np.isnan(result.mean) and len(result.warnings) == 2
    # Away from the minimum the chains slide down: mean loss below the loss at w0.
    with pytest.warns(llc.LLCWarning, match="below the loss at w0"):
        llc.estimate(loss, jnp.array([3.0, -1.0]), data, jax.random.key(1), step_size=1e-4, gamma=0.0, nbeta=1e4,
                     chains=2, draws=200)
    # A chain started at w0 with too small a step needs about 1 / (eps nbeta) = 500 steps to reach its
    # equilibrium spread: without a burn-in its loss is still rising through the draws, and the halves of
    # the chains disagree (split R-hat far above 1). Run long enough to mix, the same chains pass.
    d = 16
    wide = jax.random.normal(jax.random.key(2), (N_EXAMPLES, d))
    regression = (wide, wide @ jnp.ones(d))
    with pytest.warns(llc.LLCWarning, match="have not mixed: split R-hat"):
        rising = llc.estimate(loss, jnp.ones(d), regression, jax.random.key(1), step_size=2e-7, gamma=0.0, nbeta=1e4,
                              chains=4, draws=400, burnin=0)
    assert rising.rhat > 1.5  # measured 1.97
    mixed = llc.estimate(loss, jnp.ones(d), regression, jax.random.key(1), step_size=1e-5, gamma=0.0, nbeta=1e4,
                         chains=4, draws=400, burnin=200, warn=False)
    assert mixed.warnings == () and mixed.rhat < 1.1
    for bad, match in ((dict(step_size=0.0), "step_size must be"), (dict(chains=0), "chains must be"),
                       (dict(batch_size=101), "batch_size must be an int in 1..n=100")):
        with pytest.raises(ValueError, match=match):
            llc.estimate(loss, jnp.ones(2), data, jax.random.key(1), **bad)


def devinterp_llc(loss_torch, w0, nbeta, gamma, eps, chains, draws, burnin):
    """devinterp's SGLD (``SGMCMC.sgld``, full batch) from ``w0`` (numpy arrays), and devinterp's estimator
    (``compute_llc``: nβ times the chain's mean loss minus the loss at w0): per-chain LLCs."""
    torch = pytest.importorskip("torch")
    sgmcmc = pytest.importorskip("devinterp.optim.sgmcmc")
    init = float(loss_torch(*[torch.tensor(np.asarray(w)) for w in w0]))
    per_chain = []
    for chain in range(chains):
        params = [torch.nn.Parameter(torch.tensor(np.asarray(w))) for w in w0]
        sampler = sgmcmc.SGMCMC.sgld(params, lr=eps, localization=gamma, nbeta=nbeta)
        generator = torch.Generator().manual_seed(chain)
        trace = []
        for _ in range(burnin + draws):
            sampler.zero_grad()
            value = loss_torch(*params)
            value.backward()
            sampler.step(noise_generator=generator)
            trace.append(value.item())
        per_chain.append(nbeta * (np.mean(trace[burnin:]) - init))
    return np.array(per_chain)


def test_agrees_with_devinterp_on_a_deep_linear_network():
    """Same model, data, w0, nβ, γ and step size: the two means agree within 4 combined standard errors."""
    torch = pytest.importorskip("torch")
    loss, w0, (x, y) = deep_linear(2, 2, 2, 0, jax.random.key(2))
    x_t, y_t = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))
    loss_torch = lambda A, B: 0.5 * ((x_t @ (B @ A).T - y_t) ** 2).sum(-1).mean()
    settings = dict(nbeta=1e4, gamma=1.0, eps=3e-5, chains=4, draws=800, burnin=200)
    ours = llc.estimate(loss, w0, (x, y), jax.random.key(4), step_size=settings["eps"], gamma=settings["gamma"],
                        nbeta=settings["nbeta"], chains=4, draws=800, burnin=200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    try:
        theirs = devinterp_llc(loss_torch, w0, **settings)
    finally:
        torch.set_num_threads(threads)
    combined = math.hypot(ours.standard_error, theirs.std() / math.sqrt(len(theirs)))
    # Measured 2.5 combined standard errors apart (fixed seeds): 3 left almost no room; 4, as the other tests.
    assert abs(ours.mean - theirs.mean()) < 4 * combined, (ours.mean, theirs.mean(), combined)


def test_default_nbeta_and_equinox_modules():
    assert llc.default_nbeta(1000) == pytest.approx(1000 / math.log(1000))
    with pytest.raises(ValueError, match="n >= 2"):
        llc.default_nbeta(1)
    linear = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (50, 3))
    data = (x, jax.vmap(linear)(x))
    loss = lambda m, b: jnp.mean((jax.vmap(m)(b[0]) - b[1]) ** 2)
    result = llc.estimate(loss, linear, data, jax.random.key(2), step_size=1e-5, gamma=10.0, chains=2, draws=50,
                         warn=False)  # far too short to mix; this test is about the API
    assert result.nbeta == pytest.approx(50 / math.log(50)) and np.isfinite(result.mean)
