"""``collect``: captured activations of many sequences, computed in chunks that fit a memory budget
and gathered on the host.

    values = jinterp.collect(model, tokens, "blocks.*.resid_post", attention_mask=mask)  # every position
    features = jinterp.collect(model, tokens, "blocks.6.resid_post", positions=np.full(n, -1))  # one each

Each chunk runs one compiled forward (capture and position picking together); its values are copied
into numpy arrays allocated once for all the sequences (shapes from ``jax.eval_shape``) as soon as
the chunk is done, so the accelerator holds one chunk at a time and the host never holds two copies.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jinterp import memory
from jinterp import names as S
from jinterp._compile import jit
from jinterp.core import apply
from jinterp.protocol import Model
from jinterp.specs import Specs, match


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


def batch_size_for(specs: Specs, names, memory_budget: float, n_positions: int | None = None) -> int:
    """Inputs per forward that fit ``memory_budget`` bytes when capturing ``names`` and returning their
    values at ``n_positions`` positions per input (None: all); ``specs``: the sites of one input."""
    seq = next((spec.shape[spec.axes.index("pos")] for spec in specs.values() if "pos" in spec.axes), None)
    share = 1 if n_positions is None or not seq else n_positions / seq
    each = memory.run_bytes(specs, names) + math.ceil(memory.values_bytes(specs, names) * share)
    return memory.how_many_fit(memory_budget, each, unit=f"input capturing {len(names)} site(s)",
                               hint="capture fewer sites, use shorter sequences, or pass batch_size")


@jit
def _chunk(model, inputs, index, names: tuple, pos_axes: tuple, options: dict):
    """One chunk's captured values: every position (``index`` None), or ``[batch, k, ...]`` at ``index``."""
    specs = model.site_specs(inputs, **options)
    captures, plan = model.plan_captures(specs, names, frozenset())
    output, cache = apply(model, inputs, captures, **options)
    cache = model.complete(cache, plan, output, inputs, **options)
    if index is None:
        return {name: cache[name] for name in names}
    rows = jnp.arange(index.shape[0])[:, None]
    return {name: jnp.moveaxis(cache[name], axis, 1)[rows, index] for name, axis in zip(names, pos_axes)}


def collect(
    model: Model,
    inputs,
    sites,
    positions=None,
    *,
    attention_mask=None,
    batch_size: int | None = None,
    memory_budget: float = 2**30,
    progress: bool = True,
    **options,
) -> dict[str, np.ndarray]:
    """Captured activations of many inputs, as numpy arrays on the host: ``{site name: [n, *site_shape]}``
    for every position, ``[n, *site_shape without pos]`` at one position per sequence (``positions``
    ``[n]``), or ``[n, k, ...]`` at ``k`` positions each (``positions`` ``[n, k]``).

    Args:
        model: a ``jinterp.Transformer``, or a model from ``jinterp.byo.wrap``.
        inputs: a transformer's int ids ``[n, seq]``, padded (``tokenizer(texts)`` gives them with the
            mask); a wrapped model's inputs, every array with a leading ``n`` axis.
        sites: a site name, a glob such as ``blocks.*.resid_post`` (every layer), or a list of them.
        positions: None (every position, padding included) or ``[n]`` / ``[n, k]`` positions among each
            sequence's real tokens; negative ones count from its last real token (``-1``: the last
            token whatever the padding). The ``pos`` (or ``query_pos``) axis is the one indexed.
        attention_mask: ``[n, seq]``, 1 for real tokens (padding on the left or the right).
        batch_size: inputs per forward pass; None picks the most that fit ``memory_budget``
            (``jinterp.memory``). The last batch is padded with copies, so it reuses the compiled forward.
        memory_budget: bytes of activations one forward pass may use (working set, captured values,
            the values it returns); a ValueError says so if not even one input fits.
        options: the model's own (``jinterp.run``'s), e.g. a transformer's ``token_type_ids``.
    """
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(inputs)]
    if not leaves or any(leaf.ndim < 1 or len(leaf) != len(leaves[0]) for leaf in leaves):
        raise ValueError(f"inputs must be arrays with one leading axis of the number of inputs, got shapes "
                         f"{[leaf.shape for leaf in leaves]}")
    n = len(leaves[0])
    inputs = jax.tree.map(np.asarray, inputs)
    if attention_mask is not None:
        options["attention_mask"] = np.asarray(attention_mask).astype(bool)
    model.check_inputs(inputs, **options)
    mask = options.get("attention_mask")
    index = single = None
    if positions is not None:
        positions = np.asarray(positions)
        single = positions.ndim == 1
        if positions.ndim not in (1, 2) or len(positions) != n or not np.issubdtype(positions.dtype, np.integer):
            raise ValueError(f"positions must be integers [n={n}] or [n={n}, k] (or None: every position), got "
                             f"shape {positions.shape} and dtype {positions.dtype}")
        if mask is None:
            mask = np.ones(leaves[0].shape[:2], bool)
        index = _token_index(mask, positions[:, None] if single else positions).astype(np.int32)

    def rows(tree, chosen):
        """The per-input arrays (leading axis ``n``) of ``tree`` at the inputs ``chosen``; other leaves as they are."""
        return jax.tree.map(lambda a: a[chosen] if hasattr(a, "shape") and np.ndim(a) >= 1 and len(a) == n else a, tree)

    one_input, one_options = rows((inputs, options), slice(0, 1))
    specs = model.site_specs(one_input, **one_options)
    names = match(specs, sites)
    run_options = model.capture_only(names, **options)
    if batch_size is None:
        batch_size = batch_size_for(model.site_specs(one_input, **model.capture_only(names, **one_options)), names,
                                    memory_budget, None if index is None else index.shape[1])
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None (from memory_budget), got {batch_size!r}")
    batch_size = min(batch_size, n)
    pos_axes = tuple(next((i for i, axis in enumerate(specs[name].axes) if S.role(axis) == "pos"), None)
                     for name in names)
    if index is not None and None in pos_axes:
        raise ValueError(f"positions= given, but {names[pos_axes.index(None)]!r} has no position axis "
                         f"(axes {specs[names[pos_axes.index(None)]].axes})")

    def chunk(start):
        chosen = np.arange(start, start + batch_size).clip(max=n - 1)  # the last batch repeats its last input
        chunk_inputs, chunk_options = rows((inputs, run_options), chosen)
        return _chunk(model, chunk_inputs, None if index is None else jnp.asarray(index[chosen]), names, pos_axes,
                      chunk_options)

    shapes = eqx.filter_eval_shape(chunk, 0)
    out = {name: np.empty((n, *shapes[name].shape[1:]), shapes[name].dtype) for name in names}
    with tqdm(total=n, desc="collect", unit="input", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            values = chunk(start)
            real = min(batch_size, n - start)
            for name in names:
                out[name][start:start + real] = jax.device_get(values[name])[:real]
            del values  # the chunk's device buffers go before the next chunk is computed
            bar.update(real)
    return {name: value[:, 0] for name, value in out.items()} if single else out
