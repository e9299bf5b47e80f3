"""SAE training throughput (tokens per second) on the same cached activations: jinterp's
``train_sae`` against SAELens' ``SAETrainer``, in one process. Prints medians and the ratio.

    .venv/bin/python benchmarks/sae_training.py [--batch-size 1024] [--steps 8] [--repeats 3] [--random]

Activations: SmolLM2-135M's residual stream after layer 15 (``blocks.15.resid_post``, d_in 576)
on the standard library's docstrings (``experiments/stdlib_text.py``), computed once with jinterp
(each window's first position, an attention-sink outlier, left out); ``--random`` uses a fixed
Gaussian array of the same shape instead (no model run). Both libraries get the same float32
array (torch reads the numpy array's memory).

Settings, the same in both: d_sae 4608 (8x), batch ``--batch-size`` rows drawn uniformly with
replacement, Adam (betas 0.9/0.999) at lr 3e-4, constant then decayed linearly to 0 over the last
20% of the steps, inputs rescaled to mean norm sqrt(d_in) (estimated from one batch), float32,
CPU, torch using as many threads as JAX's CPU client (the cores this process may run on). One
timed call is a whole training run from a fresh SAE (``train_sae(...)``; ``SAETrainer(...).fit()``),
of ``--steps`` steps and of three times as many; the first call of each is a warm-up (JAX compiles
there) and is not timed; calls alternate between the libraries. Two throughputs are printed: the
steady state, ``2 * steps`` batches over the difference of the two runs' times, in which each
library's fixed per-run setup cancels (what a long training run sees), and the short whole run,
setup included.

Workloads:

- ``topk``: k=32, aux-k coefficient 1/32, default dead windows (no latent can die within the
  run). Both skip the aux-k loss while no latent is dead.
- ``topk + dead``: as above with a dead window of one step in both (jinterp ``dead_window`` =
  one token, SAELens ``dead_feature_window=0``): a latent is dead when it did not fire in the
  previous batch, so both compute the aux-k loss every step. How many latents die differs
  (initialisations differ: after 4 steps SAELens had ~70% dead, jinterp ~7%), but both have at
  least ``k_aux`` = 288 dead. SAELens' aux-k work per step does not depend on how many are dead;
  jinterp's runs over the dead latents alone.
- ``relu``: ReLU with the decoder-norm-weighted L1 penalty (coefficient 5) in both, no decoder
  constraint; SAELens' standard SAE has no aux-k, so jinterp's is off (``aux_coefficient=0``).

Differences that remain (each library's own way, not switchable):

- SAELens clips the gradient norm to 1 every step; jinterp does not clip.
- Decoder norms: jinterp keeps topk decoder rows unit norm (gradient projected before Adam, rows
  renormalised after); SAELens trains topk with ``rescale_acts_by_decoder_norm`` (pre-activations
  times row norms, latents divided by them). Both compute row norms each step.
- Bookkeeping: both track steps since each latent fired; SAELens also sums firing counts per
  latent every step (``act_freq_scores``) and syncs with the host to count dead latents.
- jinterp evaluates (L0, explained variance, MSE, dead fraction) before and after the run on its
  sample (here one batch, ``sample_size=batch_size``) and initialises ``b_dec`` at that sample's
  geometric median; SAELens starts ``b_dec`` at 0 and evaluates nothing without wandb.
- jinterp draws the batch inside the compiled step; SAELens gets it from a Python iterator
  (a torch ``randint`` + gather per step, the same work).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens' fit() always draws a progress bar

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import paired  # noqa: E402  (imports jinterp before JAX starts)

import jinterp  # noqa: E402
from experiments.stdlib_text import stdlib_documents, windows  # noqa: E402

try:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
except ImportError as error:
    raise SystemExit(f"This benchmark needs SAELens, the 'reference' extra (pip install -e '.[reference]'): "
                     f"{error}") from error

SITE = "blocks.15.resid_post"
D_IN, D_SAE, K, LR, L1 = 576, 4608, 32, 3e-4, 5.0
AUX = 1 / 32
WORKLOADS = {"topk": ("topk", False), "topk + dead": ("topk", True), "relu": ("relu", False)}


def activations(n_tokens: int, random: bool) -> np.ndarray:
    """``[n_tokens, 576]`` float32: SmolLM2-135M's residual stream at ``SITE`` (or Gaussian)."""
    if random:
        return np.random.default_rng(0).standard_normal((n_tokens, D_IN), dtype=np.float32)
    model, tokenizer = jinterp.load("smollm2-135m", progress=False)
    seq = 65  # 64 kept positions per window after dropping the first
    tokens = windows(tokenizer, list(stdlib_documents().values()), seq)[: -(-n_tokens // (seq - 1))]
    forward = jax.jit(lambda t: jinterp.run(model, t, capture=[SITE])[1][SITE][:, 1:])
    chunks = [np.asarray(forward(tokens[i:i + 32])) for i in range(0, len(tokens), 32)]
    return np.concatenate(chunks).reshape(-1, D_IN)[:n_tokens]


def jinterp_run(data: np.ndarray, architecture: str, dead: bool, steps: int, batch_size: int):
    array = jax.device_put(data)
    options = {"k": K, "aux_coefficient": AUX} if architecture == "topk" else {"l1_coefficient": L1,
                                                                                "aux_coefficient": 0.0}
    if dead:
        options["dead_window"] = 1

    def run():
        trained = jinterp.sae.train_sae(array, architecture, D_SAE, steps=steps, batch_size=batch_size, lr=LR,
                                        sample_size=batch_size, eval_every=steps, progress=False, **options)
        jax.block_until_ready(trained.sae)
        return trained

    return run


def saelens_run(data: np.ndarray, architecture: str, dead: bool, steps: int, batch_size: int):
    rows = torch.from_numpy(data)
    common = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
              "normalize_activations": "expected_average_only_in"}

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            yield rows[torch.randint(0, len(rows), (batch_size,), generator=generator)]

    def run():
        torch.manual_seed(0)
        if architecture == "topk":
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=K, aux_loss_coefficient=AUX, **common))
        else:
            sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=L1, **common))
        cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                               lr=LR, lr_end=LR, lr_decay_steps=max(1, steps // 5), n_batches_for_norm_estimate=1,
                               dead_feature_window=0 if dead else 1000)
        trainer = SAETrainer(cfg, sae, batches())
        trainer.fit()
        return trainer

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed training run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192, help="cached activations (batches drawn from them)")
    parser.add_argument("--random", action="store_true", help="Gaussian activations instead of SmolLM2's")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    if args.tokens < args.batch_size:
        parser.error(f"--tokens {args.tokens} must be at least --batch-size {args.batch_size}")
    cores = len(os.sched_getaffinity(0))  # what XLA's CPU client sizes its thread pool by
    torch.set_num_threads(cores)
    data = activations(args.tokens, args.random)
    print(f"devices: jax {jax.devices()}, torch threads {torch.get_num_threads()} ({cores} cores); "
          f"{'random' if args.random else SITE} activations {data.shape}; d_sae {D_SAE}, batch {args.batch_size}, "
          f"{args.steps} steps per run, median of {args.repeats}")

    rows = []
    long_steps = 3 * args.steps
    for name in args.workloads:
        architecture, dead = WORKLOADS[name]
        runs = {}
        for steps in (args.steps, long_steps):
            setup = (data, architecture, dead, steps, args.batch_size)
            runs[f"jinterp {steps}"], runs[f"SAELens {steps}"] = jinterp_run(*setup), saelens_run(*setup)
        seconds = paired(runs, args.repeats)
        row = [name]
        for lib in ("jinterp", "SAELens"):
            short, long = seconds[f"{lib} {args.steps}"], seconds[f"{lib} {long_steps}"]
            per_step = (long - short) / (long_steps - args.steps)  # each run's fixed setup cancels
            row += [args.batch_size / per_step, args.steps * args.batch_size / short]
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{run} steps {t:.2f} s" for run, t in seconds.items()), flush=True)

    print("\ntraining throughput, tokens/s (higher is better). Steady state: from the time a run of "
          f"{long_steps} steps takes over one of {args.steps} (each run's setup cancels); whole run: "
          f"{args.steps}-step runs, setup included")
    print(f"{'workload':<14} {'jinterp':>9} {'SAELens':>9} {'ratio':>7} | {'whole run: jinterp':>18} {'SAELens':>9} "
          f"{'ratio':>7}")
    for name, ours, ours_run, theirs, theirs_run in rows:
        print(f"{name:<14} {ours:9.0f} {theirs:9.0f} {ours / theirs:6.2f}x | {ours_run:18.0f} {theirs_run:9.0f} "
              f"{ours_run / theirs_run:6.2f}x")

if __name__ == "__main__":
    main()
