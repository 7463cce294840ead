"""What the two diagnostics of the paper's App. D share: their configuration and the batch of target
training examples they score on a trained checkpoint.

- D.1 (`alphatoken.eval.proxy_oracle`): the Fisher-drift proxy score of each response token against
  its oracle retention-gradient score (the same direct + causal path score with an oracle retention
  set in place of the target-validation batch): correlations, top-rho overlap, figures.
- D.2 (`alphatoken.eval.attention_deviation`): over the causal-window pairs of the scored blocks,
  the attention weight alpha against the normalised value-output deviation d = ||v_t - o_k|| / sqrt(d_h).

The training examples are a seeded draw (`random.Random(seed)` permutation of the training split)
encoded as training encodes them (`encode_chat`, an overlong response truncated at `max_length`);
every truncation and drop is counted.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from alphatoken.data import ChatExample, ExampleDropped, check_choice, check_int, check_number, collate, encode_chat

DTYPES = ("float32", "float64", "bfloat16", "float16")


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Budgets and seeds of the App. D diagnostics (params.yaml `diagnostics:` without `run`)."""

    n_examples: int = 16  # target training examples scored (a seeded draw of the training split)
    max_length: int = 256  # tokens per training example (a longer response is truncated, counted)
    batch_size: int = 2  # examples per forward (bounds memory; the values do not depend on it)
    seed: int = 0  # seed of every draw: training examples, oracle documents, bootstrap, random selections
    dtype: str = "float32"  # weights dtype the checkpoint (and the reference) are loaded in
    oracle_per_task: int = 8  # D.1: oracle retention documents per benchmark (paper: 8 x 4 benchmarks = 32)
    oracle_max_length: int = 512  # D.1: tokens per oracle document (a longer one is skipped, counted)
    n_boot: int = 2000  # D.1: bootstrap resamples of the examples for the correlation intervals
    ci_level: float = 0.95  # D.1: confidence level of those intervals
    random_draws: int = 200  # D.1: seeded random selections whose overlap with the oracle's is the baseline
    risk_levels: tuple = (0.01, 0.05, 0.1)  # D.2: alpha * d levels: dashed contours, fraction of pairs below each
    bins: int = 60  # D.2: histogram bins per axis of the density figure

    def __post_init__(self):
        owner = "DiagnosticsConfig"
        for name, low in (("n_examples", 1), ("max_length", 2), ("batch_size", 1), ("seed", 0),
                          ("oracle_per_task", 1), ("oracle_max_length", 2), ("n_boot", 100),
                          ("random_draws", 1), ("bins", 2)):
            check_int(owner, name, getattr(self, name), low)
        check_choice(owner, "dtype", self.dtype, DTYPES)
        check_number(owner, "ci_level", self.ci_level, 0.0, 1.0, low_open=True, high_open=True)
        if not isinstance(self.risk_levels, (tuple, list)) or not self.risk_levels:
            raise ValueError(f"{owner}.risk_levels: expected a non-empty list of numbers > 0, got {self.risk_levels!r}")
        for i, level in enumerate(self.risk_levels):
            check_number(owner, f"risk_levels[{i}]", level, 0.0, low_open=True)
        object.__setattr__(self, "risk_levels", tuple(sorted(float(v) for v in self.risk_levels)))


@dataclass(frozen=True)
class TrainingDraw:
    """The encoded training examples a diagnostic scores."""

    ids: list  # example ids, in draw order
    features: list  # {"input_ids", "labels"} per example (labels -100 outside the response)
    counts: dict  # reason -> examples: "truncated" (kept, cut at max_length) and the drop reasons (not kept)


def draw_training_examples(examples: list[ChatExample], tokenizer, n: int, max_length: int, seed: int) -> TrainingDraw:
    """The first `n` examples of the `random.Random(seed)` permutation of `examples` that encode to
    at least one response token with `encode_chat(..., overlong="truncate")` (training's encoding).
    Fewer than `n` usable examples is an error naming the drop reasons."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    ids, features, counts = [], [], Counter()
    for i in order:
        example = examples[i]
        try:
            feature = encode_chat(example, tokenizer, max_length, overlong="drop")
        except ExampleDropped as drop:
            if drop.reason != "too_long":
                counts[drop.reason] += 1
                continue
            feature = encode_chat(example, tokenizer, max_length, overlong="truncate")
            counts["truncated"] += 1
        if not any(label != -100 for label in feature["labels"]):
            counts["no_response_token"] += 1
            continue
        ids.append(str(example.id))
        features.append(feature)
        if len(features) == n:
            return TrainingDraw(ids, features, dict(counts))
    raise ValueError(f"only {len(features)} of the {len(examples)} training examples encode to a response token "
                     f"within {max_length} tokens, {n} needed (dropped: {dict(counts)})")


def batches(features: list[dict], batch_size: int, pad_id: int, device) -> list[dict]:
    """Consecutive right-padded batches (`collate`) of `batch_size` features, on `device`."""
    return [{k: v.to(device) for k, v in collate(features[i:i + batch_size], pad_id).items()}
            for i in range(0, len(features), batch_size)]


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
