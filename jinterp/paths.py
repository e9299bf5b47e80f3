"""Joining names that may come from configs or data under a directory, without escaping it."""

from __future__ import annotations

from pathlib import Path


def inside(directory, name: str) -> Path:
    """``directory / name``, refused if ``name`` is absolute or climbs out (``..``, or a symlink
    that resolves elsewhere): a checkpoint or plot name from a config cannot write outside its run."""
    directory = Path(directory)
    path = directory / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(directory.resolve()):
        raise ValueError(f"{name!r} would write outside {directory}; use a plain relative name "
                         "(letters, digits, '_', '-', '.', '/' without '..')")
    return path
