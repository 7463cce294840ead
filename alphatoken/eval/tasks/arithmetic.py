"""Arithmetic word problems from templates, drawn with a seeded RNG: the offline stand-in for GSM8K.

Each document is {question, answer, value} with `answer` in GSM8K's format: a short worked solution
ending in `#### <value>`, so the same 5-shot prompt and "####" answer extraction apply.
"""

from __future__ import annotations

import random

NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Lars")
ITEMS = ("apples", "marbles", "pencils", "stickers", "books", "cookies", "stamps", "shells", "coins", "cards")


def _problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        question = f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?"
        value, work = a + b, f"{a} + {b} = {a + b}"
    elif kind == 1:
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {item} and gives {b} of them away. How many {item} are left?"
        value, work = a - b, f"{a} - {b} = {a - b}"
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        question = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?"
        value, work = a * b, f"{a} * {b} = {a * b}"
    elif kind == 3:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        question = f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?"
        value, work = q, f"{b * q} / {b} = {q}"
    else:
        a, b, c = rng.randint(1, 30), rng.randint(2, 6), rng.randint(2, 10)
        question = (f"{name} has {a} {item} and buys {b} packs of {c} {item}. "
                    f"How many {item} does {name} have in total?")
        value, work = a + b * c, f"{b} * {c} = {b * c}, and {a} + {b * c} = {a + b * c}"
    return {"question": question, "answer": f"{work}. #### {value}", "value": value}


def word_problems(n: int, seed: int, exclude: set[str] = frozenset()) -> tuple[list[dict], int]:
    """`n` distinct problems not in `exclude` (questions), and how many duplicates were skipped."""
    rng = random.Random(seed)
    docs, seen, skipped = [], set(exclude), 0
    while len(docs) < n:
        problem = _problem(rng)
        if problem["question"] in seen:
            skipped += 1
            if skipped > 100 * (n + 10):
                raise ValueError(f"cannot draw {n} distinct arithmetic problems")
            continue
        seen.add(problem["question"])
        docs.append({"id": f"arith-{seed}-{len(docs)}", **problem})
    return docs, skipped
