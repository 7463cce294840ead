"""Stage report: the paper-style table (mean ± sample std over seeds per method, the base model as the
first row), paired comparisons of every method against the baselines (`full`, `random`) with
bootstrap intervals over seeds and examples, the trade-off figure (target gain vs retention drift,
vs the base model), the training curves (CSV per run and one PNG) and a flat metrics JSON for
`dvc metrics` (`alphatoken.eval.report.build_report`). Each evaluation directory holds metrics.json
and, when the evaluation wrote one, per_example.jsonl (the paired comparisons use it).

    python -m alphatoken.stages.report --params params.yaml --section report --runs-section train \
        --base results/eval/base --evals results/eval/runs --train results/train --out results/report
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from alphatoken.eval.experiments import REALISATION_COLUMNS, read_timing
from alphatoken.eval.report import ReportConfig, build_report, read_run
from alphatoken.stages.common import ParamsError, fail, log_run_environment, read_section, stage_parser, to_config

CURVES = ("loss", "kept_fraction")  # dvclive metrics train/<name> plotted per run


def read_curves(live_dir: Path) -> list[dict]:
    """{step, loss, kept_fraction} rows from a run's dvclive TSVs (plots/metrics/train/<name>.tsv),
    with the value-realisation columns of the steps that recorded them (train.realisation_every)."""
    rows: dict[int, dict] = {}
    recorded = [name for name in REALISATION_COLUMNS if (live_dir / "plots" / "metrics" / "train" / f"{name}.tsv").is_file()]
    if recorded and len(recorded) != len(REALISATION_COLUMNS):
        fail(f"{live_dir}: {len(recorded)} of the {len(REALISATION_COLUMNS)} value-realisation columns were logged "
             f"(missing: {sorted(set(REALISATION_COLUMNS) - set(recorded))}); rerun the train rule")
    for name in (*CURVES, *recorded):
        path = live_dir / "plots" / "metrics" / "train" / f"{name}.tsv"
        if not path.is_file():
            fail(f"{path} is missing: the train rule did not log {name!r}; rerun it")
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                rows.setdefault(int(row["step"]), {"step": int(row["step"])})[name] = float(row[name])
    return [rows[s] for s in sorted(rows)]


def _seed(text: str) -> int:
    if not text.isdigit():
        fail(f"--extra-run: seed {text!r} is not a non-negative integer")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs-section", required=True, help="section with the `methods` and `seeds` lists")
    for flag in ("--base", "--evals", "--train", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--base-name", default="base", help="row name of the reference model in the table")
    parser.add_argument("--extra-run", nargs=4, action="append", default=[], metavar=("METHOD", "SEED", "EVAL", "RUN"),
                        help="a run outside the runs section's matrix (a merge of trained weights, a training on a "
                             "selected subset): its row name, seed, evaluation directory and run directory (`-` "
                             "when it has no training curves or timing); repeat per run")
    args = parser.parse_args(argv)
    try:
        section = read_section(args.params, args.section)
        runs_section = read_section(args.params, args.runs_section)
        methods, seeds = runs_section.values.get("methods"), runs_section.values.get("seeds")
        if not isinstance(methods, list) or not isinstance(seeds, list) or not methods or not seeds:
            raise ParamsError(f"{runs_section.locate('methods')}: {args.runs_section}.methods and .seeds must be non-empty lists")
        # YAML lists and mappings -> the config's tuples (patterns, baselines; units as pairs)
        values = {k: tuple(v) if isinstance(v, list) else tuple(v.items()) if isinstance(v, dict) else v
                  for k, v in section.values.items()}
        if "pairs" in section.values:  # [[method, baseline], ...]
            values["pairs"] = tuple(tuple(p) if isinstance(p, list) else p for p in section.values["pairs"] or [])
        if "sweeps" in section.values:  # {setting: {run: value}}
            values["sweeps"] = tuple((k, tuple((v or {}).items())) for k, v in (section.values["sweeps"] or {}).items())
        cfg = to_config(dataclasses.replace(section, values=values), ReportConfig)
    except ParamsError as err:
        fail(str(err))
    log_run_environment("report", "cpu")
    if not (Path(args.base) / "metrics.json").is_file():
        fail(f"{Path(args.base) / 'metrics.json'} is missing: rerun the evaluate_base rule")
    try:
        runs = [{"method": args.base_name, "seed": 0, **read_run(args.base)}]
        curves, timing = {}, {}
        matrix = [(m, s, Path(args.evals) / f"{m}-{s}", Path(args.train) / f"{m}-{s}") for m in methods for s in seeds]
        extra = [(m, _seed(s), Path(e), None if r == "-" else Path(r)) for m, s, e, r in args.extra_run]
        clash = {(m, s) for m, s, _, _ in matrix} & {(m, s) for m, s, _, _ in extra}
        if clash:
            fail(f"--extra-run {sorted(clash)} repeat runs of {args.runs_section}.methods x seeds: give them another name")
        for method, seed, eval_dir, run_dir in matrix + extra:
            run = f"{method}-{seed}"
            if not (eval_dir / "metrics.json").is_file():
                fail(f"{eval_dir / 'metrics.json'} is missing for run {run}: rerun its evaluate rule")
            runs.append({"method": method, "seed": seed, **read_run(eval_dir)})
            if run_dir is not None:
                curves[run] = read_curves(run_dir / "dvclive")
                seconds = read_timing(run_dir)
                if seconds is not None:
                    timing[(method, seed)] = seconds
        paths = build_report(runs, args.out, cfg, base=args.base_name, curves=curves, timing=timing)
    except ValueError as err:
        fail(str(err))
    print(f"[report] {len(runs)} runs -> " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
