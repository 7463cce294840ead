"""Statistics over seeds and examples: mean ± std over seeds, and paired differences between two
methods with a seeded two-level bootstrap confidence interval.

Notation: a method was trained with seeds s = 1..k; the evaluation of seed s scored examples
i = 1..n_s (the same example ids for every method, so A and B pair up by id). For a comparison of
method A with baseline B on one metric, d_si = A_si - B_si is the paired difference of seed s
(same seed, hence same data order) on example i.

- Spread over seeds (`seed_summary`): the sample standard deviation (ddof = 1),
  std = sqrt(sum_s (x_s - mean)^2 / (k - 1)), an unbiased variance estimate of one seed's result;
  undefined (None) for a single seed. The population std (divisor k) would shrink it by
  sqrt((k-1)/k), i.e. by 18% at k = 3.
- Paired difference (`paired_difference`): theta = (1/k) sum_s (1/n_s) sum_i d_si, the mean over
  seeds of the mean over examples.
- Its confidence interval: a percentile bootstrap with B resamples (`hierarchical_bootstrap`):
  each replicate draws k seeds with replacement, then, for each drawn seed independently (a seed
  drawn twice gets two independent draws), n_s examples with replacement within it; resampling
  the differences d_si applies the same example draw to A and to B, which keeps the pairing. The
  replicate is theta* = (1/k) sum over the drawn seeds of the mean of their drawn d; the interval
  is the (alpha/2, 1 - alpha/2) quantiles (linear interpolation, as numpy's and
  `scipy.stats.bootstrap`'s percentile method) of the B replicates, alpha = 1 - level.
  With one seed only examples are resampled (then it is exactly `scipy.stats.bootstrap` with
  `paired=True, method="percentile"` fed the same generator). Without per-example values only
  seeds are resampled (`seed_bootstrap`); with one seed and no per-example values there is no
  interval (None), and none is invented.
- `resolved`: the interval excludes 0.

Coverage of a zero true difference by the 95% interval, measured on synthetic normal data
(`python -m pytest tests/test_eval_stats.py -k coverage`): examples only, 50 examples: 94.7% of 300
data sets; seeds and examples, 5 seeds x 30 examples, seed-to-seed sd 0.1 x the example sd: 97.5%
of 200 (resampling both levels counts the example noise twice when seeds differ little: the
interval is conservative then; it is too narrow when few seeds differ a lot); seeds only, 3 seeds:
76.7% of 300 -- a seeds-only interval from a handful of seeds is too narrow and "resolves" too often.

Random draws (numpy Generator, in this order, so that a test can replay them): the seed draw
`rng.integers(0, k, (B, k))` (skipped when k = 1), then for s = 0..k-1 the example draws of every
(replicate, position) that drew seed s, in row-major order, `rng.integers(0, n_s, (count, n_s))`
(produced in chunks, which yields the same stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

N_BOOT = 2000  # default bootstrap resamples
LEVEL = 0.95  # default confidence level
SEED = 0  # default seed of the bootstrap's generator
_CHUNK = 1 << 21  # example indices drawn at once (bounds memory for large evaluations)

SEEDS_AND_EXAMPLES = "seeds and examples"
EXAMPLES_ONLY = "examples only (one seed)"
SEEDS_ONLY = "seeds only (no per-example values)"
NO_INTERVAL = "none (one seed, no per-example values)"


@dataclass(frozen=True)
class SeedSummary:
    """A metric of one method over its seeds."""

    mean: float  # (1/k) sum_s x_s
    std: float | None  # sample std (ddof = 1); None for a single seed
    n: int  # k, the seeds that have the metric


def seed_summary(values: Sequence[float]) -> SeedSummary:
    """mean = (1/k) sum_s x_s and std = sqrt(sum_s (x_s - mean)^2 / (k - 1)) (ddof = 1; None when
    k = 1) of a non-empty list of per-seed values."""
    x = np.asarray(values, dtype=np.float64)  # [k]
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"seed_summary needs a non-empty list of numbers, got {values!r}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"seed_summary: non-finite value in {values!r}")
    std = float(np.std(x, ddof=1)) if x.size > 1 else None
    return SeedSummary(mean=float(np.mean(x)), std=std, n=int(x.size))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """(q(alpha/2), q(1 - alpha/2)) of the bootstrap replicates [B], alpha = 1 - level, q the
    linearly interpolated quantile (numpy's default, scipy.stats.bootstrap's "percentile")."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    alpha = 1.0 - level
    lo, hi = np.quantile(np.asarray(replicates, dtype=np.float64), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def seed_bootstrap(diffs: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates theta*_r = (1/k) sum_j d[J_rj], J_rj ~ U{0..k-1} with replacement, of the
    per-seed differences d [k]. Returns [B]."""
    d = np.asarray(diffs, dtype=np.float64)  # [k]
    picks = rng.integers(0, d.size, (n_boot, d.size))  # [B, k]
    return d[picks].mean(axis=1)  # [B]


def hierarchical_bootstrap(diffs: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Replicates of theta = (1/k) sum_s mean_i d_si resampling seeds, then examples within each drawn
    seed (module docstring: the order of the draws). diffs: k arrays d_s [n_s]. Returns [B].

    With k = 1 no seed is drawn: theta*_r = mean_i d[I_ri], I_r ~ U{0..n-1}^n, the examples-only
    bootstrap."""
    d = [np.asarray(x, dtype=np.float64) for x in diffs]  # k x [n_s]
    k = len(d)
    if k == 0 or any(x.ndim != 1 or x.size == 0 for x in d):
        raise ValueError("hierarchical_bootstrap needs at least one seed with at least one example")
    seeds = np.zeros((n_boot, 1), dtype=np.int64) if k == 1 else rng.integers(0, k, (n_boot, k))  # [B, k]
    seed_means = np.empty(seeds.shape, dtype=np.float64)  # [B, k] mean of the drawn examples per position
    for s, ds in enumerate(d):
        where = np.flatnonzero(seeds == s)  # row-major positions (replicate, slot) that drew seed s
        rows = max(1, _CHUNK // ds.size)
        means = np.empty(where.size, dtype=np.float64)
        for start in range(0, where.size, rows):
            count = min(rows, where.size - start)
            idx = rng.integers(0, ds.size, (count, ds.size))  # [count, n_s]
            means[start:start + count] = ds[idx].mean(axis=1)
        seed_means.flat[where] = means
    return seed_means.mean(axis=1)  # [B]


@dataclass(frozen=True)
class PairedDifference:
    """Method A minus baseline B on one metric, paired by seed and example."""

    diff: float  # theta = mean over seeds of mean over examples of (A - B)
    lo: float | None  # lower end of the percentile interval (None: no interval)
    hi: float | None  # upper end
    level: float  # confidence level of [lo, hi]
    n_seeds: int  # paired seeds k
    n_examples: tuple[int, ...]  # paired examples per seed (empty without per-example values)
    resampling: str  # SEEDS_AND_EXAMPLES, EXAMPLES_ONLY, SEEDS_ONLY or NO_INTERVAL

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (False when there is no interval)."""
        return self.lo is not None and (self.lo > 0.0 or self.hi < 0.0)


def align_examples(a: Mapping[str, float], b: Mapping[str, float], metric: str, run: str) -> tuple[np.ndarray, np.ndarray]:
    """The values of A and B in the same (sorted) id order, [n] each; A and B must hold the same
    ids, else the error names the metric, the run and how many ids each side lacks."""
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if only_a or only_b:
        example = sorted(only_a or only_b)[0]
        raise ValueError(f"metric {metric!r}, run {run}: the example sets differ: {len(only_a)} id(s) missing "
                         f"from the baseline, {len(only_b)} missing from the method (e.g. {example!r})")
    ids = sorted(a)
    return np.array([a[i] for i in ids], dtype=np.float64), np.array([b[i] for i in ids], dtype=np.float64)


def paired_difference(a: Sequence[float | Mapping[str, float]], b: Sequence[float | Mapping[str, float]], *,
                      metric: str = "", runs: Sequence[str] = (), n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = SEED, rng: np.random.Generator | None = None) -> PairedDifference:
    """A - B on one metric: a[s] and b[s] are seed s of each method (the pair), either both
    {example id: value} (the paired examples) or both the run's scalar metric, the same kind for
    every seed. theta = (1/k) sum_s (1/n_s) sum_i (a_si - b_si) (scalars: n_s = 1); the interval is
    the percentile bootstrap of the module docstring at `level` with `n_boot` resamples drawn from
    `rng` (default: `np.random.default_rng(seed)`). `runs` names each pair in error messages."""
    if len(a) != len(b) or not a:
        raise ValueError(f"metric {metric!r}: need the same number (> 0) of runs of A and B, got {len(a)} and {len(b)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    names = list(runs) or [f"pair {s}" for s in range(len(a))]
    rng = np.random.default_rng(seed) if rng is None else rng
    per_example = [isinstance(x, Mapping) for x in (*a, *b)]
    if all(per_example):
        pairs = [align_examples(x, y, metric, name) for x, y, name in zip(a, b, names)]
        diffs = [x - y for x, y in pairs]  # k x [n_s]
        for d, name in zip(diffs, names):
            if d.size == 0 or not np.all(np.isfinite(d)):
                raise ValueError(f"metric {metric!r}, run {name}: no examples or a non-finite value")
        theta = float(np.mean([d.mean() for d in diffs]))
        counts = tuple(int(d.size) for d in diffs)
        if len(diffs) == 1 and diffs[0].size < 2:
            return PairedDifference(theta, None, None, level, 1, counts, NO_INTERVAL)
        lo, hi = percentile_interval(hierarchical_bootstrap(diffs, n_boot, rng), level)
        return PairedDifference(theta, lo, hi, level, len(diffs), counts,
                                EXAMPLES_ONLY if len(diffs) == 1 else SEEDS_AND_EXAMPLES)
    if any(per_example):
        raise ValueError(f"metric {metric!r}: mix of per-example values and scalars; pass one kind for every run")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # [k]
    if not np.all(np.isfinite(d)):
        raise ValueError(f"metric {metric!r}: non-finite value among the runs {names}")
    theta = float(d.mean())
    if d.size == 1:
        return PairedDifference(theta, None, None, level, 1, (), NO_INTERVAL)
    lo, hi = percentile_interval(seed_bootstrap(d, n_boot, rng), level)
    return PairedDifference(theta, lo, hi, level, int(d.size), (), SEEDS_ONLY)


def verdict(diff: float, higher_is_better: bool | None) -> str | None:
    """"better" / "worse" for the sign of A - B under the metric's direction, "no change" for 0,
    None when the direction is unknown."""
    if higher_is_better is None:
        return None
    if diff == 0.0:
        return "no change"
    return "better" if (diff > 0) == higher_is_better else "worse"
