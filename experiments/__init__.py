"""jinterp's experiments, each a module defining ``EXPERIMENT`` (a ``jinterp.runs.Experiment``);
``jinterp run NAME`` runs one. Add a module here to add an experiment."""

from __future__ import annotations

import importlib
import pkgutil


def registry() -> dict:
    """name -> Experiment for every module in this package."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        experiment = getattr(importlib.import_module(f"{__name__}.{module.name}"), "EXPERIMENT", None)
        if experiment is not None:
            found[experiment.name] = experiment
    return found
