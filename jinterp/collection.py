"""``collect``: captured activations of many sequences, computed in chunks that fit a memory budget
and gathered on the host.

    values = jinterp.collect(model, tokens, "blocks.*.resid_post", attention_mask=mask)  # every position
    features = jinterp.collect(model, tokens, "blocks.6.resid_post", positions=np.full(n, -1))  # one each

Each chunk runs one compiled forward (capture and position picking together); its values are copied
into numpy arrays allocated once for all the sequences (shapes from ``jax.eval_shape``) as soon as
the chunk is done, so the accelerator holds one chunk at a time and the host never holds two copies.
"""

from __future__ import annotations

import fnmatch
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int
from tqdm.auto import tqdm

from jinterp import memory
from jinterp import names as S
from jinterp._compile import jit
from jinterp.cache import run
from jinterp.models.transformer import Transformer


def site_names(model: Transformer, sites) -> list[str]:
    """Concrete site names (``blocks.3.resid_post``) of a name, a glob (``blocks.*.resid_post``) or a
    list of them, in the order given; unknown sites raise jinterp's error naming the valid ones."""
    names = []
    for name in [sites] if isinstance(sites, str) else list(sites):
        site = S.parse(name)
        if any(ch in site.name for ch in "*?["):
            matched = fnmatch.filter(S.site_names(model.cfg), site.name)
            if not matched:
                raise ValueError(f"Site pattern {name!r} matches no site; jinterp.sites(model) lists them")
            names += matched
        else:
            names.append(S.resolve(model.cfg, name).name)
    return list(dict.fromkeys(names))


def _token_index(mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Positions among each row's real tokens (negative: from the last one) -> indices into the row."""
    lengths, first = mask.sum(1), mask.argmax(1)
    columns = np.arange(mask.shape[1])
    contiguous = (((columns >= first[:, None]) & (columns < (first + lengths)[:, None])) == mask).all(1)
    if (lengths == 0).any() or not contiguous.all():
        row = int(np.flatnonzero((lengths == 0) | ~contiguous)[0])
        raise ValueError(f"attention_mask row {row} has no real tokens or gaps between them; pad on the left or "
                         "the right only")
    too_far = (positions >= lengths[:, None]) | (positions < -lengths[:, None])
    if too_far.any():
        row, column = (int(i) for i in np.argwhere(too_far)[0])
        raise ValueError(f"position {int(positions[row, column])} of prompt {row} is out of range: it has "
                         f"{int(lengths[row])} real tokens (valid {-int(lengths[row])}..{int(lengths[row]) - 1})")
    return first[:, None] + np.where(positions < 0, lengths[:, None] + positions, positions)


def batch_size_for(model: Transformer, seq: int, names, memory_budget: float, n_logit_positions: int,
                   n_positions: int | None = None) -> int:
    """Sequences per forward that fit ``memory_budget`` bytes when capturing ``names`` and returning
    their values at ``n_positions`` positions per sequence (None: all)."""
    returned = memory.values_bytes(model.cfg, names, seq) * (1 if n_positions is None else n_positions / seq)
    each = memory.sequence_bytes(model.cfg, seq, names, n_logit_positions) + math.ceil(returned)
    return memory.how_many_fit(memory_budget, each, unit=f"sequence of {seq} tokens capturing {len(names)} site(s)",
                               hint="capture fewer sites, use shorter sequences, or pass batch_size")


@jit
def _chunk(model, tokens, attention_mask, index, names: tuple, pos_axes: tuple):
    """One chunk's captured values: every position (``index`` None), or ``[batch, k, ...]`` at ``index``."""
    unembed = "logits" in names
    _, cache = run(model, tokens, capture=list(names), attention_mask=attention_mask,
                   logit_positions=None if unembed else np.zeros(0, np.int32))
    if index is None:
        return {name: cache[name] for name in names}
    rows = jnp.arange(tokens.shape[0])[:, None]
    return {name: jnp.moveaxis(cache[name], axis, 1)[rows, index] for name, axis in zip(names, pos_axes)}


def collect(
    model: Transformer,
    tokens: Int[np.ndarray, "n seq"],
    sites,
    positions=None,
    *,
    attention_mask=None,
    batch_size: int | None = None,
    memory_budget: float = 2**30,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Captured activations of many sequences, as numpy arrays on the host: ``{site name: [n, *site_shape]}``
    for every position, ``[n, *site_shape without pos]`` at one position per sequence (``positions``
    ``[n]``), or ``[n, k, ...]`` at ``k`` positions each (``positions`` ``[n, k]``).

    Args:
        model: a ``jinterp.Transformer``.
        tokens: int ids ``[n, seq]``, padded (``tokenizer(texts)`` gives them with the mask).
        sites: a site name, a glob such as ``blocks.*.resid_post`` (every layer), or a list of them.
        positions: None (every position, padding included) or ``[n]`` / ``[n, k]`` positions among each
            sequence's real tokens; negative ones count from its last real token (``-1``: the last
            token whatever the padding). The ``pos`` (or ``query_pos``) axis is the one indexed.
        attention_mask: ``[n, seq]``, 1 for real tokens (padding on the left or the right).
        batch_size: sequences per forward pass; None picks the most that fit ``memory_budget``
            (``jinterp.memory``). The last batch is padded with copies, so it reuses the compiled forward.
        memory_budget: bytes of activations one forward pass may use (working set, captured values,
            the values it returns, logits); a ValueError says so if not even one sequence fits.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids [n, seq], got shape {tokens.shape} and dtype {tokens.dtype}")
    n, seq = tokens.shape
    mask = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}; tokens have shape {tokens.shape}")
    index = single = None
    if positions is not None:
        positions = np.asarray(positions)
        single = positions.ndim == 1
        if positions.ndim not in (1, 2) or len(positions) != n or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(f"positions must be integers [n={n}] or [n={n}, k] (or None: every position), got "
                             f"shape {positions.shape} and dtype {positions.dtype}")
        index = _token_index(mask, positions[:, None] if single else positions).astype(np.int32)
    names = tuple(site_names(model, sites))
    if batch_size is None:
        batch_size = batch_size_for(model, seq, names, memory_budget, seq if "logits" in names else 0,
                                    None if index is None else index.shape[1])
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None (from memory_budget), got {batch_size!r}")
    batch_size = min(batch_size, n)
    pos_axes = tuple(next(i for i, axis in enumerate(S.SITE_AXES[S.parse(name).kind]) if axis in ("pos", "query_pos"))
                     for name in names)

    def chunk(start):
        rows = np.arange(start, start + batch_size).clip(max=n - 1)  # the last batch repeats its last sequence
        return _chunk(model, jnp.asarray(tokens[rows]), None if attention_mask is None else jnp.asarray(mask[rows]),
                      None if index is None else jnp.asarray(index[rows]), names, pos_axes)

    shapes = eqx.filter_eval_shape(chunk, 0)
    out = {name: np.empty((n, *shapes[name].shape[1:]), shapes[name].dtype) for name in names}
    with tqdm(total=n, desc="collect", unit="sequence", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            values = chunk(start)
            real = min(batch_size, n - start)
            for name in names:
                out[name][start:start + real] = jax.device_get(values[name])[:real]
            del values  # the chunk's device buffers go before the next chunk is computed
            bar.update(real)
    return {name: value[:, 0] for name, value in out.items()} if single else out
