"""Torch-free tokenizers, built with the ``tokenizers`` package from ``tokenizer.json`` or GGUF metadata.

BOS is an explicit choice: ``encode(text, prepend_bos=None)`` follows the tokenizer's own
convention (SmolLM2: no BOS; Gemma: ``<bos>``; BERT: ``[CLS] ... [SEP]``), ``True`` guarantees
a leading BOS, ``False`` adds no special tokens at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from jinterp.loading.errors import LoadError, json_object

CONTROL, USER_DEFINED = 3, 4  # GGUF token types


class Batch(NamedTuple):
    """Padded token ids ``[batch, seq]`` (int32) and the attention mask (True at real tokens)."""

    tokens: np.ndarray
    attention_mask: np.ndarray


def pad_rows(rows, pad_id: int, padding_side: str = "right") -> Batch:
    """Token-id lists padded with ``pad_id`` to the longest, on ``padding_side`` ("left" or "right")."""
    length = max(map(len, rows), default=0)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
        tokens[i, span], mask[i, span] = row, True
    return Batch(tokens, mask)


@dataclass(frozen=True)
class Specials:
    """Special-token facts a model's tokenizer carries besides its vocabulary."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None


class Tokenizer:
    """Encode and decode text for one model."""

    def __init__(self, backend: tokenizers.Tokenizer, specials: Specials, source: str = ""):
        self.backend, self.specials, self.source = backend, specials, source

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        """``tokenizer.json`` (plus ``jinterp_tokenizer.json`` or ``tokenizer_config.json`` beside it)."""
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise LoadError(path, f"not a readable tokenizer.json ({error})") from None
        unk = getattr(backend.model, "unk_token", None)
        if unk is not None and backend.token_to_id(unk) is None:  # else encoding any unknown text fails
            raise LoadError(path, f"the unknown token {unk!r} is not in the vocabulary")
        backend.no_padding()  # padding is done per batch by __call__; encode never truncates
        backend.no_truncation()
        return cls(backend, _read_specials(path.parent, backend), str(path))

    @classmethod
    def from_gguf(cls, fields: dict, source: str = "") -> Tokenizer:
        """From GGUF ``tokenizer.*`` metadata (already decoded to Python values)."""
        try:
            return cls._from_gguf(fields, source)
        except LoadError:
            raise
        except Exception as error:  # damaged metadata: wrong types, ids out of range; tokenizers raises bare Exception
            raise LoadError(source, f"damaged tokenizer metadata ({type(error).__name__}: {error})") from None

    @classmethod
    def _from_gguf(cls, fields: dict, source: str) -> Tokenizer:
        kind = fields.get("tokenizer.ggml.model")
        tokens = fields.get("tokenizer.ggml.tokens")
        if not tokens:
            raise LoadError(source, "GGUF has no tokenizer.ggml.tokens")
        if kind == "gpt2":
            backend = _byte_level_bpe(fields)
        elif kind == "llama":
            backend = _sentencepiece_bpe(fields)
        else:
            raise LoadError(source, f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2', 'llama'")
        _add_special_tokens(backend, fields, byte_level=kind == "gpt2")
        specials = Specials(
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
            pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
            chat_template=fields.get("tokenizer.chat_template"))
        for name, value in specials.__dict__.items():
            if name.endswith("_id") and value is not None and not 0 <= value < len(tokens):
                raise LoadError(source, f"{name}={value} is outside the vocabulary of {len(tokens)} tokens")
        add_bos = fields.get("tokenizer.ggml.add_bos_token", kind == "llama")
        if add_bos and specials.bos_token_id is not None:
            bos = tokens[specials.bos_token_id]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials.bos_token_id)])
        return cls(backend, specials, source)

    def save(self, directory) -> None:
        """Write ``tokenizer.json`` and ``jinterp_tokenizer.json`` into ``directory``."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "jinterp_tokenizer.json").write_text(json.dumps(self.specials.__dict__))

    # -- use --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.specials.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.specials.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The padding id: the declared one, else EOS, else 0 (masked out either way)."""
        return next((i for i in (self.specials.pad_token_id, self.specials.eos_token_id) if i is not None), 0)

    def encode(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. ``prepend_bos``: None = this tokenizer's convention, True = make
        sure the first id is BOS, False = no special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}; use tokenizer(texts) for a batch")
        ids = self.backend.encode(text, add_special_tokens=prepend_bos is not False).ids
        return self._ensure_bos(ids) if prepend_bos else ids

    def _ensure_bos(self, ids: list[int]) -> list[int]:
        if self.bos_token_id is None:
            raise ValueError("prepend_bos=True, but this tokenizer has no BOS token; use prepend_bos=False or None")
        return ids if ids[:1] == [self.bos_token_id] else [self.bos_token_id, *ids]

    def __call__(self, texts, prepend_bos: bool | None = None, padding_side: str = "right") -> Batch:
        """Encode a batch, padded to the longest. Left padding suits generation."""
        if isinstance(texts, str):
            texts = [texts]
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return pad_rows([self.encode(text, prepend_bos) for text in texts], self.pad_token_id, padding_side)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def to_str_tokens(self, ids) -> list[str]:
        """Each id decoded on its own (what a plot label needs)."""
        return [self.backend.decode([int(i)], skip_special_tokens=False) for i in np.asarray(ids).reshape(-1)]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template (sandboxed Jinja)."""
        if not self.specials.chat_template:
            raise ValueError(f"{self.source or 'this tokenizer'} has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        token = lambda i: None if i is None else self.backend.id_to_token(i)  # noqa: E731
        return env.from_string(self.specials.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=token(self.bos_token_id) or "", eos_token=token(self.eos_token_id) or "")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
                f"source={self.source!r})")


def _read_specials(directory: Path, backend: tokenizers.Tokenizer) -> Specials:
    ours = directory / "jinterp_tokenizer.json"
    if ours.exists():
        found = json_object(ours)
        fields = set(Specials.__dataclass_fields__)
        if not set(found) <= fields:
            raise LoadError(ours, f"unknown keys {sorted(set(found) - fields)}; valid: {sorted(fields)}")
        return Specials(**found)
    config_path = directory / "tokenizer_config.json"
    config = json_object(config_path) if config_path.exists() else {}

    def token_id(name):
        token = config.get(name)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and not isinstance(token, str):
            raise LoadError(config_path, f"{name} must be a string or {{'content': string}}, got {token!r}")
        return None if token is None else backend.token_to_id(token)

    bos = token_id("bos_token")
    if bos is None:
        bos = token_id("cls_token")  # BERT: [CLS] plays BOS
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise LoadError(config_path, f"chat_template must be a string, got {type(template).__name__}")
    return Specials(bos_token_id=bos, eos_token_id=token_id("eos_token") if token_id("eos_token") is not None
                    else token_id("sep_token"), pad_token_id=token_id("pad_token"), chat_template=template)


# --- GGUF vocabularies ----------------------------------------------------------------------

def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre`; others use GPT-2's.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT}


def _byte_level_bpe(fields: dict) -> tokenizers.Tokenizer:
    """Byte-level BPE (GPT-2 style), as SmolLM2's GGUF describes it."""
    spell = _byte_to_unicode()
    alphabet = set(spell.values())
    # Tokens outside the byte alphabet are respelled; a repeated spelling keeps its last id.
    vocab = {token if set(token) <= alphabet else "".join(spell[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(fields["tokenizer.ggml.tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in fields.get("tokenizer.ggml.merges", [])]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(fields.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(fields: dict) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE with byte fallback (Gemma). The file lists no merges, so they are
    recovered from the vocabulary: every split of a token into two tokens, ranked by the token's
    position in the file (earlier = merged first)."""
    # Runs of spaces are stored as spaces but looked up as "▁" after normalisation.
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in fields["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}  # a repeated token keeps its last id
    merges = []
    for token, rank in vocab.items():
        pairs = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                 if token[:cut] in vocab and token[cut:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((rank, -len(left), -len(right), left, right) for left, right in pairs)
    # Stable: ties keep the id order chosen above.
    merges.sort(key=lambda m: m[:3])
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=unk,
                                              fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _add_special_tokens(backend: tokenizers.Tokenizer, fields: dict, byte_level: bool) -> None:
    """Control tokens (``<|im_start|>``, ``<bos>``...) stay whole as special tokens; user-defined
    ones stay whole as plain added tokens."""
    tokens, types = fields["tokenizer.ggml.tokens"], fields.get("tokenizer.ggml.token_type") or []
    alphabet = set(_byte_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == CONTROL and (alphabet is None or set(t) <= alphabet)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab()
    user = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
            if kind == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)
