"""Same config and seed -> bit-identical results in two fresh processes (CPU): a patching sweep,
a training run and an SAE training (tests/determinism_job.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).with_name("determinism_job.py")


def test_two_fresh_processes_give_the_same_bits():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    jobs = [subprocess.Popen([sys.executable, str(JOB), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env) for _ in range(2)]
    results = []
    for job in jobs:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0].keys() == {"sweep", "train", "sae"}
    assert results[0] == results[1]
