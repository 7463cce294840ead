"""Per-example metric values on disk: JSONL, one row `{"metric": str, "id": str, "value": float}` per
example, so that two runs can be compared example by example (paired statistics).

A (metric, id) pair occurs at most once per file and every value is a finite number; rows that break
this are refused (writing) or are errors naming the file, the line and the field (reading).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

FIELDS = ("metric", "id", "value")


def _check_row(row, where: str) -> tuple[str, str, float]:
    """(metric, id, value) of one row, or ValueError prefixed with `where`."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be an object with fields {list(FIELDS)}, got {type(row).__name__}")
    extra = sorted(set(row) - set(FIELDS))
    if extra:
        raise ValueError(f"{where}: field {extra[0]!r} is not one of {list(FIELDS)}")
    for field in ("metric", "id"):
        if not isinstance(row.get(field), str) or not row[field]:
            raise ValueError(f"{where}: field {field!r} missing or not a non-empty string")
    value = row.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field 'value' missing or not a number (got {value!r})")
    if not math.isfinite(value):
        raise ValueError(f"{where}: field 'value' is not finite ({value!r})")
    return row["metric"], row["id"], float(value)


def write_per_example(rows: list[dict], path: str | Path) -> Path:
    """Write `rows` (`{"metric", "id", "value"}` each) as JSONL, in the given order. A duplicate
    (metric, id), a missing field or a non-finite value is a ValueError naming the file and the line
    the row would have been written on; nothing is written then."""
    path = Path(path)
    seen: dict[tuple[str, str], int] = {}
    lines = []
    for lineno, row in enumerate(rows, 1):
        metric, ident, value = _check_row(row, f"{path}:{lineno}")
        if (metric, ident) in seen:
            raise ValueError(f"{path}:{lineno}: duplicate (metric, id) = ({metric!r}, {ident!r}), first on line {seen[metric, ident]}")
        seen[metric, ident] = lineno
        lines.append(json.dumps({"metric": metric, "id": ident, "value": value}) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def read_per_example(path: str | Path) -> list[dict]:
    """The rows of a per-example JSONL file, in file order (blank lines are skipped). Invalid JSON, a
    missing or mistyped field, an unknown field, a non-finite value or a duplicate (metric, id) is a
    ValueError naming the file, the line and the field."""
    path = Path(path)
    seen: dict[tuple[str, str], int] = {}
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            metric, ident, value = _check_row(row, f"{path}:{lineno}")
            if (metric, ident) in seen:
                raise ValueError(f"{path}:{lineno}: duplicate (metric, id) = ({metric!r}, {ident!r}), first on line {seen[metric, ident]}")
            seen[metric, ident] = lineno
            rows.append({"metric": metric, "id": ident, "value": value})
    return rows
