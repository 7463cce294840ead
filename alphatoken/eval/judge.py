"""Pairwise judges for the preference side of PO evaluation (paper Table 2: AlpacaEval 2, Arena-Hard).

A judge implements `compare(prompt, answer_a, answer_b) -> float`: the probability in [0, 1] that
answer_a is better than answer_b (0.5 = tie). A win rate is the mean of
`compare(prompt, model_answer, baseline_answer)` over prompts, in percent.

AlpacaEval 2 and Arena-Hard v0.1 are defined by their own judge models (GPT-4-Turbo-class models
with fixed judging prompts, and for AlpacaEval 2 a length-controlled correction) and their fixed
baseline answers; their numbers are only comparable to published ones when produced by those
official tools with that judge. On a cluster, configure such a judge (an API endpoint or a locally
served judge model) as a class implementing `Judge`, or run the official `alpaca_eval` /
arena-hard-auto tools on the generated answers. Nothing here calls a network service.

`ReferenceOverlapJudge` is a deterministic local judge for tests and offline smoke runs only:
it prefers the answer whose words overlap more with a reference answer (unigram F1). It is not
a substitute for the benchmarks' judges.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Protocol, runtime_checkable


@runtime_checkable
class Judge(Protocol):
    """Anything that can say how likely answer_a beats answer_b for a prompt."""

    def compare(self, prompt: str, answer_a: str, answer_b: str) -> float:
        """P(answer_a is better than answer_b) in [0, 1]; 0.5 means a tie."""
        ...


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def unigram_f1(candidate: str, reference: str) -> float:
    """F1 of the bag-of-words overlap: 2 * |c ∩ r| / (|c| + |r|) over word multisets (0 if both empty)."""
    c, r = Counter(_words(candidate)), Counter(_words(reference))
    total = sum(c.values()) + sum(r.values())
    return 0.0 if total == 0 else 2 * sum((c & r).values()) / total


class ReferenceOverlapJudge:
    """Deterministic offline judge: compare = 0.5 + (F1(a, ref) - F1(b, ref)) / 2, so compare(a, b)
    + compare(b, a) = 1 and identical answers tie. For tests and smoke runs only."""

    def __init__(self, references: dict[str, str]):
        self.references = dict(references)  # prompt -> reference answer

    def compare(self, prompt: str, answer_a: str, answer_b: str) -> float:
        if prompt not in self.references:
            raise KeyError(f"no reference answer for prompt {prompt[:60]!r}")
        reference = self.references[prompt]
        return 0.5 + (unigram_f1(answer_a, reference) - unigram_f1(answer_b, reference)) / 2


def win_rate(judge: Judge, prompts: list[str], answers: list[str], baseline_answers: list[str]) -> float:
    """Mean of judge.compare(prompt, answer, baseline) over prompts, in percent (ties count half)."""
    if not (len(prompts) == len(answers) == len(baseline_answers)) or not prompts:
        raise ValueError(
            f"need equally many prompts, answers and baseline answers (got {len(prompts)}, "
            f"{len(answers)}, {len(baseline_answers)}), at least one"
        )
    scores = []
    for i, (prompt, answer, baseline) in enumerate(zip(prompts, answers, baseline_answers)):
        score = float(judge.compare(prompt, answer, baseline))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"judge returned {score} for prompt {i}; expected a probability in [0, 1]")
        scores.append(score)
    return 100.0 * sum(scores) / len(scores)
