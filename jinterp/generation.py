"""``generate``: batched text generation with a KV cache, with a run's edits applied at every step.

The prompts run once (left-padded, with their attention mask); then one position per step,
attending to the cached keys and values. The whole decode loop is one ``lax.while_loop`` in
one compiled program: one compile per (batch, prompt length, max_new_tokens) and per edit
structure, whatever the edits' values.

Positions of position-restricted edits are slots of the whole sequence: the prompt as passed
(left-padded to the longest, so ``P - 1`` is every row's last prompt token), then the new
tokens (``P + t`` is the t-th new token, counting from 0). Negative positions count from the
end of the prompt (``-1`` is its last token). Edits without positions apply at every position
of the prompt pass and every decode step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jinterp import interventions as iv
from jinterp import names as S
from jinterp import recipes
from jinterp._compile import jit
from jinterp.cache import Cache, from_records
from jinterp.core import validate
from jinterp.loading.tokenizer import pad_rows
from jinterp.models.transformer import KVCache, Transformer, check_inputs
from jinterp.specs import match


@dataclasses.dataclass(frozen=True)
class Generation:
    """What ``generate`` returns.

    ``tokens``: the new token ids ``[batch, max_new_tokens]``, the stop token included, the pad id
    after it. ``n_generated``: how many of them each row generated (up to and including its stop).
    ``texts``: each row's new tokens decoded (special tokens left out; None without a tokenizer).
    ``captures``: a ``Cache`` of the captured sites with their usual axes, where the position axis
    (the query axis of ``attn.scores``/``attn.pattern``) holds the steps: step t is the position
    whose logits chose new token t (the last prompt token for t = 0), so ``captures["blocks.3.resid_post"]``
    is ``[batch, steps, d_model]``, ``captures["blocks.3.attn.pattern"]`` ``[batch, heads, steps, slots]``
    over the ``P + max_new_tokens`` cache slots, and ``captures["logits"]`` the logits of every step.
    Steps at or after a row's ``n_generated`` hold zeros. ``prompt_tokens``, ``prompt_mask``: the
    left-padded prompts ``[batch, P]`` as run.
    """

    tokens: np.ndarray
    n_generated: np.ndarray
    texts: list[str] | None
    captures: Cache
    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray

    @property
    def sequences(self) -> np.ndarray:
        """Prompts followed by the new tokens ``[batch, P + max_new_tokens]`` (padding included)."""
        return np.concatenate([self.prompt_tokens, self.tokens], 1)


def _absolute(edits: tuple, prompt_len: int) -> tuple:
    """The edits with negative positions (from the end of the prompt) as slots of the whole sequence:
    a forward call running the slots from ``cache.index`` on matches them there. A position before
    the prompt is refused."""
    placed = []
    for edit in edits:
        if isinstance(edit, iv.Edit) and edit.positions is not None:
            low = int(np.min(np.asarray(edit.positions))) if iv.concrete(edit.positions) else 0
            if low < -prompt_len:
                raise ValueError(f"Edit at {edit.site!r}: position {low} is before the prompt; negative positions "
                                 f"count from the end of the (padded) prompt of {prompt_len} tokens (valid "
                                 f"-{prompt_len}..-1), non-negative ones are slots of prompt + new tokens")
            slots = jnp.where(edit.positions < 0, edit.positions + prompt_len, edit.positions)
            edit = eqx.tree_at(lambda e: e.indices["pos"], edit, slots)
        placed.append(edit)
    return tuple(placed)


def filter_logits(logits: Float[Array, "... vocab"], top_k: int | None = None, top_p=None) -> Array:
    """Top-k, then top-p (nucleus) filtering: filtered-out logits become -inf.

    Top-k keeps the k largest logits (ties with the k-th kept too). Top-p keeps the most likely
    tokens, in order, while the probability of those before them is below ``top_p`` (so at least
    the top one, and the smallest set whose probability reaches ``top_p``), as transformers does.
    """
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), -1)
        keep_sorted = jnp.cumsum(probs, -1) - probs < top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), -1)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


class _Sampling(eqx.Module):
    temperature: Float[Array, ""]
    top_p: Float[Array, ""] | None
    top_k: int | None = eqx.field(static=True)
    greedy: bool = eqx.field(static=True)

    def __call__(self, logits: Float[Array, "batch vocab"], key) -> Int[Array, " batch"]:
        if self.greedy:
            return jnp.argmax(logits, -1).astype(jnp.int32)
        logits = filter_logits(logits.astype(jnp.float32) / self.temperature, self.top_k, self.top_p)
        return jax.random.categorical(key, logits, -1).astype(jnp.int32)


def _stopped(tokens: Int[Array, "batch n"], step, stops: Int[Array, "s k"], lengths: Int[Array, " s"]) -> Array:
    """Whether each row's new tokens up to ``step`` end with one of the stop sequences
    (``stops`` right-aligned, -1 before the first token of a shorter one)."""
    k = stops.shape[1]
    where = step - k + 1 + jnp.arange(k)
    window = jnp.take(tokens, jnp.clip(where, 0), axis=1)  # [batch, k]
    used = jnp.arange(k)[None, :] >= k - lengths[:, None]  # [s, k]
    equal = (window[:, None, :] == stops[None]) | ~used[None]
    return jnp.any(jnp.all(equal, -1) & (lengths <= step + 1)[None], -1)


def _last_position(kind: str, value: Array, in_block: bool) -> tuple[Array, int]:
    """The value at the call's last position (kept as a length-1 axis) and that axis."""
    axes = S.SITE_AXES[kind]
    axis = next(i for i, a in enumerate(axes) if a in ("pos", "query_pos")) + in_block
    return jax.lax.slice_in_dim(value, value.shape[axis] - 1, value.shape[axis], axis=axis), axis


@jit
def _generate(model: Transformer, prompt, mask, edits, captures, sampling: _Sampling, key, stops, stop_lengths,
              pad_id, max_new_tokens: int):
    batch, prompt_len = prompt.shape
    cache = KVCache.empty(model.cfg, batch, prompt_len + max_new_tokens)

    def forward(tokens, valid, cache):
        logits, top, blocks, cache = model.forward(tokens, edits + captures, valid, logit_positions=jnp.asarray([-1]),
                                                   cache=cache)
        stacked = from_records(captures, top, blocks, model.cfg.n_layers)
        in_block = dict(stacked.layers)
        records = {k: _last_position(k, v, k in in_block) for k, v in stacked.stacked.items()}
        return logits[:, -1], records, cache

    def write(buffers, records, step):
        return {k: jax.lax.dynamic_update_slice_in_dim(buffers[k], v, step, axis) for k, (v, axis) in records.items()}

    # The prompt pass chooses token 0.
    logits, records, cache = forward(prompt, mask, cache)
    buffers = {k: jnp.zeros(v.shape[:axis] + (max_new_tokens,) + v.shape[axis + 1:], v.dtype)
               for k, (v, axis) in records.items()}
    buffers = write(buffers, records, 0)
    token = sampling(logits, jax.random.fold_in(key, 0))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    done = _stopped(out, 0, stops, stop_lengths)
    n_generated = jnp.ones((batch,), jnp.int32)

    def unfinished(state):
        step, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(state):
        step, cache, out, done, n_generated, buffers = state
        last = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, 1)  # finished rows feed padding; results dropped
        logits, records, cache = forward(last, jnp.ones_like(last, bool), cache)
        token = jnp.where(done, pad_id, sampling(logits, jax.random.fold_in(key, step)))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, 1)
        n_generated = n_generated + ~done
        done = done | _stopped(out, step, stops, stop_lengths)
        return step + 1, cache, out, done, n_generated, write(buffers, records, step)

    state = (jnp.asarray(1, jnp.int32), cache, out, done, n_generated, buffers)
    _, _, out, _, n_generated, buffers = jax.lax.while_loop(unfinished, decode, state)
    # Steps after a row stopped decode padding: zero them.
    ran = jnp.arange(max_new_tokens)[None, :] < n_generated[:, None]  # [batch, steps]
    for k, (_, axis) in records.items():
        shape = [1] * buffers[k].ndim
        shape[int(k in S.BLOCK_KINDS)], shape[axis] = batch, max_new_tokens  # block sites: [layers, batch, ...]
        buffers[k] = jnp.where(ran.reshape(shape), buffers[k], 0)
    return out, n_generated, buffers


def generate(model: Transformer, tokenizer, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop=None, edits=(), capture=(),
             prepend_bos: bool | None = None) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens, with ``edits`` applied throughout.

    Args:
        model: a decoder ``jinterp.Transformer`` (Llama-style, Gemma 3, GPT-2, GPT-NeoX, ...).
        tokenizer: a ``jinterp.Tokenizer``; may be None when prompts are token ids and stops are ids.
        prompts: a string, a list of strings, or a list of token-id lists; left-padded to the longest.
        max_new_tokens: how many tokens to generate at most; prompt length + this must fit ``n_ctx``.
        temperature: 0 (default) is greedy decoding (argmax); above 0 samples from softmax(logits / T).
        top_k, top_p: sampling filters, applied after the temperature: top-k first, then top-p on what
            is left (as transformers does); see ``filter_logits``. They need ``temperature > 0``.
        seed: the sampling key's seed: the same seed, prompts and settings give the same tokens.
        stop: a token id, a string, or a list of token ids, strings and token-id lists (sequences); a
            row stops once its new tokens end with one (a string: its token encoding,
            ``tokenizer.encode(s, prepend_bos=False)``, as consecutive new tokens).
            None (default): the tokenizer's EOS token; ``()``: never stop early.
        edits: interventions as ``jinterp.run`` takes them (a recipe's path too), applied in the prompt pass and every
            decode step. Edits without positions apply at every position; positions name slots of
            the whole sequence: the padded prompt (length P) then the new tokens (``P + t`` is new
            token t); negative positions count from the end of the prompt (-1: its last token).
        capture: site names to record at every step (see ``Generation.captures``).
        prepend_bos: for string prompts, as ``Tokenizer.encode`` (None: the tokenizer's convention).

    Returns:
        A ``Generation``: new token ids, texts, the number generated per row, captures.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"generate needs a jinterp.Transformer decoder, got {type(model).__name__}")
    cfg = model.cfg
    if not cfg.causal or not cfg.unembed:
        raise ValueError(f"generate needs a decoder (causal, with an unembedding); this {cfg.architecture!r} model "
                         f"is {'bidirectional' if not cfg.causal else 'without an unembedding'} (an encoder)")
    pad_id = 0 if tokenizer is None else tokenizer.pad_token_id
    prompt, mask = _prompts(tokenizer, prompts, prepend_bos, pad_id)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    total = prompt.shape[1] + int(max_new_tokens)
    if total > cfg.n_ctx:
        raise ValueError(f"The longest prompt ({prompt.shape[1]} tokens) + max_new_tokens={max_new_tokens} = {total} "
                         f"exceeds this model's context of n_ctx={cfg.n_ctx} tokens; lower max_new_tokens to at most "
                         f"{cfg.n_ctx - prompt.shape[1]} or shorten the prompts")
    check_inputs(cfg, prompt, mask)
    sampling = _sampling(cfg, temperature, top_k, top_p)
    stops, stop_lengths = _stops(tokenizer, stop, cfg.d_vocab)
    specs = model.site_specs(jax.ShapeDtypeStruct((prompt.shape[0], total), jnp.int32))
    edits = iv.flatten(recipes.expand(edits, model, specs))
    validate(specs, edits)
    edits = _absolute(edits, prompt.shape[1])
    captures = iv.captures(specs, match(specs, capture))  # every site recorded (none derived)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}")
    try:
        out, n_generated, stacked = _generate(model, jnp.asarray(prompt), jnp.asarray(mask), edits, captures, sampling,
                                              jax.random.key(seed), stops, stop_lengths,
                                              jnp.int32(pad_id), int(max_new_tokens))
    except ValueError as error:
        raise ValueError(f"{error}\n(in generate: the prompt pass runs {prompt.shape[1]} positions and every decode "
                         f"step one, so an edit's values must broadcast over any number of positions)") from error
    out, n_generated = np.asarray(out), np.asarray(n_generated)
    layers = tuple((c.site, tuple(range(cfg.n_layers)) if c.layers is None else c.layers)
                   for c in captures if c.site in S.BLOCK_KINDS)
    texts = None if tokenizer is None else [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
                                            for row, n in zip(out, n_generated)]
    return Generation(out, n_generated, texts, Cache(stacked, layers), prompt, mask)


def _prompts(tokenizer, prompts, prepend_bos, pad_id) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> left-padded ids [batch, P] and mask (True at real tokens)."""
    if isinstance(prompts, np.ndarray):
        prompts = list(prompts) if prompts.ndim == 2 else [prompts]
    one_of_ids = isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer))
    if isinstance(prompts, str) or one_of_ids:
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings or of token-id lists, got {prompts!r}")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("String prompts need a tokenizer; pass one, or give token ids")
            ids = tokenizer.encode(prompt, prepend_bos)
        else:
            ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
        if not ids:
            raise ValueError(f"Prompt {i} ({prompt!r}) is empty (no tokens); every prompt needs at least one token")
        rows.append(ids)
    return pad_rows(rows, pad_id, "left")


def _sampling(cfg, temperature, top_k, top_p) -> _Sampling:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    greedy = temperature == 0
    if greedy and (top_k is not None or top_p is not None):
        raise ValueError(f"top_k={top_k!r}, top_p={top_p!r} filter sampling, but temperature=0 is greedy decoding; "
                         f"set temperature > 0 (e.g. 1.0) to sample")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= cfg.d_vocab):
        raise ValueError(f"top_k must be an int in 1..{cfg.d_vocab} (the vocabulary size), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float, np.number)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    return _Sampling(jnp.float32(temperature if not greedy else 1.0), None if top_p is None else jnp.float32(top_p),
                     None if top_k is None else int(top_k), greedy)


def _stops(tokenizer, stop, d_vocab: int) -> tuple[jax.Array, jax.Array]:
    """Stop sequences right-aligned in [n, longest] (-1 before shorter ones) and their lengths."""
    if stop is None:
        eos = None if tokenizer is None else tokenizer.eos_token_id
        stop = () if eos is None else (eos,)
    if isinstance(stop, (str, int, np.integer)):
        stop = (stop,)
    sequences = []
    for item in stop:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(f"Stop string {item!r} needs a tokenizer; pass one or give stop token ids")
            ids = tokenizer.encode(item, prepend_bos=False)
            if not ids:
                raise ValueError(f"Stop string {item!r} encodes to no tokens")
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            ids = [int(item)]
        elif isinstance(item, Sequence) and item and all(isinstance(i, (int, np.integer)) for i in item):
            ids = [int(i) for i in item]
        else:
            raise TypeError(f"stop takes token ids, token-id sequences and strings, got {item!r}")
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise ValueError(f"Stop token id {bad[0]} is outside the vocabulary (valid ids 0..{d_vocab - 1})")
        sequences.append(ids)
    return jnp.asarray(pad_rows(sequences, -1, "left").tokens), jnp.asarray([len(ids) for ids in sequences], jnp.int32)
