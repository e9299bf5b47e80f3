"""Checkpointed runs: configs, resuming, refusing a changed config, corrupt checkpoints."""

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TOY
from test_train import assert_same_bits, fit

from jinterp import patching, runs
from jinterp.models import flat as flat_params

RNG = np.random.default_rng(0)
CLEAN = RNG.integers(0, TOY.d_vocab, (2, 6)).astype(np.int32)
CORRUPT = (CLEAN + 3) % TOY.d_vocab


@dataclasses.dataclass(frozen=True)
class Settings:
    seed: int = 0
    scale: float = 1.0
    label: str = "toy"
    layers: tuple[int, ...] | None = None


def metric(logits):
    return logits[:, -1, 5].mean()


def make_experiment(toy, calls: list):
    def compute(run):
        cfg = run.config
        noise = run.step("noise", lambda: (calls.append("noise"), {
            "values": cfg.scale * np.asarray(jax.random.normal(jax.random.key(cfg.seed), (3, 4))),
            "label": cfg.label, "words": ["a", "b"]})[1])
        layers = None if cfg.layers is None else list(cfg.layers)
        chunks = patching.sweep_chunks(toy, CLEAN, CORRUPT, metric, "resid_pre", layers=layers,
                                       chunk_size=CLEAN.shape[1])  # a layer's positions a chunk: several chunks
        counting = dataclasses.replace(chunks, compute=lambda i: (calls.append(f"chunk{i}"), chunks.compute(i))[1])
        return {"noise": noise, "sweep": run.chunked("sweep", counting)}

    def report(cfg, results, directory, info):
        (directory / "metrics.json").write_text(json.dumps({"total": float(results["sweep"].sum()),
                                                            "steps": sorted(info["steps"])}))

    return runs.Experiment("toy", "a toy experiment", Settings, compute, report)


def flat(results):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(results)[0]}


def assert_identical(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
        else:
            assert a[key] == b[key], key


def test_config_from_defaults_files_and_overrides(tmp_path):
    assert runs.make_config(Settings) == Settings()
    cfg = runs.make_config(Settings, {"scale": 2}, ["seed=3", "layers=[0, 2]", "label=x=y"])
    assert cfg == Settings(seed=3, scale=2.0, label="x=y", layers=(0, 2))
    assert runs.make_config(Settings, overrides=["layers=null"]).layers is None
    with pytest.raises(ValueError, match="Unknown Settings key 'sed'.*'seed'"):
        runs.make_config(Settings, overrides=["sed=1"])
    with pytest.raises(ValueError, match="'seed' must be int"):
        runs.make_config(Settings, overrides=["seed=three"])
    with pytest.raises(ValueError, match="key=value"):
        runs.make_config(Settings, overrides=["seed"])
    (tmp_path / "c.yaml").write_text("seed: 4\nlayers: [1]\n")
    (tmp_path / "c.json").write_text(json.dumps({"seed": 4, "layers": [1]}))
    assert runs.read_config_file(tmp_path / "c.yaml") == runs.read_config_file(tmp_path / "c.json")
    assert runs.config_hash("toy", cfg) != runs.config_hash("toy", Settings())
    assert runs.config_hash("toy", cfg) == runs.config_hash("toy", runs.make_config(Settings, runs.config_dict(cfg)))


def test_rerun_restores_everything_and_changed_configs_are_refused(toy, tmp_path):
    calls = []
    experiment = make_experiment(toy, calls)
    first = runs.execute(experiment, Settings(), tmp_path, quiet=True)
    assert calls == ["noise", "chunk0", "chunk1", "chunk2"]
    np.testing.assert_allclose(first["sweep"], patching.sweep(toy, CLEAN, CORRUPT, metric, progress=False))
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "complete" and info["config"] == runs.config_dict(Settings())
    assert info["environment"]["packages"]["jax"] == jax.__version__ and info["environment"]["devices"]
    assert set(info["steps"]) == {"noise", "sweep", "results"}

    calls.clear()
    again = runs.execute(experiment, Settings(), tmp_path, quiet=True)
    assert calls == []  # the saved results are restored; nothing runs
    assert_identical(first, again)
    steps = json.loads((tmp_path / "run.json").read_text())["steps"]
    assert steps.keys() == info["steps"].keys() and all(t["restored"] for t in steps.values())
    assert steps["noise"]["seconds"] == info["steps"]["noise"]["seconds"]

    with pytest.raises(runs.ConfigMismatch, match=r"seed: 0 -> 1.*--fresh.*--out"):
        runs.execute(experiment, Settings(seed=1), tmp_path, quiet=True)
    changed = runs.execute(experiment, Settings(seed=1), tmp_path, fresh=True, quiet=True)
    assert calls == ["noise", "chunk0", "chunk1", "chunk2"]
    assert not np.array_equal(changed["noise"]["values"], first["noise"]["values"])


def test_resume_after_losing_chunks_is_bit_identical(toy, tmp_path, capsys):
    calls = []
    experiment = make_experiment(toy, calls)
    first = runs.execute(experiment, Settings(), tmp_path / "a", quiet=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    store = runs.Store(tmp_path / "b" / "checkpoints", print)
    store.delete("results")
    store.delete("sweep.chunks/00001")
    (tmp_path / "b" / "checkpoints" / "sweep.chunks" / "00002.json").unlink()  # written but never sealed
    calls.clear()
    resumed = runs.execute(experiment, Settings(), tmp_path / "b")
    assert calls == ["chunk1", "chunk2"]
    err = capsys.readouterr().err
    assert "sweep.chunks/00002 is corrupt or incomplete (it was never sealed" in err
    assert "sweep: 1 of 3 chunks restored from checkpoints, the rest computed" in err
    assert_identical(first, resumed)


def test_chunks_saved_under_another_chunking_are_computed_again(toy, tmp_path, capsys):
    """A sweep resumed with another chunk size holds other patches in each chunk: the saved chunks are
    discarded rather than assembled into the wrong rows."""
    def sweep(directory, size):
        calls = []
        chunks = patching.sweep_chunks(toy, CLEAN, CORRUPT, metric, "resid_pre", chunk_size=size)
        counting = dataclasses.replace(chunks, compute=lambda i: (calls.append(i), chunks.compute(i))[1])
        return runs.Run(directory, None).chunked("sweep", counting), calls

    _, computed = sweep(tmp_path / "run", CLEAN.shape[1])
    _, again = sweep(tmp_path / "run", CLEAN.shape[1])
    assert len(computed) > 1 and again == []  # the same chunking: every chunk restored
    resized, computed = sweep(tmp_path / "run", CLEAN.shape[1] - 1)
    assert computed == list(range(len(computed)))
    assert "sweep: 3 saved chunks were cut another way" in capsys.readouterr().err
    uninterrupted, _ = sweep(tmp_path / "uninterrupted", CLEAN.shape[1] - 1)
    assert resized.dtype == uninterrupted.dtype and resized.tobytes() == uninterrupted.tobytes()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete a file"])
def test_corrupt_checkpoints_are_detected_and_recomputed(toy, tmp_path, capsys, damage):
    calls = []
    experiment = make_experiment(toy, calls)
    first = runs.execute(experiment, Settings(), tmp_path, quiet=True)
    runs.Store(tmp_path / "checkpoints", print).delete("results")
    files = sorted(p for p in (tmp_path / "checkpoints" / "noise").rglob("*") if p.is_file() and p.stat().st_size)
    victim = max(files, key=lambda p: p.stat().st_size)  # the array data
    data = bytearray(victim.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[: len(data) // 2]))
    else:
        victim.unlink()
    calls.clear()
    again = runs.execute(experiment, Settings(), tmp_path)
    assert calls == ["noise"]
    assert "checkpoints/noise is corrupt or incomplete" in capsys.readouterr().err
    assert_identical(first, again)


def test_unfinished_runs_of_other_package_versions_are_refused(toy, tmp_path):
    experiment = make_experiment(toy, [])
    runs.execute(experiment, Settings(), tmp_path, quiet=True)
    info = json.loads((tmp_path / "run.json").read_text())
    info["environment"]["packages"]["jax"] = "0.0.1"
    (tmp_path / "run.json").write_text(json.dumps(info))
    runs.execute(experiment, Settings(), tmp_path, quiet=True)  # complete: its results are restored as they are
    info["status"] = "running"
    (tmp_path / "run.json").write_text(json.dumps(info))
    with pytest.raises(runs.ConfigMismatch, match=rf"other package versions \(jax: 0.0.1 -> {jax.__version__}\)"):
        runs.execute(experiment, Settings(), tmp_path, quiet=True)


def test_half_written_orbax_directories_are_removed(toy, tmp_path, capsys):
    experiment = make_experiment(toy, [])
    runs.execute(experiment, Settings(), tmp_path, quiet=True)
    leftover = tmp_path / "checkpoints" / "sweep.chunks" / "00003.orbax-checkpoint-tmp-123"
    leftover.mkdir()
    runs.execute(experiment, Settings(), tmp_path)
    assert not leftover.exists() and "half-written" in capsys.readouterr().err


def test_report_is_rebuilt_from_saved_results(toy, tmp_path):
    experiment = make_experiment(toy, [])
    with pytest.raises(FileNotFoundError, match="holds no run"):
        runs.rebuild_report(experiment, tmp_path)
    runs.execute(experiment, Settings(), tmp_path, quiet=True)
    expected = (tmp_path / "metrics.json").read_text()
    (tmp_path / "metrics.json").unlink()
    runs.rebuild_report(experiment, tmp_path)
    assert (tmp_path / "metrics.json").read_text() == expected


# A full or read-only disk: one DiskError naming the directory, then a resume as if nothing happened.

def numpy_toy():
    """TOY with numpy-drawn weights: the same model in every process, built without compiling."""
    rng = np.random.default_rng(0)
    return flat_params.from_flat(TOY, {name: (rng.normal(0, 0.3, shape) + name.endswith(".w")).astype(np.float32)
                                       for name, shape in flat_params.shapes(TOY).items()})


# Run in a child process: RLIMIT_FSIZE makes every later write past 64 bytes fail with EFBIG, as a
# full disk fails them with ENOSPC, without root or a small file system.
CHILD = """
import dataclasses, json, resource, signal, sys
sys.path.insert(0, {tests!r})
from jinterp import runs

def fill_the_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

try:
{body}
except runs.DiskError as error:
    print(json.dumps({{"errno": error.errno, "filename": error.filename, "message": str(error)}}))
"""

SWEEP = """
    from test_runs import CLEAN, CORRUPT, metric, numpy_toy
    from jinterp import patching
    chunks = patching.sweep_chunks(numpy_toy(), CLEAN, CORRUPT, metric, "resid_pre", chunk_size=CLEAN.shape[1])
    def compute(i):
        if i == 1:  # chunk 0 is sealed; chunk 1's checkpoint meets a full disk
            fill_the_disk()
        return chunks.compute(i)
    runs.Run({directory!r}, None, quiet=True).chunked("sweep", dataclasses.replace(chunks, compute=compute))
"""

TRAIN = """
    from test_train import fit
    evaluations = []
    def evaluate(params):
        evaluations.append(1)
        if len(evaluations) == 3:  # steps 0, 50, 100: the checkpoint at 50 is sealed, the one at 100 fails
            fill_the_disk()
        return {{}}
    fit(runs.Run({directory!r}, None, quiet=True), evaluate=evaluate)
"""


def _disk_fills_in_a_child(body: str, directory) -> dict:
    body = body.format(directory=str(directory))
    script = CHILD.format(tests=os.path.dirname(__file__), body=body.strip("\n"))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0 and child.stdout.strip(), f"no DiskError: {child.stderr[-3000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1])


def _assert_clear(error: dict, checkpoints, name: str):
    assert error["errno"] == errno.EFBIG and error["filename"] == str(checkpoints)
    assert error["message"].startswith(f"Cannot write checkpoint {name!r} in {checkpoints}: a file would exceed "
                                       "the file-size limit (EFBIG); about "), error["message"]
    assert error["message"].endswith("and run again: the run resumes from its last sealed checkpoint.")
    assert not list(checkpoints.rglob("*orbax-checkpoint-tmp*")), "the partial checkpoint was left behind"


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_while_saving_a_sweep_chunk_is_one_clear_error_and_the_sweep_resumes(tmp_path):
    error = _disk_fills_in_a_child(SWEEP, tmp_path / "run")
    _assert_clear(error, tmp_path / "run" / "checkpoints", "sweep.chunks/00001")
    chunks = patching.sweep_chunks(numpy_toy(), CLEAN, CORRUPT, metric, "resid_pre", chunk_size=CLEAN.shape[1])
    calls = []
    counting = dataclasses.replace(chunks, compute=lambda i: (calls.append(i), chunks.compute(i))[1])
    resumed = runs.Run(tmp_path / "run", None, quiet=True).chunked("sweep", counting)
    assert calls == [1, 2]  # chunk 0 was restored
    uninterrupted = runs.Run(tmp_path / "uninterrupted", None, quiet=True).chunked("sweep", chunks)
    assert resumed.dtype == uninterrupted.dtype and resumed.tobytes() == uninterrupted.tobytes()


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_while_saving_a_training_checkpoint_is_one_clear_error_and_training_resumes(tmp_path):
    error = _disk_fills_in_a_child(TRAIN, tmp_path)
    _assert_clear(error, tmp_path / "checkpoints", "train/000000100")
    sealed = sorted(p.name for p in (tmp_path / "checkpoints" / "train").glob("*.json"))
    assert sealed == ["000000050.json"]
    resumed, uninterrupted = fit(runs.Run(tmp_path, None, quiet=True)), fit()
    assert_same_bits(resumed.params, uninterrupted.params)
    assert_same_bits(resumed.history, uninterrupted.history)


@contextlib.contextmanager
def read_only(directory):
    """``directory`` read-only: a read-only bind mount as root (root writes past permissions), else chmod."""
    if os.geteuid() != 0:
        folders = [directory, *(p for p in directory.rglob("*") if p.is_dir())]
        for folder in folders:
            folder.chmod(0o555)
        try:
            yield
        finally:
            for folder in folders:
                folder.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", directory, directory], capture_output=True).returncode:
        pytest.skip("root here cannot bind-mount (no mount privilege), so cannot make a read-only directory")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", directory], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", directory], check=True)


def test_a_read_only_run_directory_is_one_clear_error_and_the_run_resumes(toy, tmp_path):
    calls = []
    experiment = make_experiment(toy, calls)
    first = runs.execute(experiment, Settings(), tmp_path / "a", quiet=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    store = runs.Store(tmp_path / "b" / "checkpoints", print)
    store.delete("results")
    store.delete("sweep.chunks/00001")
    fix = "Make the directory writable and run again: the run resumes from its last sealed checkpoint."
    with read_only(tmp_path / "b"):
        with pytest.raises(runs.DiskError) as started:
            runs.execute(experiment, Settings(), tmp_path / "b", quiet=True)
        assert started.value.errno in (errno.EROFS, errno.EACCES) and started.value.filename == str(tmp_path / "b")
        assert str(started.value).startswith(f"Cannot write run.json in {tmp_path / 'b'}: ")
        assert str(started.value).endswith(fix)
        with pytest.raises(runs.DiskError, match=r"Cannot (write|delete) checkpoint 'sweep.chunks/00001' in "
                                                 rf"{tmp_path / 'b' / 'checkpoints'}: .*\(E(ROFS|ACCES)\)\. {fix}"):
            experiment.compute(runs.Run(tmp_path / "b", Settings(), quiet=True))
    calls.clear()
    resumed = runs.execute(experiment, Settings(), tmp_path / "b", quiet=True)
    assert calls == ["chunk1"]  # the rest was restored
    assert_identical(first, resumed)


def _raised(outer: BaseException, inner: BaseException, cause: bool = False) -> BaseException:
    """``outer`` as raised while handling ``inner`` (its context), or ``from inner`` (its cause)."""
    try:
        try:
            raise inner
        except BaseException as handled:
            if cause:
                raise outer from handled
            raise outer  # noqa: B904 (the implicit context is what this builds)
    except BaseException as error:
        return error


TENSORSTORE = ('RESOURCE_EXHAUSTED: Error writing "x/0" in OCDBT database at local file "/run/checkpoints/x/": '
               "Failed to write 344919 bytes to file 14: No space left on device [os_error_code='{}']")


@pytest.mark.parametrize("error, code", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (_raised(RuntimeError("Event loop is closed"), OSError(errno.EROFS, "Read-only file system")), errno.EROFS),
    (_raised(RuntimeError("Save failed"), PermissionError(errno.EACCES, "Permission denied"), cause=True),
     errno.EACCES),
    (ExceptionGroup("tasks", [ValueError("other"), OSError(errno.EDQUOT, "Disk quota exceeded")]), errno.EDQUOT),
    (ValueError(TENSORSTORE.format(28)), errno.ENOSPC),
    (_raised(RuntimeError("Event loop is closed"), ValueError(TENSORSTORE.format(27))), errno.EFBIG),
], ids=["OSError", "context", "cause", "exception group", "tensorstore message", "tensorstore in a context"])
def test_disk_errors_are_found_however_they_are_wrapped(tmp_path, error, code):
    with pytest.raises(runs.DiskError) as caught, runs.writing(tmp_path, "write checkpoint 'x'", 1000):
        raise error
    assert isinstance(caught.value, OSError) and caught.value.errno == code and caught.value.__cause__ is error
    assert str(caught.value).startswith(f"Cannot write checkpoint 'x' in {tmp_path}: ")


def test_an_error_that_lost_its_cause_on_a_full_disk_is_a_disk_error(tmp_path, monkeypatch):
    with pytest.raises(KeyError), runs.writing(tmp_path, "write checkpoint 'x'", 1000):
        raise KeyError("unrelated, on a disk with room")
    real = os.statvfs(tmp_path)
    full = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, 0, 0, real.f_files, real.f_ffree,
                              real.f_favail, real.f_flag, real.f_namemax))
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    with pytest.raises(runs.DiskError, match=r"no space is left on the device \(ENOSPC\); about 1 kB needed, "
                                             r"0 bytes free\. Free some space and run again"):
        with runs.writing(tmp_path, "write checkpoint 'x'", 1000):
            raise RuntimeError("Event loop is closed")
