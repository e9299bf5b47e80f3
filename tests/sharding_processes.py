"""One process of a two-process run (2 CPU devices each); started twice by test_sharding.py.

``python tests/sharding_processes.py PORT PROCESS_ID RUN_DIR``: joins the coordinator on
localhost:PORT (process 0 starts it) and runs a small checkpointed experiment, a sweep over the
mesh of all 4 devices, twice: the second time it restores the results from the checkpoints. Each
process saves what it got to RUN_DIR/process{I}.npz; the report (written by process 0 alone)
appends a line per call to RUN_DIR/reports.txt.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
sys.path.insert(0, os.path.dirname(__file__))

import dataclasses
from pathlib import Path

import jax
import numpy as np
from conftest import TOY, toy_metric
from sharding_devices import prompts

import jinterp
from jinterp import patching, runs, sharding


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    site: str = "resid_pre"


def compute(run: runs.Run) -> dict:
    model = jinterp.Transformer.init(TOY, jax.random.key(0), std=0.3)
    clean, corrupt = prompts(4)  # as sharding_devices.py, which computes the single-device sweep
    chunks = patching.sweep_chunks(model, clean, corrupt, toy_metric, run.config.site, exact=True, mesh=run.mesh)
    return {"sweep": run.chunked("sweep", chunks), "devices": np.int32(len(run.mesh.devices.flat))}


def report(config, results, directory: Path, info) -> None:
    with open(directory / "reports.txt", "a") as f:
        f.write(f"process {jax.process_index()} of {jax.process_count()}\n")


def main(port: str, process_id: str, directory: str) -> None:
    assert sharding.initialize(f"localhost:{port}", 2, int(process_id))
    experiment = runs.Experiment("toy_sweep", "a sweep over two processes", SweepConfig, compute, report)
    first = runs.execute(experiment, SweepConfig(), directory, quiet=True)
    again = runs.execute(experiment, SweepConfig(), directory, quiet=True)  # restored from the checkpoints
    info = runs.read_info(directory)
    np.savez(Path(directory) / f"process{process_id}.npz", sweep=first["sweep"], again=again["sweep"],
             devices=first["devices"], restored=info["steps"]["results"]["restored"])


if __name__ == "__main__":
    main(*sys.argv[1:])
