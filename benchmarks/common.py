"""Shared benchmark helpers: the same SmolLM2-135M weights in jinterp, transformers and
TransformerLens, and a median-of-runs timer."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jinterp  # noqa: E402  (before JAX starts: see jinterp._numerics)


def timed(fn, repeats: int = 7, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (machines here are noisy)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(fns: dict, repeats: int = 7, warmup: int = 1) -> dict:
    """Median seconds of each function, timed in interleaved rounds so that drift in the
    machine's speed hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def smollm2(with_tl: bool = True):
    """(jinterp model, tokenizer, transformers model, TransformerLens model or None) on one set of weights."""
    import torch
    import transformers

    model, tokenizer = jinterp.load("smollm2-135m", progress=False)
    source = jinterp.loading.registry.locate(jinterp.loading.registry.MODELS["smollm2-135m"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                           dtype=torch.float32).eval()
    tl = None
    if with_tl:
        from transformer_lens import HookedTransformer
        from transformer_lens import loading_from_pretrained as tl_loading

        with tempfile.TemporaryDirectory() as directory:  # TL reads the config from a directory offline
            hf.config.architectures = ["LlamaForCausalLM"]  # a GGUF-read config does not name it
            hf.config.save_pretrained(directory)
            cfg = tl_loading.get_pretrained_model_config(directory, hf_cfg=hf.config.to_dict(), fold_ln=False,
                                                         device="cpu")
            cfg.tokenizer_name = None
            tl = HookedTransformer(cfg)
            state = tl_loading.get_pretrained_state_dict(directory, cfg, hf_model=hf)
        tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                       fold_value_biases=False, refactor_factored_attn_matrices=False)
        tl.eval()
    return model, tokenizer, hf, tl
