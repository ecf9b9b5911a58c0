"""The one JSONL reader: benchmarks, calibration files, the scenario's data and `data split` read through it."""

from __future__ import annotations

import json
from pathlib import Path

from eval_harness.errors import UserError


def iter_jsonl(path: str | Path, invalid=None):
    """(line number, parsed value) for each non-blank line, in file order. A line that is not JSON raises
    `invalid(lineno, message)` when given, else a one-line UserError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                if invalid is not None:
                    raise invalid(lineno, e.msg) from None
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per line") \
                    from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Every line's JSON object (blank lines skipped); a line that is not a JSON object is a one-line UserError."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows
