""""Which line comes next?" over Python standard-library source: 4-way multiple choice.

Context: the 6 lines before a position; the answer: the actual next line; distractors: lines from
other stdlib files, re-indented to the answer's indentation so whitespace gives nothing away. Files
are the top-level `*.py` modules of the running interpreter's stdlib, sorted by name, so the data
depend on (seed, Python version); the version is recorded in the task manifest.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

CONTEXT_LINES = 6


def _usable(line: str) -> bool:
    text = line.strip()
    return 12 <= len(text) <= 80 and not text.startswith(("#", '"""', "'''", "@")) and text.isascii()


def stdlib_files(stdlib_dir: str | Path | None = None) -> list[Path]:
    """Top-level stdlib modules, sorted by name."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if not p.name.startswith("_"))


def next_line_questions(n: int, seed: int, stdlib_dir: str | Path | None = None) -> tuple[list[dict], int]:
    """`n` documents {id, context, choices, label, source} and the number of unreadable files skipped."""
    rng = random.Random(seed)
    files, skipped = [], 0
    for path in stdlib_files(stdlib_dir):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        positions = [
            i for i in range(CONTEXT_LINES, len(lines))
            if _usable(lines[i]) and all(lines[j].strip() for j in range(i - CONTEXT_LINES, i))
        ]
        if positions:
            files.append((path.name, lines, positions))
    if len(files) < 4:
        raise ValueError(f"need at least 4 stdlib files with usable lines, found {len(files)}")
    docs = []
    for k in range(n):
        name, lines, positions = rng.choice(files)
        i = rng.choice(positions)
        answer = lines[i]
        indent = answer[: len(answer) - len(answer.lstrip())]
        distractors: list[str] = []
        while len(distractors) < 3:
            other_name, other_lines, other_positions = rng.choice(files)
            candidate = indent + other_lines[rng.choice(other_positions)].strip()
            if other_name != name and candidate != answer and candidate not in distractors:
                distractors.append(candidate)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        docs.append({
            "id": f"pyline-{k}",
            "context": "\n".join(lines[i - CONTEXT_LINES : i]),
            "choices": choices,
            "label": choices.index(answer),
            "source": f"{name}:{i + 1}",
        })
    return docs, skipped
