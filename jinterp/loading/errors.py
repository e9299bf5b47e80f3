"""The one error type for unreadable or unsupported model files, and the JSON reader that raises it."""

import json
from pathlib import Path


class LoadError(ValueError):
    """A model file or directory that cannot be loaded; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


def json_object(path: Path) -> dict:
    """The JSON object in the file at ``path``; a LoadError naming the file if it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoadError(path, f"not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise LoadError(path, f"expected a JSON object, got {type(data).__name__}")
    return data
