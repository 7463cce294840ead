"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state):

- `tradeoff_figure`: target gain (y) against retention drift (x), one labelled point per method
  with error bars, as PNG and SVG;
- `training_curves_figure`: training loss and kept-token ratio per optimizer step, one line per
  run (colour = method, line style = seed), as PNG.

What the numbers are (differences to the base model, which interval the bars show) is decided by
`alphatoken.eval.report.tradeoff`; here they are only drawn. The outputs are byte-stable for the
same input (no dates in the metadata, a fixed SVG id salt), so DVC sees no change on a rerun.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

_STYLES = ("-", "--", ":", "-.")  # line style per seed of a method
_SVG_SALT = "alphatoken"


@dataclass(frozen=True)
class TradeoffPoint:
    """One method on the trade-off figure."""

    label: str  # the method
    x: float  # retention drift (positive = worse than the base model)
    y: float  # target gain (positive = better than the base model)
    x_interval: tuple[float, float] | None  # (lo, hi) of the x error bar; None: no bar
    y_interval: tuple[float, float] | None  # (lo, hi) of the y error bar


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path, fmt: str) -> Path:
    import matplotlib

    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": _SVG_SALT}):
        fig.savefig(path, format=fmt, metadata=metadata, bbox_inches="tight", pad_inches=0.15)
    return path


def _bar(value: float, interval: tuple[float, float] | None):
    """matplotlib's asymmetric error [[below], [above]] for one point (None: no bar)."""
    if interval is None:
        return None
    lo, hi = interval
    return [[max(0.0, value - lo)], [max(0.0, hi - value)]]


def tradeoff_figure(points: Sequence[TradeoffPoint], stem: str | Path, *, x_label: str, y_label: str,
                    title: str, caption: str) -> dict[str, Path]:
    """Draw `points` (each a marker with its label and error bars; dashed lines at x = 0 and y = 0,
    the base model) and write `<stem>.png` and `<stem>.svg`; `caption` is printed under the axes.
    Each point's marker has the SVG id `point-<i>`. Returns {"png", "svg"}."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure((7.5, 6.0))
    ax = fig.add_subplot()
    ax.axhline(0.0, color="0.6", linestyle="--", linewidth=0.8)
    ax.axvline(0.0, color="0.6", linestyle="--", linewidth=0.8)
    colours = [f"C{i % 10}" for i in range(len(points))]
    for i, (p, colour) in enumerate(zip(points, colours)):
        bars = ax.errorbar([p.x], [p.y], xerr=_bar(p.x, p.x_interval), yerr=_bar(p.y, p.y_interval), fmt="o",
                           color=colour, markersize=7, capsize=4, elinewidth=1.2, label=p.label)
        bars.lines[0].set_gid(f"point-{i}")  # the marker (not its bars), findable in the SVG
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(7, 7), fontsize=10, color=colour)
    ax.set_xlabel(x_label + "  →  more drift")
    ax.set_ylabel(y_label + "  →  more gain")
    ax.set_title(title)
    ax.grid(True, linewidth=0.4, alpha=0.5)
    if points:
        ax.legend(loc="best", fontsize=9, title="method")
    ax.margins(0.15)
    fig.text(0.0, -0.01, textwrap.fill(caption, 120), fontsize=7.5, ha="left", va="top")  # below the axes; the
    # saved area grows to hold it (bbox_inches="tight")
    return {fmt: _save(fig, stem.with_suffix(f".{fmt}"), fmt) for fmt in ("png", "svg")}


CURVE_AXES = (("loss", "training loss (SFT: nats per kept token; DPO: per pair)"),
              ("kept_fraction", "kept-token fraction"))  # (column, axis label) of the training-curve panels


def training_curves_figure(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                           metrics: Sequence[tuple[str, str]] = CURVE_AXES, title: str = "Training curves per run") -> Path:
    """One panel per (column, axis label) of `metrics`, one line per run of `curves` ({run name
    `<method>-<seed>`: [{step, column: value}]}) against the optimizer step; colour by method, line
    style by seed. Writes the PNG `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(run.rpartition("-")[0] or run for run in curves))
    seeds: dict[str, list[str]] = {}
    fig = _figure((6.0 * len(metrics), 4.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (column, label) in zip(axes, metrics):
        for run, rows in curves.items():
            method = run.rpartition("-")[0] or run
            style = seeds.setdefault(method, [])
            if run not in style:
                style.append(run)
            points = [(r["step"], r[column]) for r in rows if column in r]
            ax.plot([s for s, _ in points], [v for _, v in points], color=f"C{methods.index(method) % 10}",
                    linestyle=_STYLES[style.index(run) % len(_STYLES)], linewidth=1.3, label=run)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(True, linewidth=0.4, alpha=0.5)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="run (method-seed)")
    fig.suptitle(title)
    return _save(fig, path, "png")


def sweep_figure(rows: Sequence[Mapping], path: str | Path, setting: str,
                 panels: Sequence[tuple[str, str]]) -> Path:
    """One panel per (axis label, column) of `panels` against the swept value of `setting`, one point
    per row (`value`, `column`, and `column_lo`/`column_hi` error bars, or `column_std` as ± bars),
    joined in order of the value. Rows lacking a column are left out of that panel. Writes the PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure((4.6 * len(panels), 4.0))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, column) in zip(axes, panels):
        points = sorted((r for r in rows if r.get(column) is not None), key=lambda r: r["value"])
        xs, ys = [r["value"] for r in points], [r[column] for r in points]
        below, above = [], []
        for r in points:
            lo, hi = r.get(f"{column}_lo"), r.get(f"{column}_hi")
            if lo is None and r.get(f"{column}_std") is not None:
                lo, hi = r[column] - r[f"{column}_std"], r[column] + r[f"{column}_std"]
            below.append(0.0 if lo is None else max(0.0, r[column] - lo))
            above.append(0.0 if hi is None else max(0.0, hi - r[column]))
        ax.errorbar(xs, ys, yerr=[below, above], fmt="o-", color="C0", capsize=4, linewidth=1.2)
        for r in points:
            ax.annotate(r["method"], (r["value"], r[column]), textcoords="offset points", xytext=(4, 5), fontsize=7)
        if column != "time":
            ax.axhline(0.0, color="0.6", linestyle="--", linewidth=0.8)
        ax.set_xlabel(setting)
        ax.set_ylabel(label)
        ax.grid(True, linewidth=0.4, alpha=0.5)
    fig.suptitle(f"Sensitivity to {setting}")
    return _save(fig, path, "png")


def realisation_figure(curves: Mapping[str, Sequence[Mapping[str, float]]], methods: Mapping[str, str],
                       path: str | Path) -> Path:
    """Per run, the cumulative sum over its recorded steps of the held-out loss change predicted by
    an SGD step on the selected gradient (dotted), by the actual update (dashed) and realised (solid),
    one colour per method; and the same for the validation batch. Writes the PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(methods[run] for run in curves))
    fig = _figure((12.0, 4.5))
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, probe in zip(axes, ("heldout", "val")):
        for run, rows in curves.items():
            colour = f"C{order.index(methods[run]) % 10}"
            steps = [r["step"] for r in rows]
            for column, style in (("sgd_pred", ":"), ("update_pred", "--"), ("loss_change", "-")):
                total, cumulative = 0.0, []
                for r in rows:
                    total += r[f"{probe}_{column}"]
                    cumulative.append(total)
                ax.plot(steps, cumulative, color=colour, linestyle=style, linewidth=1.2,
                        label=f"{run} {column}" if column == "loss_change" else None)
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"cumulative {probe} loss change (nats/token)")
        ax.set_title(f"{probe}: SGD prediction (dotted), update prediction (dashed), realised (solid)", fontsize=9)
        ax.grid(True, linewidth=0.4, alpha=0.5)
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, title="run")
    return _save(fig, path, "png")
