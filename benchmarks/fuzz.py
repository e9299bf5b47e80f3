"""Fuzz the file readers: thousands of damaged GGUF files, HF directories (config.json and
safetensors), tokenizer.json files and orbax checkpoints, each read in a watched worker process.

    .venv/bin/python benchmarks/fuzz.py --cases 2000

Each case copies a tiny valid seed, damages it (see tests/fuzz_cases.py: truncation, flipped bits,
absurd integers in headers, absurd sizes and dtypes in metadata, retyped or removed JSON keys) and
reads it with the public reader. The parent gives every case ``--timeout`` seconds (longer = a
hang: the worker is killed and replaced) and the worker exits if its memory grows by more than
``--memory-mb`` (a blow-up from a declared size). Reported per target: cases read fine ("ok"),
refused with a clear error naming the file ("clean"), and findings: "unclear" (another exception,
or an error that does not name the file), "hang", "memory", "died" (the process crashed).
Exits 1 if there is any finding.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FINDINGS = ("unclear", "hang", "memory", "died")


def worker(seed_dir: Path, work_dir: Path, memory_mb: int) -> None:
    """Read case lines ``target seed`` from stdin; answer one JSON line each."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    os.environ["JINTERP_CACHE"] = str(work_dir / "cache")
    import fuzz_cases

    import jinterp  # noqa: F401  (JAX starts before the watchdog takes its baseline)

    seeds = {target: seed_dir / name for target, name in
             {"gguf": "model.gguf", "hf": "hf", "tokenizer": "tokenizer.json", "checkpoint": "checkpoints"}.items()}
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    limit = rss() + memory_mb * 2**20

    def watchdog():
        while True:
            if rss() > limit:
                os._exit(99)
            time.sleep(0.005)

    threading.Thread(target=watchdog, daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        target, seed = line.split()
        start = time.perf_counter()
        verdict, mutation, detail = fuzz_cases.attempt(target, seeds, work_dir, int(seed))
        print(json.dumps({"verdict": verdict, "mutation": mutation, "detail": detail,
                          "seconds": time.perf_counter() - start}), flush=True)


class Worker:
    def __init__(self, seed_dir: Path, work_dir: Path, memory_mb: int):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(seed_dir), str(work_dir), "--memory-mb", str(memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.process.stdout.readline().strip() == "ready", "the fuzz worker did not start"

    def ask(self, target: str, seed: int, timeout: float) -> dict:
        self.process.stdin.write(f"{target} {seed}\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            self.process.wait()
            return {"verdict": "hang", "mutation": "?", "detail": f"no answer within {timeout} s", "seconds": timeout}
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            verdict = "memory" if code == 99 else "died"
            return {"verdict": verdict, "mutation": "?", "detail": f"worker exit code {code}", "seconds": None}
        return json.loads(line)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self):
        if self.alive():
            self.process.stdin.close()
            self.process.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="total cases, spread over the four targets")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds allowed per case")
    parser.add_argument("--memory-mb", type=int, default=1024, help="memory growth that counts as a blow-up")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker, args.memory_mb)
        return 0

    sys.path.insert(0, str(HERE.parent / "tests"))
    from fuzz_cases import TARGETS, write_seeds
    from tqdm.auto import tqdm

    root = Path(tempfile.mkdtemp(prefix="jinterp-fuzz-"))
    write_seeds(root / "seeds")
    (root / "work").mkdir()
    counts = collections.Counter()
    findings, slowest = [], 0.0
    current = Worker(root / "seeds", root / "work", args.memory_mb)
    started = time.perf_counter()
    for i in tqdm(range(args.cases), desc="fuzz cases", unit="case"):
        target, seed = TARGETS[i % len(TARGETS)], args.first_seed + i
        if not current.alive():
            current = Worker(root / "seeds", root / "work", args.memory_mb)
        answer = current.ask(target, seed, args.timeout)
        counts[target, answer["verdict"]] += 1
        slowest = max(slowest, answer["seconds"] or 0.0)
        if answer["verdict"] in FINDINGS:
            findings.append({"target": target, "seed": seed, **answer})
    current.close()
    summary = {
        "cases": args.cases, "seconds": round(time.perf_counter() - started, 1),
        "slowest_case_seconds": round(slowest, 3), "timeout_seconds": args.timeout, "memory_mb": args.memory_mb,
        "by_target": {t: {v: counts[t, v] for v in ("ok", "clean", *FINDINGS)} for t in TARGETS},
        "findings": findings,
    }
    print(f"{'target':<11}{'cases':>7}{'ok':>6}{'clean':>7}" + "".join(f"{f:>9}" for f in FINDINGS))
    for target, row in summary["by_target"].items():
        print(f"{target:<11}{sum(row.values()):>7}{row['ok']:>6}{row['clean']:>7}"
              + "".join(f"{row[f]:>9}" for f in FINDINGS))
    print(f"{args.cases} cases in {summary['seconds']} s; slowest case {summary['slowest_case_seconds']} s "
          f"(bound {args.timeout} s); {len(findings)} findings")
    for finding in findings[:30]:
        print(f"  {finding['target']} seed {finding['seed']}: {finding['verdict']} after {finding['mutation']}: "
              f"{finding['detail'][:240]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
