"""Fault injection on runs: SIGKILL at random moments, a full disk, a corrupted newest checkpoint.
Every interrupted run is resumed and its results compared bit for bit (sha256 of every array's
bytes) with an uninterrupted run of the same config.

    .venv/bin/python benchmarks/fault_injection.py --kills 10 --corruptions 5

Two small real runs (``jinterp.runs.execute`` in a child process, as ``jinterp run`` does):

    sweep   a chunked activation-patching sweep (``patching.sweep_chunks``, 4 chunks of 12 patches)
    train   ``jinterp.train`` of a toy transformer, checkpointed every 10 of 40 steps

Trials:

    kill      start the run, SIGKILL it once it has reached a random checkpoint (0 to 4) plus a
              random 0-1 s (1 or 2 times in a row), resume to completion, compare
    corrupt   kill as above, then damage the newest sealed checkpoint (flipped bytes in one of its
              files), resume, compare
    disk-full run in a tmpfs too small to hold the checkpoints (``mount -t tmpfs -o size=...``, needs
              root; falls back to RLIMIT_FSIZE), expect ``jinterp.runs.DiskError`` naming the run's
              directory (nothing else counts as a clean failure), enlarge, resume, compare
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KINDS = ("sweep", "train")


# --- the two runs (in the child process) -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0


def _model():
    """A toy transformer with fixed random weights, drawn with numpy (``Transformer.init`` compiles
    one random-number program per weight shape: minutes per process on a busy machine)."""
    import numpy as np

    import jinterp
    from jinterp.models import flat

    cfg = jinterp.Config(d_model=48, n_layers=4, n_heads=4, d_head=12, d_mlp=96, d_vocab=61, n_ctx=32, norm="rms",
                         positional="rotary", act="silu", gated_mlp=True)
    rng = np.random.default_rng(0)
    arrays = {name: ((1.0 if name.endswith("ln1.w") or name.endswith("ln2.w") or name == "ln_final.w" else 0.0)
                     + rng.normal(0, 0.3, shape)).astype(np.float32) for name, shape in flat.shapes(cfg).items()}
    return flat.from_flat(cfg, arrays)


def _sweep(run):
    import numpy as np

    from jinterp import patching

    model = _model()
    rng = np.random.default_rng(run.config.seed)
    clean = rng.integers(0, 61, (4, 12)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 7) % 61

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 5]).mean()

    chunks = patching.sweep_chunks(model, clean, corrupt, metric, "resid_pre", chunk_size=12, exact=True)
    return {"resid_pre": run.chunked("resid_pre", chunks)}


def _train(run):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jinterp import train

    model = _model()
    data = jnp.asarray(np.random.default_rng(run.config.seed).integers(0, 61, (64, 16)), jnp.int32)
    pick = train.shuffled_batches(64, 16, seed=run.config.seed)
    batches = eqx.Partial(lambda data, step: data[pick(step)], data)

    def loss(params, tokens):
        logits = params(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    trained = train.train(model, loss, optax.adamw(3e-3), batches, steps=40, eval_every=10, run=run,
                          name="model", progress=False)
    return {"params": [np.asarray(x) for x in jax.tree.leaves(eqx.filter(trained.params, eqx.is_array))],
            "loss": trained.history["loss"]}


def child(kind: str, directory: Path) -> None:
    """Run (or resume) ``kind`` in ``directory``; print the sha256 of its results, or the error it raised."""
    from jinterp import runs

    experiment = runs.Experiment(f"fault-{kind}", kind, Config, {"sweep": _sweep, "train": _train}[kind],
                                 lambda config, results, directory, info: None)
    try:
        results = runs.execute(experiment, Config(), directory, quiet=True)
    except Exception as error:  # the parent judges the error by its type, errno and message
        name = f"{type(error).__module__}.{type(error).__qualname__}"
        print(json.dumps({"error": name, "errno": getattr(error, "errno", None), "message": str(error)}), flush=True)
        raise
    print(json.dumps({"digest": runs._digest(runs._to_numpy(results))}), flush=True)


# --- the trials (in the parent) ----------------------------------------------------------------

def start(kind: str, directory: Path, fsize: int | None = None) -> subprocess.Popen:
    def limit():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.Popen([sys.executable, __file__, "--child", kind, str(directory)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit)


def finish(kind: str, directory: Path, fsize: int | None = None) -> tuple[str | None, dict]:
    """(digest, {}) of a finished run, or (None, the error: type, errno and message)."""
    process = start(kind, directory, fsize)
    out, err = process.communicate()
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if process.returncode == 0 and "digest" in result:
        return result["digest"], {}
    if "error" in result:
        return None, result
    return None, {"error": "crash", "errno": None, "message": err.strip().splitlines()[-1] if err.strip()
                  else f"exit code {process.returncode}"}


def describe(error: dict) -> str:
    return f"{error['error']}: {error['message']}" if error else ""


def sealed(directory: Path) -> list[Path]:
    """Sealed checkpoints, oldest first."""
    return sorted((directory / "checkpoints").rglob("*.json"), key=lambda p: p.stat().st_mtime)


def progress(kind: str, directory: Path) -> int:
    """Checkpoints the run has reached: sweep chunks sealed, or training steps / 10 (0..4)."""
    checkpoints = directory / "checkpoints"
    if kind == "sweep":
        return len(list((checkpoints / "resid_pre.chunks").glob("*.json")))
    return max([int(p.stem) // 10 for p in (checkpoints / "model").glob("*.json") if p.stem.isdigit()] or [0])


def kill_randomly(kind: str, directory: Path, rng: random.Random) -> list[str]:
    """Start the run and SIGKILL it once it has reached a random number of checkpoints (0 to all 4),
    plus a random 0-1 s, so the kills land while checkpoints are written; 1 or 2 times in a row."""
    notes = []
    for _ in range(rng.choice([1, 1, 1, 2])):
        process = start(kind, directory)
        target, extra = rng.randrange(5), rng.uniform(0.0, 1.0)
        while process.poll() is None and progress(kind, directory) < target:
            time.sleep(0.02)
        time.sleep(extra)
        if process.poll() is None:
            reached = progress(kind, directory)
            process.send_signal(signal.SIGKILL)
            process.wait()
            notes.append(f"killed at checkpoint {reached} of 4 (+{extra:.2f}s)")
        else:
            notes.append(f"finished before the kill (target checkpoint {target})")
    return notes


def corrupt_newest(directory: Path, rng: random.Random) -> str:
    seals = [p for p in sealed(directory) if (p.parent / p.name.removesuffix(".json")).is_dir()]
    if not seals:
        return "no sealed checkpoint yet"
    newest = seals[-1].parent / seals[-1].name.removesuffix(".json")
    files = sorted(p for p in newest.rglob("*") if p.is_file() and p.stat().st_size)
    target = rng.choice(files)
    data = bytearray(target.read_bytes())
    for _ in range(8):
        i = rng.randrange(len(data))
        data[i] ^= 0xFF
    target.write_bytes(bytes(data))
    return f"flipped 8 bytes of {target.relative_to(directory)}"


def disk_full(kind: str, root: Path, reference: str, size_kb: int) -> dict:
    """Run in a tmpfs of ``size_kb``; expect a clean failure; enlarge it; resume; compare."""
    mount = root / f"tmpfs-{kind}"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    try:
        directory = mount / "run"
        digest, error = finish(kind, directory, None if mounted else size_kb * 1024)
        method = "tmpfs" if mounted else "RLIMIT_FSIZE"
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)
        resumed, resume_error = finish(kind, directory)
        # Clean: jinterp's DiskError with the full disk's errno, naming the run's directory.
        clean = (digest is None and error.get("error") == "jinterp.runs.DiskError"
                 and error.get("errno") in (errno.ENOSPC, errno.EFBIG) and str(directory) in error.get("message", ""))
        return {"kind": kind, "method": method, "size_kb": size_kb, "first_error": describe(error),
                "failed_cleanly": clean, "resumed_identical": resumed == reference,
                "resume_error": describe(resume_error)}
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kill trials per run kind")
    parser.add_argument("--corruptions", type=int, default=5, help="corrupted-checkpoint trials per run kind")
    parser.add_argument("--disk-kb", type=int, default=0, help="size of the too-small tmpfs (default: half the run)")
    parser.add_argument("--no-disk-full", action="store_true", help="skip the disk-full trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return 0

    from tqdm.auto import tqdm

    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="jinterp-faults-"))
    summary = {"trials": [], "disk_full": []}
    for kind in KINDS:
        began = time.perf_counter()
        reference, error = finish(kind, root / f"{kind}-reference")
        seconds = time.perf_counter() - began
        if reference is None:
            raise SystemExit(f"the uninterrupted {kind} run failed: {describe(error)}")
        print(f"{kind}: uninterrupted run {seconds:.1f}s, {len(sealed(root / f'{kind}-reference'))} sealed checkpoints")
        plan = ["kill"] * args.kills + ["corrupt"] * args.corruptions
        for i, trial in enumerate(tqdm(plan, desc=f"{kind} trials", unit="trial")):
            directory = root / f"{kind}-{trial}-{i}"
            notes = kill_randomly(kind, directory, rng)
            if trial == "corrupt":
                notes.append(corrupt_newest(directory, rng))
            digest, error = finish(kind, directory)
            summary["trials"].append({"kind": kind, "trial": trial, "notes": notes, "identical": digest == reference,
                                      "error": describe(error)})
            tqdm.write(f"{kind} {trial} {i}: {'; '.join(notes)} -> "
                       f"{'bit-identical' if digest == reference else 'DIFFERENT ' + describe(error)}")
        # Half the space the finished run takes: the run fails part way, after some checkpoints.
        size_kb = args.disk_kb or sum(p.stat().st_size for p in (root / f"{kind}-reference").rglob("*")) // 2048
        if not args.no_disk_full:
            summary["disk_full"].append(disk_full(kind, root, reference, size_kb))

    failures = [t for t in summary["trials"] if not t["identical"]]
    failures += [d for d in summary["disk_full"] if not (d["failed_cleanly"] and d["resumed_identical"])]
    for kind in KINDS:
        for trial in ("kill", "corrupt"):
            rows = [t for t in summary["trials"] if t["kind"] == kind and t["trial"] == trial]
            kills = sum(n.startswith("killed") for t in rows for n in t["notes"])
            print(f"{kind:<6} {trial:<8} trials {len(rows):>3}  SIGKILLs {kills:>3}  "
                  f"not bit-identical {sum(not t['identical'] for t in rows)}")
    for d in summary["disk_full"]:
        print(f"{d['kind']:<6} disk-full ({d['method']}, {d['size_kb']} KiB): failed cleanly {d['failed_cleanly']} "
              f"({d['first_error'][:300]}); resumed bit-identical {d['resumed_identical']}")
    print(f"{len(failures)} failures")
    for failure in failures:
        print("  ", failure)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
