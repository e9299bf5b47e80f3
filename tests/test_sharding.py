"""Sharded sweeps, attribution and runs equal single-device ones; several processes finish one sweep.

The device counts must be set before JAX starts, so the sharded runs happen in subprocesses
(sharding_devices.py: 8 CPU devices; sharding_processes.py: 2 processes of 2 devices each).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jinterp import cli, sharding

HERE = Path(__file__).parent
# Both sides of each comparison run in the same subprocess; skipping XLA's backend optimisations
# halves the compile time that dominates these small programs.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _python(script: str, *args, env=None) -> subprocess.Popen:
    env = {**os.environ, **(env or {}), "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
    return subprocess.Popen([sys.executable, str(HERE / script), *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 240) -> None:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{process.args[1]} did not finish in {timeout} s:\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Runs the 8-device script and the two processes side by side; their output directory."""
    directory = tmp_path_factory.mktemp("sharding")
    port = _free_port()
    started = [_python("sharding_devices.py", directory / "sharded.npz")]
    started += [_python("sharding_processes.py", port, i, directory / "run") for i in range(2)]
    for process in started:
        _finish(process)
    return directory


def test_sharded_results_equal_single_device(outputs):
    saved = np.load(outputs / "sharded.npz")

    # exact=True with replicated weights: every device runs the very program one device runs.
    np.testing.assert_array_equal(saved["sweep_exact_8x1.sharded"], saved["sweep_exact_8x1.reference"])
    # Split heads and MLP units sum their parts across devices: equal to float rounding. Measured 1.9e-6 x the
    # values' scale at most (the tolerance is 5.9x to 42x the measured difference, case by case).
    for name in ("sweep_4x2", "path_patch_4x2", "attribution_4x2", "run_4x2", "run_gqa_2x3"):
        reference, sharded = saved[f"{name}.reference"], saved[f"{name}.sharded"]
        assert reference.shape == sharded.shape, name
        np.testing.assert_allclose(sharded, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max(), err_msg=name)
        assert np.ptp(reference) > 0.1, name  # the comparison is not between constants: measured 1.25 and more

    # The layouts: TOY's 6 query heads, 2 kv heads and 44 MLP units split 2 ways; a batch of 4 over 4.
    assert (saved["W_Q_shard_heads"], saved["W_K_shard_heads"], saved["W_in_shard_hidden"]) == (3, 1, 22)
    assert saved["run_logits_batch_per_device"] == 1
    # Over 3 devices the 6 query heads split, the 2 kv heads are replicated.
    assert (saved["gqa_W_Q_shard_heads"], saved["gqa_W_K_shard_heads"]) == (2, 2)

    heads, batch, devices = saved["errors"]
    assert "n_heads=6" in heads and "dividing 6" in heads
    assert "(3, 7)" in batch and "multiple of 8" in batch
    assert "8 devices" in devices


def test_two_processes_finish_a_sweep(outputs):
    single = np.load(outputs / "sharded.npz")["sweep_exact_8x1.reference"]  # the same sweep on one device
    for i in range(2):
        got = np.load(outputs / "run" / f"process{i}.npz")
        assert got["devices"] == 4  # the mesh spans both processes' devices
        np.testing.assert_array_equal(got["sweep"], single)  # exact=True: the single-device program, bit for bit
        np.testing.assert_array_equal(got["again"], got["sweep"])  # restored from the shared checkpoints
        assert got["restored"]
    # Process 0 alone wrote the report, once per run.
    assert (outputs / "run" / "reports.txt").read_text() == "process 0 of 2\n" * 2


def test_cli_starts_jax_distributed(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(sharding, "initialize", lambda *args: started.append(args))
    monkeypatch.setattr(cli, "_experiments", lambda: {})  # stop right after initialising
    with pytest.raises(ValueError, match="experiment"):
        cli.run(cli.parser().parse_args(["run", "x", "--coordinator", "10.0.0.1:1234", "--num-processes", "4",
                                         "--process-id", "2"]))
    assert started == [("10.0.0.1:1234", 4, 2)]


def test_initialize_reads_the_environment_and_checks_it(monkeypatch):
    for variable in sharding.ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    assert sharding.initialize() is False  # nothing asked: one process
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("JINTERP_COORDINATOR", "host:99")
    with pytest.raises(ValueError, match=r"missing: num_processes \(or \$JINTERP_NUM_PROCESSES\), process_id"):
        sharding.initialize()
    monkeypatch.setenv("JINTERP_NUM_PROCESSES", "2")
    monkeypatch.setenv("JINTERP_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"process_id=2 must be in 0..1"):
        sharding.initialize()
    with pytest.raises(ValueError, match="host:port"):
        sharding.initialize("host", 2, 1)
    assert sharding.initialize(process_id=1) and calls == [(("host:99",), {"num_processes": 2, "process_id": 1})]


def test_mesh_errors():
    auto = (jax.sharding.AxisType.Auto,)
    with pytest.raises(ValueError, match="must be 'data' and optionally 'model'"):
        sharding.check_mesh(jax.make_mesh((1,), ("batch",), axis_types=auto))
    with pytest.raises(ValueError, match="must be AxisType.Auto"):
        sharding.check_mesh(jax.make_mesh((1,), ("data",)))  # Explicit, jax.make_mesh's default
    assert sharding.check_mesh(jax.make_mesh((1,), ("data",), axis_types=auto))
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        sharding.check_mesh("data")
    with pytest.raises(ValueError, match="model=0"):
        sharding.mesh(model=0)


def test_importing_jinterp_leaves_the_xla_backend_unstarted():
    """jax.distributed.initialize must run before the backend starts, and the CLI calls it after
    importing jinterp: no module of the package may compute anything at import time."""
    code = "import jinterp\nfrom jax._src import xla_bridge\nassert not xla_bridge._backends, 'backend started'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
