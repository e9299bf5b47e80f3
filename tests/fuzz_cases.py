"""Fuzzing the file readers: tiny valid seed files, ways to damage them, and the verdict on one case.

Shared by tests/test_fuzz.py (hypothesis, few examples) and benchmarks/fuzz.py (thousands of cases,
each in a watched worker process). A case is (target, mutation, rng seed); ``attempt`` applies it to
a fresh copy of the target's seed and reads the result with the public reader:

    gguf        jinterp.load(file.gguf)
    hf          jinterp.load(directory) after damaging config.json or model.safetensors
    tokenizer   Tokenizer.from_file(tokenizer.json) and an encode
    checkpoint  runs.Store.load(name) after damaging a file of the orbax checkpoint or its seal

The verdict is "ok" (read fine), "clean" (a LoadError naming the damaged file or its directory; for
checkpoints: the damage was noticed and the checkpoint dropped for recomputation) or "unclear"
(any other exception, an error that does not name the file, or a checkpoint read back with values
other than those saved).
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np

# A Llama-shaped model small enough to write, damage and read hundreds of times a minute.
D, LAYERS, HEADS, KV, D_HEAD, D_MLP, VOCAB, CTX = 8, 1, 2, 1, 4, 16, 12, 16
ALPHABET = [chr(c) for c in range(ord("a"), ord("a") + VOCAB - 2)]
TARGETS = ("gguf", "hf", "tokenizer", "checkpoint")
HUGE = (2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, -1, -(2**31), 0, 10**12)


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """HF Llama tensors: name -> float32 array."""
    w = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": w(VOCAB, D), "model.norm.weight": 1 + w(D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": 1 + w(D), p + "post_attention_layernorm.weight": 1 + w(D),
                p + "self_attn.q_proj.weight": w(HEADS * D_HEAD, D), p + "self_attn.k_proj.weight": w(KV * D_HEAD, D),
                p + "self_attn.v_proj.weight": w(KV * D_HEAD, D), p + "self_attn.o_proj.weight": w(D, HEADS * D_HEAD),
                p + "mlp.gate_proj.weight": w(D_MLP, D), p + "mlp.up_proj.weight": w(D_MLP, D),
                p + "mlp.down_proj.weight": w(D, D_MLP)}
    return out


def hf_config() -> dict:
    return {"model_type": "llama", "hidden_size": D, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "intermediate_size": D_MLP, "vocab_size": VOCAB,
            "max_position_embeddings": CTX, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0,
            "tie_word_embeddings": True}


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1} | {c: i + 2 for i, c in enumerate(ALPHABET)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def write_hf(directory: Path, dtype=np.float32) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) for k, v in _weights(np.random.default_rng(0)).items()}
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf_config(), indent=1))
    write_tokenizer(directory / "tokenizer.json")


def write_gguf(path: Path, metadata: dict | None = None, tensor_dtype=np.float32) -> None:
    """A tiny Llama GGUF; ``metadata`` overrides integer keys (``block_count``, ...) with any value."""
    import gguf

    values = {"block_count": LAYERS, "context_length": CTX, "embedding_length": D, "feed_forward_length": D_MLP,
              "attention.head_count": HEADS, "attention.head_count_kv": KV, "attention.key_length": D_HEAD,
              "rope.dimension_count": D_HEAD} | (metadata or {})
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in values.items():
        if isinstance(value, int) and 0 <= value < 2**32:
            writer.add_uint32(f"llama.{key}", value)
        elif isinstance(value, int):
            writer.add_int64(f"llama.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"llama.{key}", value)
        else:
            writer.add_string(f"llama.{key}", str(value))
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<unk>", "<s>", *ALPHABET])
    writer.add_token_types([3, 3] + [1] * len(ALPHABET))
    writer.add_bos_token_id(1)
    rename = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, array in _weights(np.random.default_rng(0)).items():
        parts = name.removeprefix("model.").removesuffix(".weight")
        if parts.startswith("layers."):
            _, i, rest = parts.split(".", 2)
            ours = f"blk.{i}.{rename[rest]}.weight"
        else:
            ours = f"{rename[parts]}.weight"
        writer.add_tensor(ours, np.ascontiguousarray(array.astype(tensor_dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_checkpoint(directory: Path):
    """A sealed checkpoint ``step`` in a ``runs.Store`` at ``directory``; returns the saved values."""
    from jinterp.runs import Store

    values = {"weights": np.arange(24, dtype=np.float32).reshape(4, 6) / 7, "step": np.int64(3),
              "history": {"loss": np.linspace(2, 1, 5, dtype=np.float32)}}
    return Store(directory, lambda message: None).save("step", values, 0.5)


def write_seeds(root: Path) -> dict[str, Path]:
    """One pristine copy of every target under ``root``; returns target -> path."""
    root.mkdir(parents=True, exist_ok=True)
    write_gguf(root / "model.gguf")
    write_hf(root / "hf")
    write_tokenizer(root / "tokenizer.json")
    write_checkpoint(root / "checkpoints")
    return {"gguf": root / "model.gguf", "hf": root / "hf", "tokenizer": root / "tokenizer.json",
            "checkpoint": root / "checkpoints"}


# --- mutations -------------------------------------------------------------------------------

def damage_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Truncate, flip bits, overwrite an integer with an absurd one, or splice in junk."""
    data = bytearray(data)
    how = rng.choice(["truncate", "flip", "huge_int", "junk", "zero_run"])
    if how == "truncate" or not data:
        return how, bytes(data[: rng.randrange(len(data) + 1)])
    if how == "flip":
        for _ in range(rng.choice([1, 1, 2, 8, 64])):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif how == "huge_int":
        width, fmt = rng.choice([(8, "<q"), (4, "<i"), (8, "<Q")])
        value = rng.choice(HUGE)
        i = rng.randrange(max(1, len(data) - width))
        packed = struct.pack(fmt, value % 2**64 if fmt == "<Q" else max(min(value, 2 ** (8 * width - 1) - 1),
                                                                          -(2 ** (8 * width - 1))))
        data[i: i + width] = packed
    elif how == "junk":
        i = rng.randrange(len(data))
        data[i: i + rng.randrange(1, 64)] = rng.randbytes(rng.randrange(1, 64))
    else:
        i = rng.randrange(len(data))
        data[i: i + rng.randrange(1, 256)] = bytes(rng.randrange(1, 256))
    return how, bytes(data)


def _absurd(rng: random.Random):
    return rng.choice([*HUGE, 1.5, -0.5, float("nan"), "12", "", None, [], [1, 2], {"a": 1}, True, 3.0e300])


def damage_json(data, rng: random.Random):
    """A JSON value with one key (at any depth) set to an absurd value, removed, or retyped."""
    if not isinstance(data, dict) or not data:
        return "replace", _absurd(rng)
    key = rng.choice(sorted(data))
    how = rng.choice(["absurd", "absurd", "remove", "recurse"])
    if how == "remove":
        return how, {k: v for k, v in data.items() if k != key}
    if how == "recurse" and isinstance(data[key], dict):
        inner_how, inner = damage_json(data[key], rng)
        return f"{key}.{inner_how}", data | {key: inner}
    if how == "recurse" and isinstance(data[key], list) and data[key]:
        items = list(data[key])
        items[rng.randrange(len(items))] = _absurd(rng)
        return f"{key}[i]=absurd", data | {key: items}
    return f"{key}=absurd", data | {key: _absurd(rng)}


def damage_safetensors_header(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Edit the JSON header: an absurd shape, dtype or offset, or a lying header length."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + length])
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    how = rng.choice(["shape", "dtype", "offsets", "length"])
    if how == "shape":
        header[name]["shape"] = rng.choice([[2**40, 2**40], [2**62], [0, 5], [-1, 4], [3, 3, 3, 3, 3, 3, 3, 3]])
    elif how == "dtype":
        header[name]["dtype"] = rng.choice(["I64", "BOOL", "U8", "F64", "XX", "F8_E4M3", "C64"])
    elif how == "offsets":
        header[name]["data_offsets"] = rng.choice([[0, 2**62], [10**6, 0], [-1, 8], [0, 1]])
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    declared = len(body) if how != "length" else rng.choice([2**62, 2**40, len(body) + 1, 0])
    return f"header {how}", struct.pack("<Q", declared) + body + data[8 + length:]


def damage_gguf_metadata(path: Path, rng: random.Random) -> str:
    """Rewrite the GGUF with absurd architecture numbers, or tensors of another dtype."""
    if rng.random() < 0.2:
        dtype = rng.choice([np.int32, np.float16, np.int8, np.float64])
        write_gguf(path, tensor_dtype=dtype)
        return f"tensors as {np.dtype(dtype).name}"
    key = rng.choice(["block_count", "context_length", "embedding_length", "feed_forward_length",
                      "attention.head_count", "attention.head_count_kv", "attention.key_length",
                      "rope.dimension_count"])
    value = rng.choice([*HUGE, 3, 7, 1.5, "eight"])
    write_gguf(path, {key: value})
    return f"metadata {key}={value!r}"


def mutate(target: str, path: Path, rng: random.Random) -> str:
    """Damage the copy of ``target`` at ``path`` in place; returns what was done."""
    if target == "gguf":
        if rng.random() < 0.3:
            return damage_gguf_metadata(path, rng)
        how, data = damage_bytes(path.read_bytes(), rng)
        path.write_bytes(data)
        return how
    if target == "hf":
        if rng.random() < 0.5:
            file = path / "config.json"
            how, data = damage_json(json.loads(file.read_text()), rng)
            file.write_text(json.dumps(data))
            return f"config.json {how}"
        file = path / "model.safetensors"
        if rng.random() < 0.4:
            how, data = damage_safetensors_header(file.read_bytes(), rng)
        else:
            how, data = damage_bytes(file.read_bytes(), rng)
        file.write_bytes(data)
        return f"model.safetensors {how}"
    if target == "tokenizer":
        if rng.random() < 0.5:
            how, data = damage_json(json.loads(path.read_text()), rng)
            path.write_text(json.dumps(data))
            return f"json {how}"
        how, data = damage_bytes(path.read_bytes(), rng)
        path.write_bytes(data)
        return how
    if target == "checkpoint":
        files = sorted(p for p in path.rglob("*") if p.is_file())
        file = rng.choice(files)
        name = str(file.relative_to(path))
        if file.suffix == ".json" or file.name.startswith("_") and rng.random() < 0.5:
            try:
                how, data = damage_json(json.loads(file.read_text()), rng)
                file.write_text(json.dumps(data))
                return f"{name} {how}"
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
        how, data = damage_bytes(file.read_bytes(), rng)
        file.write_bytes(data)
        return f"{name} {how}"
    raise ValueError(f"unknown fuzz target {target!r}; valid: {', '.join(TARGETS)}")


# --- one case ---------------------------------------------------------------------------------

def attempt(target: str, seeds: dict[str, Path], workdir: Path, seed: int) -> tuple[str, str, str]:
    """Copy the seed, damage it with ``random.Random(seed)``, read it. Returns (verdict, mutation, detail)."""
    import jinterp
    from jinterp.loading import LoadError

    rng = random.Random(seed)
    copy = workdir / f"case-{seed}{''.join(seeds[target].suffixes)}"
    if seeds[target].is_dir():
        shutil.copytree(seeds[target], copy)
    else:
        shutil.copyfile(seeds[target], copy)
    try:
        mutation = mutate(target, copy, rng)
        if target == "checkpoint":
            return _checkpoint_verdict(seeds[target], copy, mutation)
        try:
            if target == "tokenizer":
                jinterp.Tokenizer.from_file(copy).encode("abc de")
            else:
                jinterp.load(copy, progress=False)
        except LoadError as error:
            named = str(copy) in str(error)
            return ("clean" if named else "unclear"), mutation, f"{type(error).__name__}: {str(error)[:300]}"
        except Exception as error:  # noqa: BLE001  anything else is a finding
            return "unclear", mutation, f"{type(error).__name__}: {str(error)[:300]}"
        return "ok", mutation, ""
    finally:
        shutil.rmtree(copy, ignore_errors=True) if copy.is_dir() else copy.unlink(missing_ok=True)


def _read_checkpoint(directory: Path):
    from jinterp.runs import Store

    messages = []
    found = Store(directory, messages.append).load("step")
    return found, messages


def _checkpoint_verdict(seed_dir: Path, copy: Path, mutation: str) -> tuple[str, str, str]:
    from jinterp.runs import _digest

    try:
        found, messages = _read_checkpoint(copy)
    except Exception as error:  # noqa: BLE001  Store.load must absorb damage, never raise
        return "unclear", mutation, f"{type(error).__name__}: {str(error)[:300]}"
    if found is None:
        return ("clean" if messages else "unclear"), mutation, "; ".join(messages)[:300]
    original, _ = _read_checkpoint(seed_dir)
    same = _digest(found[0]) == _digest(original[0])
    return ("ok" if same else "unclear"), mutation, "" if same else "read back values other than those saved"
