"""Checkpointed experiment runs.

An ``Experiment`` is a config dataclass plus a ``compute`` function that does its work in named
steps through a ``Run``, and a ``report`` function that turns the results into plots, a metrics
JSON and an HTML report. ``execute`` runs one in a directory:

    DIR/
      run.json              config, its hash, package versions, devices, step timings, status
      checkpoints/
        NAME/               one completed step, an orbax PyTree checkpoint ...
        NAME.json           ... and its seal: a sha256 of the restored values and the compute time
        NAME.chunks/00003/  one completed chunk of a chunked step (a sweep layer), sealed the same way
        NAME.chunks/layout.json  which patches each chunk holds: chunks cut otherwise are computed again
        results/            everything ``compute`` returned
      metrics.json, report.html, plots/*.png    written by the experiment's ``report``

A step is complete only once its seal is written, after orbax has atomically renamed the
checkpoint into place, so a run killed at any moment resumes from the last complete step or
chunk. A checkpoint that is unsealed, unreadable or whose values no longer match its seal is
reported, deleted and recomputed. Restored values are the saved bytes, and recomputed ones come
from the same code on the same inputs, so a resumed run's results are bit-identical to an
uninterrupted one (on CPU). A directory holding a run of a different config is refused. A full or
read-only disk stops the run with one ``DiskError`` (an ``OSError`` keeping the errno) naming the
directory; once there is room, running it again resumes from its last sealed checkpoint.

Several processes (``jinterp.sharding.initialize``) run the same experiment together: every
process takes every step (the computations are collective, over ``Run.mesh``), the checkpoints
go through orbax's multi-process saving (each process calls it; process 0 writes the values) in
a directory they all see, and only process 0 deletes checkpoints and writes seals, ``run.json``,
logs and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from jinterp import sharding
from jinterp.models.config import choose
from jinterp.paths import inside

RUN_FILE = "run.json"
PACKAGES = ("jinterp", "jax", "jaxlib", "equinox", "numpy", "orbax-checkpoint", "tokenizers", "optax")


class ConfigMismatch(RuntimeError):
    """The output directory holds a run of a different experiment or config."""


class DiskError(OSError):
    """A run's file could not be written: its disk is full or read-only. ``errno`` is the cause's
    (ENOSPC, EDQUOT, EFBIG, EROFS, EACCES or EPERM), ``filename`` the directory. Free space (or make
    the directory writable) and run again: the run resumes from its last sealed checkpoint."""

    def __init__(self, code: int, message: str, directory):
        super().__init__(code, message, str(directory))

    def __str__(self) -> str:
        return self.strerror


@dataclasses.dataclass(frozen=True)
class Experiment:
    """``config``: a dataclass type whose fields all have defaults; ``compute(run)`` returns the
    results pytree; ``report(config, results, directory, info)`` writes the outputs."""

    name: str
    description: str
    config: type
    compute: Callable[[Run], Any]
    report: Callable[[Any, Any, Path, dict], None]


# Config: a dataclass <-> a JSON-able dict, overridable with key=value strings.

def option(default, help: str):
    """A config field with its default and the help line ``jinterp run --help`` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def config_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples become lists, as in the file


def config_hash(experiment: str, config) -> str:
    text = json.dumps({"experiment": experiment, "config": config_dict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_config(config_type: type, values: dict | None = None, overrides: list[str] = ()):
    """The config from its defaults, then ``values`` (from a file), then ``key=value`` strings
    (values read as YAML: ``n=8``, ``layers=[0, 3]``, ``name=Mary``)."""
    values = dict(values or {})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Override {item!r} is not of the form key=value")
        values[key.strip()] = yaml.safe_load(text) if text.strip() else ""
    hints = typing.get_type_hints(config_type)
    fields = {f.name for f in dataclasses.fields(config_type)}
    for key in values:
        choose(key, sorted(fields), f"{config_type.__name__} key")
    return config_type(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})


def _coerce(key: str, value, hint):
    """``value`` as type ``hint`` (bool, int, float, str, tuples and lists of them, optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        return origin(_coerce(key, v, item) for v in value)
    if hint is Any or isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool)):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)):
        return str(value)
    raise ValueError(f"Config key {key!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def read_config_file(path: Path) -> dict:
    """A config as JSON or YAML (by suffix)."""
    text = Path(path).read_text()
    values = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds a mapping of keys to values")
    return values.get("config", values)  # a run.json works too


# Checkpoints.

def _digest(tree) -> str:
    """A sha256 over every leaf's path, type, dtype, shape and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        if isinstance(leaf, np.ndarray):
            h.update(f"{leaf.dtype}{leaf.shape}".encode())
            h.update(np.ascontiguousarray(leaf).tobytes())
        else:
            h.update(f"{type(leaf).__name__}:{leaf!r}".encode())
    return h.hexdigest()


def _to_numpy(tree):
    return jax.tree.map(lambda x: sharding.to_host(x) if isinstance(x, (jax.Array, np.generic)) else x, tree)


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    remove = lambda: staging.unlink(missing_ok=True)  # noqa: E731
    with writing(path.parent, f"write {path.name}", len(text.encode()), cleanup=remove):
        with open(staging, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)


# A full or read-only disk: every write of a run's files goes through ``writing``, which turns it into
# one DiskError however it surfaced (orbax writes from its own threads and event loops).

FULL = {errno.ENOSPC: ("no space is left on the device", "Free some space"),
        errno.EDQUOT: ("the disk quota is exhausted", "Free some space"),
        errno.EFBIG: ("a file would exceed the file-size limit", "Raise the limit (ulimit -f)")}
METADATA = 64 * 1024  # room a checkpoint takes beyond its arrays: orbax's dozen small files, a block each
READ_ONLY = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission to write is denied",
             errno.EPERM: "writing is not permitted"}


@contextlib.contextmanager
def writing(directory, what: str, needed: int | None = None, cleanup: Callable[[], None] | None = None):
    """Write ``what`` (``needed`` bytes, if known) under ``directory``; a full or read-only disk
    raises DiskError. ``cleanup`` runs after any failure (removing a partial write)."""
    try:
        yield
    except Exception as error:
        if cleanup is not None:
            with contextlib.suppress(OSError):
                cleanup()
        if isinstance(error, DiskError):
            raise
        code = _disk_errno(error) or _disk_state(Path(directory), needed)
        if code is None:
            raise
        raise DiskError(code, _disk_message(Path(directory), what, needed, code), directory) from error


def _disk_errno(error: BaseException) -> int | None:
    """The disk errno behind ``error``: an OSError in its causes, contexts or exception groups, or
    tensorstore's ``[os_error_code='28']`` in a message (orbax re-raises those as ValueError)."""
    seen, pending = set(), [error]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and (error.errno in FULL or error.errno in READ_ONLY):
            return error.errno
        code = re.search(r"os_error_code='?(\d+)", str(error))
        if code and (int(code[1]) in FULL or int(code[1]) in READ_ONLY):
            return int(code[1])
        pending += [error.__cause__, error.__context__]
        if isinstance(error, BaseExceptionGroup):
            pending += error.exceptions
    return None


def _disk_state(directory: Path, needed: int | None) -> int | None:
    """The disk's state, for an error that lost its cause ("Event loop is closed"): read-only, not
    writable, or with less room than the write needs."""
    with contextlib.suppress(OSError):  # the directory cannot be examined: the original error stands
        where = _existing(directory)
        if os.statvfs(where).f_flag & os.ST_RDONLY:
            return errno.EROFS
        if not os.access(where, os.W_OK):
            return errno.EACCES
        if needed is not None and _free(where) < needed:
            return errno.ENOSPC
    return None


def _existing(directory: Path) -> Path:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


def _free(directory: Path) -> int:
    stat = os.statvfs(_existing(directory))
    return stat.f_bavail * stat.f_frsize


def _disk_message(directory: Path, what: str, needed: int | None, code: int) -> str:
    reason, fix = FULL.get(code) or (READ_ONLY[code], "Make the directory writable")
    reason += f" ({errno.errorcode.get(code, code)})"
    if code in FULL:
        reason += f"; {f'about {_size(needed)} needed, ' if needed is not None else ''}{_size(_free(directory))} free"
    return (f"Cannot {what} in {directory}: {reason}. {fix} and run again: "
            "the run resumes from its last sealed checkpoint.")


def _size(n: int) -> str:
    power = min(len(str(int(n))) - 1, 12) // 3
    return f"{n / 1000 ** power:.3g} {('bytes', 'kB', 'MB', 'GB', 'TB')[power]}"


class Store:
    """Sealed orbax checkpoints in one directory, by name."""

    def __init__(self, directory: Path, log: Callable[[str], None]):
        import orbax.checkpoint as ocp  # a slow import, needed only by runs

        self.directory = directory
        self.log = log
        self._checkpointer = ocp.PyTreeCheckpointer()
        with writing(directory, "create the checkpoint directory"):
            directory.mkdir(parents=True, exist_ok=True)
        if sharding.is_main_process():
            for leftover in directory.rglob("*.orbax-checkpoint-tmp*"):
                self.log(f"Removing a half-written checkpoint {leftover.relative_to(directory)}")
                shutil.rmtree(leftover, ignore_errors=True)
        sharding.barrier("jinterp store opened")

    def _paths(self, name: str) -> tuple[Path, Path]:
        return inside(self.directory, name), inside(self.directory, f"{name}.json")

    def load(self, name: str):
        """(values, seal) of a complete checkpoint, or None if there is none or it is broken."""
        path, seal_path = self._paths(name)
        # Every process takes the same branch: the steps that follow are collective.
        if not sharding.everywhere(path.exists() or seal_path.exists()):
            return None
        problem = None
        try:
            if not seal_path.exists():
                raise ValueError("it was never sealed (the run stopped while writing it)")
            seal = json.loads(seal_path.read_text())
            values = self._checkpointer.restore(path.resolve())
            if _digest(values) != seal["sha256"]:
                raise ValueError("its values do not match the sha256 it was sealed with")
        except Exception as error:  # whatever makes a checkpoint unreadable, it is recomputed
            problem = error
        if sharding.everywhere(problem is None):
            return values, seal
        self.log(f"Checkpoint {path.relative_to(self.directory.parent)} is corrupt or incomplete "
                 f"({str(problem or 'on another process').splitlines()[0][:200]}); recomputing it")
        self.delete(name)
        return None

    def save(self, name: str, values, seconds: float):
        """Writes and seals ``values``; returns them as they read back (numpy arrays). A full or
        read-only disk raises DiskError, the partial write removed."""
        path, seal_path = self._paths(name)
        values = _to_numpy(values)
        needed = METADATA + sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(values))
        with writing(self.directory, f"write checkpoint {name!r}", needed, cleanup=lambda: self._discard(path)):
            self.delete(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._checkpointer.save(path.resolve(), values)  # with several processes, all of them
        restored = self._checkpointer.restore(path.resolve())
        if sharding.is_main_process():
            _write_atomically(seal_path, json.dumps({"sha256": _digest(restored), "seconds": seconds}))
        sharding.barrier(f"jinterp sealed {name}")
        return restored

    def delete(self, name: str) -> None:
        path, seal_path = self._paths(name)
        sharding.barrier(f"jinterp deleting {name}")  # no process still reads it
        if sharding.is_main_process():
            with writing(self.directory, f"delete checkpoint {name!r}"):
                seal_path.unlink(missing_ok=True)  # unseal first: a half-deleted checkpoint is then incomplete
            shutil.rmtree(path, ignore_errors=True)
        sharding.barrier(f"jinterp deleted {name}")

    def _discard(self, path: Path) -> None:
        """Removes what a failed save left (orbax's temporary directory), freeing its space."""
        if sharding.is_main_process():
            for partial in path.parent.glob(f"{path.name}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)


class Run:
    """What ``compute`` works through: ``step`` and ``chunked`` save each result once computed
    and return the saved result when it exists."""

    def __init__(self, directory: Path, config, *, quiet: bool = False):
        self.directory = Path(directory)
        self.config = config
        self.quiet = quiet or not sharding.is_main_process()  # one process reports progress
        self.store = Store(self.directory / "checkpoints", self.log)
        self.timings: dict[str, dict] = {}

    def log(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def progress(self, iterable, **kwargs):
        return tqdm(iterable, disable=self.quiet, **kwargs)

    @property
    def mesh(self):
        """A ``("data", "model")`` mesh over every device of every process, data-parallel (pass it as
        ``mesh=`` to sweeps); None with a single device."""
        return sharding.mesh() if len(jax.devices()) > 1 else None

    def _restored_or_computed(self, name: str, compute: Callable[[], Any]) -> tuple[Any, float, bool]:
        """(values, seconds computing them, whether restored): the checkpoint ``name``, or ``compute()``
        saved under it."""
        found = self.store.load(name)
        if found is not None:
            return found[0], found[1]["seconds"], True
        start = time.perf_counter()
        values = jax.block_until_ready(compute())
        seconds = time.perf_counter() - start
        return self.store.save(name, values, seconds), seconds, False

    def step(self, name: str, compute: Callable[[], Any]):
        """``compute()``'s result, saved under ``name``; restored instead of recomputed when saved."""
        values, seconds, restored = self._restored_or_computed(name, compute)
        self.timings[name] = {"seconds": seconds, "restored": restored}
        return values

    def chunked(self, name: str, chunks):
        """A ``Chunks`` (e.g. ``patching.sweep_chunks``) computed chunk by chunk, each saved as it
        completes, then assembled. Chunks saved under another ``layout`` (the same work cut otherwise:
        another memory budget, chunk size or jinterp version) are discarded and computed again, never
        assembled into the wrong rows."""
        if chunks.layout:
            self._keep_only_layout(name, chunks.layout)
        results, seconds, restored = [], 0.0, 0
        for i in self.progress(range(chunks.n), desc=chunks.description, unit="chunk"):
            part = functools.partial(chunks.compute, i)
            value, took, was_restored = self._restored_or_computed(f"{name}.chunks/{i:05d}", part)
            results.append(value)
            seconds += took
            restored += was_restored
        if 0 < restored < chunks.n:
            self.log(f"{name}: {restored} of {chunks.n} chunks restored from checkpoints, the rest computed")
        self.timings[name] = {"seconds": seconds, "restored": restored == chunks.n, "chunks": chunks.n}
        return np.asarray(chunks.assemble([np.asarray(r) for r in results]))


    def _keep_only_layout(self, name: str, layout: str) -> None:
        """Deletes ``name``'s saved chunks unless they were saved under ``layout``; records ``layout``."""
        record = inside(self.store.directory, f"{name}.chunks/layout.json")
        # Every process takes the same branch (the deletes are collective), before process 0 writes the record.
        if sharding.everywhere(record.exists() and json.loads(record.read_text()) == {"layout": layout}):
            return
        saved = sorted(p.stem for p in record.parent.glob("*.json") if p != record)
        if saved:
            self.log(f"{name}: {len(saved)} saved chunks were cut another way (another memory budget, chunk "
                     "size or version): computing them again")
        for chunk in saved:
            self.store.delete(f"{name}.chunks/{chunk}")
        if sharding.is_main_process():
            with writing(self.store.directory, f"create {record.parent}"):
                record.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(record, json.dumps({"layout": layout}))
        sharding.barrier(f"jinterp recorded the layout of {name}")


def environment() -> dict:
    """Package versions and devices, recorded with every run."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "devices": [str(d) for d in jax.devices()], "processes": jax.process_count()}


def read_info(directory: Path) -> dict:
    path = Path(directory) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no run ({RUN_FILE} is missing)")
    return json.loads(path.read_text())


def execute(experiment: Experiment, config, directory, *, fresh: bool = False, quiet: bool = False):
    """Runs ``experiment`` with ``config`` in ``directory``, resuming whatever a previous run of the
    same config completed (``fresh=True`` discards it); writes the report; returns the results."""
    directory = Path(directory)
    digest = config_hash(experiment.name, config)
    previous = directory / RUN_FILE
    earlier_steps = {}
    if previous.exists() and not fresh:
        info = json.loads(previous.read_text())
        if info.get("config_hash") != digest:
            raise ConfigMismatch(_mismatch(directory, info, experiment.name, config))
        then, now = info.get("environment", {}).get("packages", {}), environment()["packages"]
        if info.get("status") != "complete" and then != now:  # finishing it would mix results of two versions
            changed = "; ".join(f"{k}: {then.get(k)} -> {now.get(k)}" for k in now if then.get(k) != now.get(k))
            raise ConfigMismatch(f"{directory} holds an unfinished run started with other package versions "
                                 f"({changed}). Pass --fresh to discard it, or --out for another directory")
        # Steps inside restored results are not visited again; keep their original timings.
        earlier_steps = {name: {**t, "restored": True} for name, t in info.get("steps", {}).items()}
    main = sharding.is_main_process()  # with several processes, process 0 alone writes files
    sharding.barrier("jinterp run checked")  # every process read run.json before it changes
    with writing(directory, "start the run"):
        if fresh and directory.exists() and main:
            for owned in (RUN_FILE, "checkpoints"):
                path = directory / owned
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        directory.mkdir(parents=True, exist_ok=True)
    info = {"experiment": experiment.name, "config": config_dict(config), "config_hash": digest,
            "command": sys.argv, "environment": environment(), "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if main:
        _write_atomically(previous, json.dumps(info, indent=2))
    sharding.barrier("jinterp run started")

    start = time.perf_counter()
    run = Run(directory, config, quiet=quiet)
    results = run.step("results", lambda: experiment.compute(run))
    info.update(status="complete", seconds=time.perf_counter() - start, steps=earlier_steps | run.timings)
    if main:
        _write_atomically(previous, json.dumps(info, indent=2))
        report_start = time.perf_counter()
        with writing(directory, "write the report"):
            experiment.report(config, results, directory, info)
        info["report_seconds"] = time.perf_counter() - report_start
        _write_atomically(previous, json.dumps(info, indent=2))
    sharding.barrier("jinterp run reported")
    return results


def _mismatch(directory: Path, info: dict, name: str, config) -> str:
    if info.get("experiment") != name:
        what = f"a run of experiment {info.get('experiment')!r}, not {name!r}"
    else:
        old, new = info.get("config", {}), config_dict(config)
        changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
        what = "a run of a different config (" + "; ".join(changed or ["same keys, other version"]) + ")"
    return (f"{directory} holds {what}. Results are never mixed: pass --fresh to discard it, or --out to "
            "write this run to another directory")


def rebuild_report(experiment: Experiment, directory) -> None:
    """Writes the report again from a complete run's saved results (no model needed)."""
    directory = Path(directory)
    info = read_info(directory)
    if info.get("experiment") != experiment.name:
        raise ConfigMismatch(f"{directory} holds a run of {info.get('experiment')!r}, not {experiment.name!r}")
    config = make_config(experiment.config, info["config"])
    found = Store(directory / "checkpoints", print).load("results")
    if found is None:
        raise FileNotFoundError(f"{directory}: the run has not completed (no saved results); "
                                f"finish it with `jinterp run {experiment.name} --out {directory}`")
    with writing(directory, "write the report"):
        experiment.report(config, found[0], directory, info)


def by_name(experiments: dict[str, Experiment], name: str) -> Experiment:
    return experiments[choose(name, sorted(experiments), "experiment")]
