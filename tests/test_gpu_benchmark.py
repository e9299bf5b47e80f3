"""The GPU benchmark refuses to report numbers from a CPU (its --allow-cpu check runs in minutes, so it is
run by hand, not here)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="this machine has a GPU: the benchmark would run")
def test_the_gpu_benchmark_refuses_to_run_on_a_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "not a GPU" in result.stderr and "--allow-cpu" in result.stderr
    assert "tokens/s" not in result.stdout
