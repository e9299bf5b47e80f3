"""No pickle or eval on any file or config, no writes outside a run's directory, and reports that
show prompts' HTML as text."""

import ast
import dataclasses
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml

from jinterp import runs
from jinterp.report import Report

PACKAGE = Path(__file__).resolve().parents[1] / "jinterp"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "__import__"}


def unsafe_uses(source: str) -> list[str]:
    """Lines that unpickle, evaluate code, or load YAML / numpy files unsafely."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.ImportFrom) and node.module == "jinja2":
            found += [f"{node.lineno}: unsandboxed jinja2.{a.name}" for a in node.names if "Environment" in a.name]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and name in UNSAFE_BUILTINS:
                found.append(f"{node.lineno}: {name}()")
            elif owner == "yaml" and name != "safe_load" and name.endswith("load"):
                found.append(f"{node.lineno}: yaml.{name}")
            elif owner in ("np", "numpy") and name == "load":
                allow = keywords.get("allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{node.lineno}: np.load without allow_pickle=False")
            elif owner == "torch" and name == "load":
                found.append(f"{node.lineno}: torch.load")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = ("import pickle\nfrom dill import loads\neval('1')\nyaml.load(s)\nnp.load(f)\nnp.load(f, allow_pickle=True)\n"
           "torch.load(p)\nfrom jinja2 import Environment\n")
    assert len(unsafe_uses(bad)) == 8
    assert unsafe_uses("yaml.safe_load(s)\nnp.load(f, allow_pickle=False)\nmodel.eval()\n") == []


def test_no_pickle_or_eval_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = {str(f.relative_to(PACKAGE)): uses for f in files if (uses := unsafe_uses(f.read_text()))}
    assert found == {}


def test_yaml_configs_cannot_construct_objects(tmp_path):
    @dataclasses.dataclass
    class Config:
        name: str = "x"

    path = tmp_path / "config.yaml"
    path.write_text("name: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="python/object/apply"):
        runs.make_config(Config, runs.read_config_file(path))
    with pytest.raises(yaml.constructor.ConstructorError):
        runs.make_config(Config, overrides=["name=!!python/object/apply:os.getcwd []"])


@pytest.mark.parametrize("name", ["../escaped", "a/../../escaped", "/tmp/escaped"])
def test_checkpoint_names_stay_inside_the_run(tmp_path, name):
    store = runs.Store(tmp_path / "run" / "checkpoints", lambda message: None)
    with pytest.raises(ValueError, match="would write outside"):
        store.save(name, {"x": np.zeros(2)}, 0.0)
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()
    store.save("nested/000001", {"x": np.zeros(2)}, 0.0)  # subdirectories are fine (train uses them)
    assert store.load("nested/000001") is not None


def test_plot_names_stay_inside_the_run(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "link").symlink_to(outside)
    report = Report("t", tmp_path / "plots")
    for name in ["../escaped", "link/escaped", "/tmp/escaped"]:
        fig = plt.figure()
        with pytest.raises(ValueError, match="would write outside"):
            report.figure(fig, name)
        plt.close(fig)
    assert list(outside.iterdir()) == [] and not (tmp_path / "escaped.png").exists()


def test_the_report_shows_html_in_prompts_as_text(tmp_path):
    attack = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'

    @dataclasses.dataclass(frozen=True)
    class Config:
        prompt: str = attack

    report = Report(attack, tmp_path / "plots")
    report.heading(attack)
    report.text(attack)
    report.table([attack, "b"], [[attack, 1.5]], caption=attack)
    report.code(attack)
    report.figure(plt.figure(), "plot", caption=attack)
    report.run_section(Config(), {"steps": {attack: {"seconds": 1.0, "restored": False}}, "config_hash": attack},
                       attack)
    page = report.write(tmp_path / "report.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 7  # each piece of text is there, escaped
