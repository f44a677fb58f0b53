"""Reading the run folder's JSON-lines files (``metrics.jsonl``, ``resumes.jsonl``) with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["read_json_lines"]


def read_json_lines(path: Path, valid: Callable[[Any], bool], requirement: str) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line, in file order (blank lines skipped).

    Raises:
        ValueError: a line is not valid JSON, or ``valid(entry)`` is False (``"<path>:<line> must be
            <requirement>"``); FileNotFoundError is the caller's to turn into words (this reads an existing file).
    """
    entries = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e.msg}); fix or delete that line") from e
            if not valid(entry):
                raise ValueError(f"{path}:{number} must be {requirement}")
            entries.append(entry)
    return entries
