"""Sharding over a device mesh: sweeps and batches split across devices (and processes).

A mesh has a ``"data"`` axis, over which a sweep's patches (or a batch's rows) are split, and
optionally a ``"model"`` axis, over which ``shard_model`` splits attention heads and MLP hidden
units (tensor parallelism). Everything else is replicated. The functions that take ``mesh=``
place their inputs with these helpers and let XLA's SPMD partitioner split the one compiled
program; results equal the single-device ones (to float rounding where a sum is split).

Several processes (hosts) work on one mesh after ``initialize`` (``jax.distributed``): every
process runs the same script on the same inputs, ``jax.devices()`` then lists every process's
devices, and ``mesh()`` spans them all. Host values enter the mesh through ``put`` and leave it
through ``to_host``, both of which work whether or not the mesh spans several processes.
"""

from __future__ import annotations

import dataclasses
import os

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"
# initialize() reads these when it is not given the values (jax also detects TPU pods, SLURM, ... itself).
ENVIRONMENT = {"coordinator": "JINTERP_COORDINATOR", "num_processes": "JINTERP_NUM_PROCESSES",
               "process_id": "JINTERP_PROCESS_ID"}


def mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A ``("data", "model")`` mesh over ``devices`` (default: every device of every process);
    ``data`` defaults to as many as the devices allow."""
    devices = jax.devices() if devices is None else list(devices)
    if not isinstance(model, int) or model < 1 or (data is None and len(devices) % model):
        raise ValueError(f"model={model!r} must be a positive int dividing the {len(devices)} devices")
    data = len(devices) // model if data is None else data
    if not isinstance(data, int) or data < 1 or data * model > len(devices):
        raise ValueError(f"data={data!r} must be a positive int with data x model ({model}) at most the "
                         f"{len(devices)} devices")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:data * model])


def check_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` if it has a ``"data"`` axis (and no axes other than ``"data"`` and ``"model"``)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jinterp.sharding.mesh()), got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if DATA not in names or set(names) - {DATA, MODEL}:
        raise ValueError(f"mesh axes {names} must be 'data' and optionally 'model' (jinterp.sharding.mesh(data, model)"
                         " makes one)")
    if any(t != AxisType.Auto for t in mesh.axis_types):  # jax.make_mesh's default is Explicit
        raise ValueError(f"mesh axis types {mesh.axis_types} must be AxisType.Auto (jinterp lets XLA place the "
                         "intermediate values): pass axis_types=(AxisType.Auto, ...) or use jinterp.sharding.mesh()")
    return mesh


def axis_size(mesh: Mesh, axis: str) -> int:
    return dict(mesh.shape).get(axis, 1)


REPLICATED = P()


def put(value, mesh: Mesh, spec: P = REPLICATED) -> jax.Array:
    """A host value (the same on every process) as a global array laid out by ``spec`` on ``mesh``."""
    sharding = NamedSharding(mesh, spec)
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    host = np.asarray(value)
    for dim, axes in enumerate(spec):
        size = int(np.prod([axis_size(mesh, a) for a in ((axes,) if isinstance(axes, str) else axes or ())]))
        if host.shape[dim] % size:
            raise ValueError(f"Axis {dim} of a {host.shape} array cannot be split into {size} equal parts over mesh "
                             f"axes {axes!r}: make it a multiple of {size}")
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index], dtype=host.dtype)


def shard_batch(value, mesh: Mesh) -> jax.Array | None:
    """``[batch, ...]`` split over the ``"data"`` axis (None stays None)."""
    return None if value is None else put(value, mesh, P(DATA))


def split_batch(mesh: Mesh, model, *batch_arrays):
    """The model replicated (or as ``shard_model`` placed it) and ``[batch, ...]`` arrays split over
    the ``"data"`` axis; the last of ``batch_arrays`` is positions: split if ``[batch, n]``, else replicated."""
    model = replicate(model, check_mesh(mesh))
    *rows, positions = batch_arrays
    if positions is not None:
        positions = shard_batch(positions, mesh) if np.ndim(positions) == 2 else put(positions, mesh)
    return (model, *(shard_batch(r, mesh) for r in rows), positions)


def replicate(tree, mesh: Mesh):
    """Every array of ``tree`` on every device of ``mesh``; arrays already laid out on ``mesh``
    (e.g. by ``shard_model``) keep their layout."""
    def place(leaf):
        on_mesh = isinstance(getattr(leaf, "sharding", None), NamedSharding) and leaf.sharding.mesh == mesh
        return leaf if on_mesh else put(leaf, mesh)

    return jax.tree.map(lambda leaf: place(leaf) if eqx.is_array(leaf) else leaf, tree)


def shard_model(model, mesh: Mesh):
    """``model`` with attention heads (``W_Q``, ``W_O``, ``b_Q``; ``W_K``/``W_V``/``b_K``/``b_V`` when
    the kv heads divide evenly, replicated otherwise) and MLP hidden units (``W_in``, ``W_gate``,
    ``b_in``, ``W_out``) split over the mesh's ``"model"`` axis, every other weight replicated.
    ``n_heads`` and ``d_mlp`` must be multiples of the axis size."""
    from jinterp.models.transformer import Transformer

    if not isinstance(model, Transformer):
        raise TypeError(f"shard_model takes a jinterp.Transformer, got {type(model).__name__}")
    cfg, n = model.cfg, axis_size(check_mesh(mesh), MODEL)
    for name, size in (("n_heads", cfg.n_heads), ("d_mlp", cfg.d_mlp if cfg.has_mlp else 0)):
        if size % n:
            raise ValueError(f"{name}={size} cannot be split over a 'model' axis of {n} devices: use a model "
                             f"axis size dividing {size}")
    # Grouped-query kv heads are split too when they divide evenly, otherwise every device keeps them all.
    kv = MODEL if cfg.n_kv_heads % n == 0 else None
    heads, hidden = P(None, MODEL), P(None, None, MODEL)  # [n_layers, heads or d_mlp, ...]; [n_layers, d_model, d_mlp]
    split = {"W_Q": heads, "W_O": heads, "b_Q": heads, "W_K": P(None, kv), "W_V": P(None, kv), "b_K": P(None, kv),
             "b_V": P(None, kv)}
    placed = lambda module, specs: dataclasses.replace(module, **{
        name: put(getattr(module, name), mesh, spec) for name, spec in specs.items()
        if getattr(module, name) is not None})
    model = eqx.tree_at(lambda m: m.blocks.attn, model, placed(model.blocks.attn, split))
    if model.blocks.mlp is not None:
        model = eqx.tree_at(lambda m: m.blocks.mlp, model, placed(
            model.blocks.mlp, {"W_in": hidden, "W_gate": hidden, "b_in": heads, "W_out": heads}))
    return replicate(model, mesh)


def constrain(value, mesh: Mesh | None, spec: P = REPLICATED):
    """Inside a traced function: lay ``value`` out by ``spec`` on ``mesh`` (nothing without a mesh)."""
    if mesh is None:
        return value
    return jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec))


def to_host(value) -> np.ndarray:
    """A (global) array as a numpy array on this process, gathered from other processes if needed."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable and not value.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def pad_to(n: int, mesh: Mesh | None) -> int:
    """``n`` rounded up to a multiple of the mesh's data axis (``n`` without a mesh)."""
    size = 1 if mesh is None else axis_size(mesh, DATA)
    return -(-n // size) * size


# --- several processes ------------------------------------------------------------------------

def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """Starts ``jax.distributed`` if asked: by the arguments, else the environment variables
    ``JINTERP_COORDINATOR`` (``host:port`` of process 0), ``JINTERP_NUM_PROCESSES`` and
    ``JINTERP_PROCESS_ID``. Without any, nothing happens (one process). Returns whether it started.
    On a TPU pod slice or a SLURM/Open MPI cluster, ``jax.distributed.initialize()`` finds these values
    itself: pass ``coordinator="auto"`` (or set ``JINTERP_COORDINATOR=auto``)."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, variable in ENVIRONMENT.items():
        if given[key] is None and os.environ.get(variable):
            given[key] = os.environ[variable]
    if all(v is None for v in given.values()):
        return False
    if jax.distributed.is_initialized():  # e.g. by the script that called this
        return True
    if given["coordinator"] == "auto":
        jax.distributed.initialize()
        return True
    missing = [f"{k} (or ${ENVIRONMENT[k]})" for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"Several processes need a coordinator, the number of processes and this process's id; "
                         f"missing: {', '.join(missing)}")
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise ValueError(f"num_processes={given['num_processes']!r} and process_id={given['process_id']!r} must be "
                         "integers") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"process_id={i} must be in 0..{n - 1} (num_processes={n})")
    if ":" not in str(given["coordinator"]):
        raise ValueError(f"coordinator={given['coordinator']!r} must be host:port (process 0's address)")
    jax.distributed.initialize(given["coordinator"], num_processes=n, process_id=i)
    return True


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes reports, metrics and logs."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches this point (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def everywhere(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (so that all take the same branch)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


__all__ = ["DATA", "MODEL", "barrier", "everywhere", "check_mesh", "initialize", "is_main_process", "mesh", "put",
           "replicate", "shard_batch", "shard_model", "to_host"]
