"""Checkpointed runs: configs, resuming, refusing a changed config, corrupt checkpoints."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import TOY

from jinterp import patching, runs

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
        chunks = patching.sweep_chunks(toy, CLEAN, CORRUPT, metric, "resid_pre", layers=layers)
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
