"""The one error type for unreadable or unsupported model files."""

from pathlib import Path


class LoadError(ValueError):
    """A model file or directory that cannot be loaded; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")
