"""jinterp's main workloads on one GPU, float32 and bfloat16, against the same workloads in PyTorch
(transformers, TransformerLens, SAELens) where those are installed with CUDA. Under 10 minutes on
one GPU:

    PYTHONPATH=. python benchmarks/gpu.py [--repeats 10]

It refuses to run (exit status 2) unless JAX's default backend is a GPU: numbers measured on a CPU
by mistake are worse than none. ``--allow-cpu`` runs it anyway on small shapes, labelled as such,
to check that the script works where there is no GPU.

Model: SmolLM2-135M (its weights when the package is installed, else random weights of its shapes:
timing depends on shapes only; the PyTorch side needs the weights). Workloads:

- forward: tokens/s at 8 x 14, 4 x 64, 2 x 256, 1 x 1024 and 32 x 256 random tokens (transformers:
  the same shapes);
- sweeps: activation patching of ``resid_pre`` at every layer and position and of ``attn.z`` at every
  layer and head, on 8 IOI prompts of 14 tokens (random 16-token ones without the weights), patches/s
  (TransformerLens: ``get_act_patch_resid_pre`` and ``get_act_patch_attn_head_out_all_pos``, one
  forward per patch);
- attribution patching of ``resid_pre`` and ``attn.z`` on the same prompts, ms per call;
- a long prompt (2,048 tokens, the last 8 of them corrupted): a run capturing every layer's
  residual stream, a ``z`` sweep and ``z`` attribution patching, seconds and peak device memory;
- SAE training: TopK (k 32, d_sae 16 x 576) on 65,536 cached random activations, 20 steps of
  batch 4,096 per timed call, tokens/s (SAELens: ``SAETrainer`` on the same array).

Medians over ``--repeats`` timed calls after one untimed call (compilation); the long-prompt
workloads are timed once after their compilation.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import timed  # noqa: E402

import jinterp  # noqa: E402
from jinterp import attribution, patching  # noqa: E402
from jinterp.loading import registry  # noqa: E402

SMOLLM2 = jinterp.Config(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_head=64, d_mlp=1536, d_vocab=49152,
                         n_ctx=8192, norm="rms", norm_eps=1e-5, act="silu", gated_mlp=True, positional="rotary",
                         rope_theta=100_000.0, tied_embeddings=True, architecture="llama")
# --allow-cpu: the same architecture, small enough to finish in a minute or two on a laptop.
SMALL = jinterp.Config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, d_vocab=512, n_ctx=256,
                       norm="rms", act="silu", gated_mlp=True, positional="rotary", tied_embeddings=True)
NAMES = (" Mary", " John", " Tom", " James", " Anna", " Lisa", " David", " Paul", " Sarah", " Emma")


def load_model(small: bool):
    if small:
        return jinterp.Transformer.init(SMALL, jax.random.key(0)), None, "random weights, small shapes (CPU check)"
    if registry.installed(registry.MODELS["smollm2-135m"]):
        model, tokenizer = jinterp.load("smollm2-135m", progress=False)
        return model, tokenizer, "SmolLM2-135M weights"
    return jinterp.Transformer.init(SMOLLM2, jax.random.key(0)), None, "random weights, SmolLM2-135M shapes"


def prompts(tokenizer, d_vocab: int):
    """8 clean/corrupt prompt pairs (IOI with a tokenizer, else random) and (correct, distractor) answers."""
    if tokenizer is None:  # random tokens; the corrupt prompt differs at one position
        rng = np.random.default_rng(0)
        clean = rng.integers(0, d_vocab, (8, 16)).astype(np.int32)
        corrupt = clean.copy()
        corrupt[:, 10] = (corrupt[:, 10] + 1) % d_vocab
        return clean, corrupt, rng.integers(0, d_vocab, (8, 2)).astype(np.int32)
    clean, corrupt, answers = [], [], []
    for i in range(8):
        a, b = NAMES[i % len(NAMES)], NAMES[(i + 1) % len(NAMES)]
        clean.append(tokenizer.encode(f"When{a} and{b} went to the store,{b} gave a drink to"))
        corrupt.append(tokenizer.encode(f"When{a} and{b} went to the store,{a} gave a drink to"))
        answers.append((tokenizer.encode(a)[0], tokenizer.encode(b)[0]))
    if len({len(p) for p in clean + corrupt}) != 1:
        raise SystemExit("the IOI names must be single tokens so that clean and corrupt prompts align")
    return np.array(clean, np.int32), np.array(corrupt, np.int32), np.array(answers, np.int32)


def logit_difference(answers):
    answers = jnp.asarray(answers)

    def metric(logits):
        last = logits[:, -1].astype(jnp.float32)
        return (jnp.take_along_axis(last, answers[:, :1], 1) - jnp.take_along_axis(last, answers[:, 1:], 1)).mean()

    return metric


FORWARD_SHAPES = ((8, 14), (4, 64), (2, 256), (1, 1024), (32, 256))


def random_tokens(d_vocab: int, shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, d_vocab, shape, dtype=np.int32)


def jinterp_rows(model, tokenizer, repeats: int, small: bool) -> list[tuple[str, str, str, float, str]]:
    """(workload, library, dtype, value, unit) rows."""
    shapes = ((2, 8), (1, 64)) if small else FORWARD_SHAPES
    clean, corrupt, answers = prompts(tokenizer, model.cfg.d_vocab)
    metric = logit_difference(answers)
    rows = []
    for dtype in ("float32", "bfloat16"):
        typed = model.astype(dtype)
        for batch, seq in shapes:
            tokens = jax.device_put(random_tokens(model.cfg.d_vocab, (batch, seq)))
            seconds = timed(lambda typed=typed, tokens=tokens: jax.block_until_ready(typed(tokens)), repeats)
            rows.append((f"forward {batch}x{seq}", "jinterp", dtype, batch * seq / seconds, "tokens/s"))
        for site, per_site in (("resid_pre", clean.shape[1]), ("z", model.cfg.n_heads)):
            sweep = lambda typed=typed, site=site: jax.block_until_ready(  # noqa: E731
                patching.sweep(typed, clean, corrupt, metric, site, logit_positions=[-1], progress=False))
            n_patches = model.cfg.n_layers * per_site
            rows.append((f"sweep {site}", "jinterp", dtype, n_patches / timed(sweep, repeats), "patches/s"))
        for site in ("resid_pre", "z"):
            attribute = lambda typed=typed, site=site: jax.block_until_ready(  # noqa: E731
                attribution.attribution_patching(typed, clean, corrupt, metric, site, logit_positions=[-1]))
            rows.append((f"attribution {site}", "jinterp", dtype, 1e3 * timed(attribute, repeats), "ms"))
        print(f"  jinterp {dtype} done", flush=True)
    rows += long_prompt_rows(model, 128 if small else 2048)
    n_tokens, steps, sae_batch = (8192, 5, 1024) if small else (65536, 20, 4096)
    data = jax.device_put(np.random.default_rng(2).standard_normal((n_tokens, model.cfg.d_model), dtype=np.float32))
    train = lambda: jax.block_until_ready(jinterp.sae.train_sae(  # noqa: E731
        data, "topk", 16 * model.cfg.d_model, k=32, steps=steps, batch_size=sae_batch, sample_size=sae_batch,
        eval_every=steps, progress=False).sae)
    rows.append(("SAE training TopK", "jinterp", "float32", steps * sae_batch / timed(train, repeats),
                 "tokens/s"))
    return rows


def long_prompt_rows(model, seq: int) -> list[tuple[str, str, str, float, str]]:
    """A run with every layer's residual stream captured, a z sweep and z attribution patching on one
    prompt of ``seq`` tokens whose last 8 are corrupted: seconds (after compiling) and peak memory."""
    clean = random_tokens(model.cfg.d_vocab, (1, seq), seed=3)
    corrupt = clean.copy()
    corrupt[:, -8:] = (corrupt[:, -8:] + 1) % model.cfg.d_vocab
    metric = lambda logits: logits[:, -1, :2].astype(jnp.float32).sum()  # noqa: E731
    workloads = {
        "run + capture resid": lambda: jinterp.run(model, clean, capture="blocks.*.resid_pre"),
        "sweep z": lambda: patching.sweep(model, clean, corrupt, metric, "z", logit_positions=[-1], progress=False),
        "attribution z": lambda: attribution.attribution_patching(model, clean, corrupt, metric, "z",
                                                                  logit_positions=[-1]),
    }
    rows = []
    for name, work in workloads.items():
        jax.block_until_ready(work())
        rows.append((f"{seq} tokens: {name}", "jinterp", "float32", timed(lambda w=work: jax.block_until_ready(w()),
                                                                          1, warmup=0), "s"))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        rows.append((f"{seq} tokens: peak memory", "jinterp", "float32", stats["peak_bytes_in_use"] / 2**30, "GiB"))
    return rows


def torch_rows(repeats: int, clean, corrupt, answers) -> tuple[list, str]:
    """The same workloads in PyTorch on CUDA; (rows, why some or all were skipped)."""
    try:
        import torch
        import transformers
    except ImportError as error:
        return [], f"PyTorch comparisons skipped: {error}"
    if not torch.cuda.is_available():
        return [], "PyTorch comparisons skipped: torch has no CUDA device here"
    if not registry.installed(registry.MODELS["smollm2-135m"]):
        return [], "PyTorch comparisons skipped: the SmolLM2-135M package (shared weights) is not installed"
    source = registry.locate(registry.MODELS["smollm2-135m"])
    rows, skipped = [], []

    def cuda_seconds(fn):
        def synced():
            fn()
            torch.cuda.synchronize()
        return timed(synced, repeats)

    def forward(hf, tokens):
        with torch.no_grad():
            return tokens.numel() / cuda_seconds(lambda: hf(tokens))

    def tl_sweeps(hf):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from hf_models import build_tl
        from transformer_lens import patching as tl_patching

        tl = build_tl("llama", hf).cuda()
        tc, tk = torch.tensor(clean).long().cuda(), torch.tensor(corrupt).long().cuda()
        ta = torch.tensor(answers).long().cuda()

        def metric(logits):
            return (logits[:, -1].gather(1, ta[:, :1]) - logits[:, -1].gather(1, ta[:, 1:])).mean()

        with torch.no_grad():
            _, cache = tl.run_with_cache(tc)
            for site, sweep, per_site in (("resid_pre", tl_patching.get_act_patch_resid_pre, clean.shape[1]),
                                          ("z", tl_patching.get_act_patch_attn_head_out_all_pos, tl.cfg.n_heads)):
                patches = tl.cfg.n_layers * per_site
                yield (f"sweep {site}", "TransformerLens", "float32",
                       patches / cuda_seconds(lambda sweep=sweep: sweep(tl, tk, cache, metric)), "patches/s")

    for dtype in ("float32", "bfloat16"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                               dtype=getattr(torch, dtype)).cuda().eval()
        for batch, seq in FORWARD_SHAPES:
            tokens = torch.randint(0, 49152, (batch, seq), device="cuda")
            rows.append((f"forward {batch}x{seq}", "transformers", dtype, forward(hf, tokens), "tokens/s"))
        if dtype == "float32":
            try:
                rows += list(tl_sweeps(hf))
            except ImportError as error:
                skipped.append(f"TransformerLens sweeps skipped: {error}")
    try:
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        data = torch.randn(65536, 576, device="cuda")

        def batches():
            while True:
                yield data[torch.randint(0, len(data), (4096,), device="cuda")]

        def fit():
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=32, d_in=576, d_sae=16 * 576, dtype="float32", device="cuda"))
            cfg = SAETrainerConfig(total_training_samples=20 * 4096, train_batch_size_samples=4096, lr=3e-4,
                                   lr_end=3e-4, device="cuda")
            SAETrainer(cfg, sae, batches()).fit()

        rows.append(("SAE training TopK", "SAELens", "float32", 20 * 4096 / cuda_seconds(fit), "tokens/s"))
    except ImportError as error:
        skipped.append(f"SAELens training skipped: {error}")
    return rows, "; ".join(skipped)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without a GPU, on small shapes, to check the script (its numbers mean nothing)")
    args = parser.parse_args()
    backend = jax.default_backend()
    if backend != "gpu" and not args.allow_cpu:
        print(f"benchmarks/gpu.py: JAX's default backend is {backend!r} ({jax.devices()}), not a GPU; refusing "
              f"to report CPU numbers as GPU ones. Install jax with CUDA (pip install 'jax[cuda12]') on a GPU "
              f"machine, or pass --allow-cpu for a check of the script on small shapes.", file=sys.stderr)
        raise SystemExit(2)
    small = backend != "gpu"
    model, tokenizer, weights = load_model(small)
    print(f"devices: {jax.devices()}; {weights}; median of {args.repeats}" +
          ("\n*** NOT A GPU RUN: small shapes on the CPU, to check the script only ***" if small else ""), flush=True)
    rows = jinterp_rows(model, tokenizer, args.repeats, small)
    extra = ""
    if not small:
        theirs, extra = torch_rows(args.repeats, *prompts(tokenizer, model.cfg.d_vocab))
        rows += theirs
    print(f"\n{'workload':<32} {'library':<16} {'dtype':<9} {'value':>12}  unit")
    for name, library, dtype, value, unit in rows:
        print(f"{name:<32} {library:<16} {dtype:<9} {value:12.2f}  {unit}")
    ours = {(name, dtype): value for name, library, dtype, value, _ in rows if library == "jinterp"}
    for name, library, dtype, value, _ in rows:
        if library != "jinterp" and (name, dtype) in ours:
            print(f"{name} ({dtype}): jinterp {ours[name, dtype] / value:.2f}x {library}")
    if extra:
        print(extra)


if __name__ == "__main__":
    main()
