"""Read a JSON file that a run wrote, with one error that names the file when it is missing or broken."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def read_json(path: str | Path, what: str, error: type[Exception] = ConfigError):
    """The parsed contents of ``path``; ``error(f"{what} {path} ...")`` when absent or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from e
