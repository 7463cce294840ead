"""What an experiment adds to the report: sensitivity sweeps and the value-realisation summary.

- `sweep_rows` / `write_sweeps`: for each swept setting (`report.sweeps`: name -> {run name: swept
  value}), the target gain and the retention drift of every run against the base model (the
  trade-off figure's axes and intervals, `report.tradeoff`) and the relative step time (the run's
  mean optimizer-step seconds over those of `report.time_baseline` with the same seed, from each
  run's `timing.json`), as sweeps.csv and one figure per setting, the swept value on the x-axis;
- `realisation_rows` / `write_realisation`: per method, the value-realisation record
  (`alphatoken.train.realisation`) averaged over the recorded steps and seeds, as realisation.csv and
  a figure of the cumulative predicted vs realised held-out loss change over the steps.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Mapping

from alphatoken.eval import report as report_lib
from alphatoken.train.loop import TIMING
from alphatoken.train.realisation import FIELDS

PROBES = ("val", "heldout")
REALISATION_COLUMNS = tuple(f"{probe}_{field}" for probe in PROBES for field in FIELDS)


def read_timing(run_dir: str | Path) -> float | None:
    """Mean optimizer-step seconds of a train run directory (None when it has no timing.json)."""
    path = Path(run_dir) / TIMING
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())["mean_step_seconds"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a timing record ({err})") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{path}: mean_step_seconds must be a positive number, got {value!r}")
    return float(value)


def relative_time(timing: Mapping[tuple[str, int], float], method: str, baseline: str) -> tuple[float, float, int] | None:
    """(mean, sample std (0 for one seed), n seeds) over seeds of method time / baseline time of the same seed;
    None when no seed has both."""
    ratios = [timing[(method, s)] / timing[(baseline, s)] for (m, s) in timing
              if m == method and (baseline, s) in timing]
    if not ratios:
        return None
    return statistics.fmean(ratios), statistics.stdev(ratios) if len(ratios) > 1 else 0.0, len(ratios)


def sweep_rows(runs: list[dict], sweeps: Mapping[str, Mapping[str, float]], base: str,
               cfg: report_lib.ReportConfig, timing: Mapping[tuple[str, int], float] | None = None,
               time_baseline: str = "full") -> list[dict]:
    """One row per (sweep, run) whose runs exist: {sweep, method, value, target, target_lo, target_hi,
    drift, drift_lo, drift_hi, time, time_std, n_seeds}; target/drift as in the trade-off figure
    (positive target = better than the base model, positive drift = further from it), time as in
    `relative_time` (None without timings). Runs named in a sweep but absent are an error."""
    rows = []
    points = {r["method"]: r for r in report_lib.tradeoff(runs, base, cfg)[0]}  # the trade-off figure's numbers
    present = {r["method"] for r in runs}
    for sweep, values in sweeps.items():
        missing = [m for m in values if m not in present]
        if missing:
            raise ValueError(f"report.sweeps.{sweep}: runs {missing} are not among the methods run")
        for method, value in sorted(values.items(), key=lambda item: item[1]):
            point = points.get(method)
            if point is None:
                raise ValueError(f"report.sweeps.{sweep}: {method} has no {cfg.figure_x} or {cfg.figure_y}")
            rel = relative_time(timing or {}, method, time_baseline)
            rows.append({
                "sweep": sweep, "method": method, "value": value, "n_seeds": point["n_seeds"],
                "target": point["y"], "target_lo": point["y_lo"], "target_hi": point["y_hi"],
                "drift": point["x"], "drift_lo": point["x_lo"], "drift_hi": point["x_hi"],
                "time": rel[0] if rel else None, "time_std": rel[1] if rel else None,
            })
    return rows


def write_sweeps(rows: list[dict], out_dir: str | Path, cfg: report_lib.ReportConfig, time_baseline: str) -> dict[str, Path]:
    """sweeps.csv and sweep_<name>.png (three panels: target gain, retention drift, relative step time)."""
    from alphatoken.eval.figures import sweep_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sweeps_csv": out / "sweeps.csv"}
    fields = ["sweep", "method", "value", "n_seeds", "target", "target_lo", "target_hi", "drift", "drift_lo", "drift_hi",
              "time", "time_std"]
    with open(paths["sweeps_csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        mine = [r for r in rows if r["sweep"] == sweep]
        paths[f"sweep_{sweep}"] = sweep_figure(
            mine, out / f"sweep_{sweep}.png", sweep,
            panels=((f"target gain ({cfg.figure_y}, vs base)", "target"), (f"retention drift ({cfg.figure_x})", "drift"),
                    (f"step time (× {time_baseline})", "time")))
    return paths


def _recorded(rows: list[dict]) -> list[dict]:
    """The history rows of the steps that carry the value-realisation record."""
    return [r for r in rows if all(c in r for c in REALISATION_COLUMNS)]


def realisation_rows(curves: Mapping[str, list[dict]], methods: Mapping[str, str]) -> list[dict]:
    """Per method: the mean over its recorded steps (all seeds pooled) of every realisation column,
    plus `steps` (rows averaged) and the ratio `heldout_realised = sum loss_change / sum sgd_pred`
    (1: the selection's first-order promise is delivered; 0: nothing of it). `curves`: run name ->
    history rows; `methods`: run name -> method."""
    pooled: dict[str, list[dict]] = {}
    for run, rows in curves.items():
        pooled.setdefault(methods[run], []).extend(_recorded(rows))
    out = []
    for method, rows in pooled.items():
        if not rows:
            continue
        row = {"method": method, "steps": len(rows)}
        for column in REALISATION_COLUMNS:
            row[column] = statistics.fmean(r[column] for r in rows)
        for probe in PROBES:
            promised = math.fsum(r[f"{probe}_sgd_pred"] for r in rows)
            row[f"{probe}_realised"] = math.fsum(r[f"{probe}_loss_change"] for r in rows) / promised if promised else None
        out.append(row)
    return out


def write_realisation(rows: list[dict], curves: Mapping[str, list[dict]], methods: Mapping[str, str],
                      out_dir: str | Path) -> dict[str, Path]:
    """realisation.csv and realisation.png (per run: cumulative predicted (SGD, update) and realised
    held-out loss change over the recorded steps)."""
    from alphatoken.eval.figures import realisation_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "realisation.csv"
    fields = ["method", "steps", *REALISATION_COLUMNS, *(f"{p}_realised" for p in PROBES)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    recorded = {run: _recorded(history) for run, history in curves.items()}
    figure = realisation_figure({run: rs for run, rs in recorded.items() if rs}, methods, out / "realisation.png")
    return {"realisation_csv": path, "realisation_png": figure}


def _cell(value: float, lo: float | None, hi: float | None) -> str:
    return f"{value:+.4f}" + (f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None else "")


def markdown(sweeps: list[dict], realisation: list[dict], time_baseline: str) -> str:
    """The experiment's section of comparisons.md: the sweep table and the realisation table."""
    lines = []
    if sweeps:
        lines += ["## Sensitivity", "",
                  f"Target gain and retention drift vs the base model (mean over seeds, interval as in the trade-off "
                  f"figure); step time relative to `{time_baseline}` of the same seed (mean ± std over seeds).", "",
                  "| setting | run | value | target gain | retention drift | step time |", "|---|---|---|---|---|---|"]
        for r in sweeps:
            time = "—" if r["time"] is None else f"{r['time']:.2f}× ± {r['time_std']:.2f}"
            lines.append(f"| {r['sweep']} | {r['method']} | {r['value']:g} | {_cell(r['target'], r['target_lo'], r['target_hi'])} "
                         f"| {_cell(r['drift'], r['drift_lo'], r['drift_hi'])} | {time} |")
        lines.append("")
    if realisation:
        lines += ["## Value realisation", "",
                  "Per method, the mean over recorded steps of the first-order change of the held-out target loss "
                  "that an SGD step on the selected gradient predicts (all weights / scored weights), that the "
                  "optimizer's actual update predicts, and the change that happened (negative = the loss went "
                  "down); cosines of the selected gradient and of the update with the held-out descent direction; "
                  "realised = Σ change / Σ SGD prediction (alphatoken.train.realisation).", "",
                  "| method | steps | SGD pred. | SGD pred. (scored) | update pred. | realised change | cos(ĝ, g) "
                  "| cos(−Δθ, g) | realised / SGD pred. |", "|---|---|---|---|---|---|---|---|---|"]
        for r in realisation:
            ratio = "—" if r["heldout_realised"] is None else f"{r['heldout_realised']:.2f}"
            lines.append(f"| {r['method']} | {r['steps']} | {r['heldout_sgd_pred']:+.2e} | {r['heldout_sgd_pred_scored']:+.2e} "
                         f"| {r['heldout_update_pred']:+.2e} | {r['heldout_loss_change']:+.2e} | {r['heldout_grad_cos']:+.3f} "
                         f"| {r['heldout_update_cos']:+.3f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)
