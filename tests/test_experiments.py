"""Experiments: named run variants (resolved by the stage and by the rules, rerunning only their own
runs), the report's sensitivity sweeps and value-realisation summary (against hand-computed twins),
and the experiment overlays' declarations."""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from alphatoken.eval import experiments
from alphatoken.eval.report import ReportConfig, build_report
from alphatoken.merge import row_name
from alphatoken.stages import train as train_stage
from alphatoken.stages.common import ParamsError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


def overlay(tmp_path, text: str) -> Path:
    path = tmp_path / "overlay.yaml"
    path.write_text(text)
    return path


VARIANTS = """train:
  methods: [alphatoken, alphatoken_w8, random_sgd]
  variants:
    alphatoken_w8: {policy: alphatoken, rho: 0.25, valuation: {window: 8, lam: 0.5}}
    random_sgd: {policy: random, optimizer: sgd, lr: 0.1, trainable: scored, realisation_every: 2}
"""


def test_a_variant_is_its_policy_with_its_own_settings(tmp_path):
    files = [PARAMS, overlay(tmp_path, VARIANTS)]
    _, base = train_stage.read_train_config(files, "train", "valuation", "alphatoken", 0, "out")
    _, w8 = train_stage.read_train_config(files, "train", "valuation", "alphatoken_w8", 0, "out")
    assert w8.policy.name == "alphatoken" and w8.policy.rho == 0.25 and base.policy.rho == 0.5
    assert (w8.valuation.window, w8.valuation.lam) == (8, 0.5)
    assert (base.valuation.window, base.valuation.lam) == (32, 1.5)
    assert w8.lr == base.lr and w8.max_steps == base.max_steps  # everything else is the section's
    _, sgd = train_stage.read_train_config(files, "train", "valuation", "random_sgd", 0, "out")
    assert (sgd.policy.name, sgd.optimizer, sgd.lr, sgd.trainable, sgd.realisation_every) == ("random", "sgd", 0.1, "scored", 2)


def test_variant_errors_name_file_line_and_field(tmp_path):
    files = [PARAMS, overlay(tmp_path, VARIANTS)]
    with pytest.raises(ParamsError, match=r"overlay.yaml:\d+: train.methods: 'nothing' is neither a token policy"):
        train_stage.read_train_config(files, "train", "valuation", "nothing", 0, "out")
    bad = overlay(tmp_path, "train:\n  variants:\n    fast: {policy: alphatoken, valuation: {window: -1}}\n")
    with pytest.raises(ParamsError, match=r"overlay.yaml:3: train.variants.fast.valuation.window: expected an integer >= 0"):
        train_stage.read_train_config([PARAMS, bad], "train", "valuation", "fast", 0, "out")
    bad = overlay(tmp_path, "train:\n  variants:\n    fast: {policy: nopolicy}\n")
    with pytest.raises(ParamsError, match=r"overlay.yaml:3: train.variants.fast.policy: 'nopolicy' is not a token policy"):
        train_stage.read_train_config([PARAMS, bad], "train", "valuation", "fast", 0, "out")
    bad = overlay(tmp_path, "train:\n  variants:\n    random: {policy: alphatoken}\n")
    with pytest.raises(ParamsError, match="is a token policy's name"):
        train_stage.read_train_config([PARAMS, bad], "train", "valuation", "random", 0, "out")
    bad = overlay(tmp_path, "train:\n  variants:\n    fast: {rho: 0.3}\n")
    with pytest.raises(ParamsError, match=r"train.variants.fast: missing required field\(s\) \['policy'\]"):
        train_stage.read_train_config([PARAMS, bad], "train", "valuation", "fast", 0, "out")
    bad = overlay(tmp_path, "train:\n  variants:\n    fast: {policy: alphatoken, rho: 0.3, seeds: [1]}\n")
    with pytest.raises(ParamsError, match=r"overlay.yaml:3: train.variants.fast.seeds: unknown field"):
        train_stage.read_train_config([PARAMS, bad], "train", "valuation", "fast", 0, "out")


# ---------------------------------------------------------------------------------------------
# the report's sweeps and value realisation


def _run(method, seed, values, base_shift=0.0):
    examples = {str(i): v for i, v in enumerate(values)}
    mean = math.fsum(values) / len(values)
    return {"method": method, "seed": seed, "metrics": {"target NLL": mean, "retention KL": base_shift + mean / 10},
            "examples": {"target NLL": examples, "retention KL": {k: base_shift + v / 10 for k, v in examples.items()}}}


def test_sweep_rows_are_the_paired_differences_to_the_base_and_the_step_time_ratios(tmp_path):
    base = {"method": "base", "seed": 0, "metrics": {"target NLL": 2.0}, "examples": {"target NLL": {"0": 2.0, "1": 2.0, "2": 2.0}}}
    runs = [base]
    nll = {"a_lo": [1.9, 1.8, 1.95], "a_mid": [1.7, 1.75, 1.8], "full": [1.6, 1.7, 1.65]}
    for method, values in nll.items():
        for seed in (0, 1):
            runs.append(_run(method, seed, [v + 0.01 * seed for v in values]))
    timing = {("a_lo", 0): 3.0, ("a_lo", 1): 3.3, ("a_mid", 0): 4.0, ("a_mid", 1): 4.0, ("full", 0): 2.0, ("full", 1): 2.2}
    cfg = ReportConfig(sweeps={"knob": {"a_mid": 2.0, "a_lo": 1.0}}, baselines=(), figure_x="retention KL", figure_y="target NLL")
    rows = experiments.sweep_rows(runs, cfg.sweeps_dict(), "base", cfg, timing, "full")
    assert [r["method"] for r in rows] == ["a_lo", "a_mid"]  # in order of the swept value
    for r in rows:
        # target gain = base - method, averaged over seeds and examples; drift = the KL itself (no base value)
        per_seed = [statistics.fmean(2.0 - (v + 0.01 * s) for v in nll[r["method"]]) for s in (0, 1)]
        assert r["target"] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
        assert r["target_lo"] <= r["target"] <= r["target_hi"]
        kl = [statistics.fmean((v + 0.01 * s) / 10 for v in nll[r["method"]]) for s in (0, 1)]
        assert r["drift"] == pytest.approx(statistics.fmean(kl), abs=1e-12)
        ratios = [timing[(r["method"], s)] / timing[("full", s)] for s in (0, 1)]
        assert r["time"] == pytest.approx(statistics.fmean(ratios)) and r["time_std"] == pytest.approx(statistics.stdev(ratios))
    with pytest.raises(ValueError, match=r"report.sweeps.knob: runs \['gone'\] are not among the methods run"):
        experiments.sweep_rows(runs, {"knob": {"gone": 1.0}}, "base", cfg, timing, "full")
    paths = build_report(runs, tmp_path, cfg, base="base", timing=timing)
    assert paths["sweep_knob"].stat().st_size > 0
    assert [r["method"] for r in csv.DictReader(open(paths["sweeps_csv"]))] == ["a_lo", "a_mid"]
    assert "## Sensitivity" in (tmp_path / "comparisons.md").read_text()


def _history(steps, probe_values):
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 1.0, "kept_fraction": 0.5}
        for probe in experiments.PROBES:
            for field in experiments.FIELDS:
                row[f"{probe}_{field}"] = probe_values(probe, field, step)
        rows.append(row)
    return rows


def test_realisation_rows_average_the_recorded_steps_and_give_the_realised_share():
    curves = {
        "x-0": _history(3, lambda p, f, s: -0.01 * s if f == "sgd_pred" else -0.002 * s if f == "loss_change" else 0.1 * s),
        "x-1": _history(2, lambda p, f, s: -0.02 * s if f == "sgd_pred" else 0.001 if f == "loss_change" else 0.2),
        "y-0": [{"step": 1, "loss": 1.0, "kept_fraction": 1.0}],  # not recorded: left out
    }
    rows = experiments.realisation_rows(curves, {"x-0": "x", "x-1": "x", "y-0": "y"})
    assert [r["method"] for r in rows] == ["x"]
    (row,) = rows
    assert row["steps"] == 5
    sgd = [-0.01, -0.02, -0.03, -0.02, -0.04]
    change = [-0.002, -0.004, -0.006, 0.001, 0.001]
    assert row["heldout_sgd_pred"] == pytest.approx(statistics.fmean(sgd))
    assert row["heldout_loss_change"] == pytest.approx(statistics.fmean(change))
    assert row["heldout_realised"] == pytest.approx(sum(change) / sum(sgd))
    assert row["val_grad_cos"] == pytest.approx(statistics.fmean([0.1, 0.2, 0.3, 0.2, 0.2]))


def test_report_writes_curves_whose_later_steps_carry_the_realisation_columns(tmp_path):
    """The record starts at step n (realisation_every): the curves CSV has every column, empty where a
    step has no record, and the realisation summary reads the recorded steps."""
    base = {"method": "base", "seed": 0, "metrics": {"target NLL": 2.0}, "examples": {"target NLL": {"0": 2.0, "1": 2.0}}}
    runs = [base, _run("a_x", 0, [1.0, 1.2])]
    curves = {"a_x-0": [{"step": 1, "loss": 1.0, "kept_fraction": 0.5}] + _history(2, lambda p, f, s: 0.1)[1:]}
    paths = build_report(runs, tmp_path, ReportConfig(baselines=(), figure_x="retention KL", figure_y="target NLL"),
                         base="base", curves=curves)
    rows = list(csv.DictReader(open(tmp_path / "curves" / "a_x-0.csv")))
    assert rows[0]["heldout_sgd_pred"] == "" and float(rows[1]["heldout_sgd_pred"]) == 0.1
    assert [r["steps"] for r in csv.DictReader(open(paths["realisation_csv"]))] == ["1"]


def test_report_pairs_are_compared_and_unknown_pairs_refused(tmp_path):
    base = {"method": "base", "seed": 0, "metrics": {"target NLL": 2.0}, "examples": {"target NLL": {"0": 2.0, "1": 2.0}}}
    runs = [base, _run("a_x", 0, [1.0, 1.2]), _run("r_x", 0, [1.1, 1.4])]
    build_report(runs, tmp_path, ReportConfig(baselines=(), pairs=(("a_x", "r_x"),), figure_x="retention KL", figure_y="target NLL"), base="base")
    text = (tmp_path / "comparisons.md").read_text()
    assert re.search(r"^\| a_x \| target NLL ↓ \| \*\*−0\.1500", text.split("### Against r_x", 1)[1], re.M)
    with pytest.raises(ValueError, match="report.pairs: a_x vs nobody: not among the methods run"):
        build_report(runs, tmp_path, ReportConfig(baselines=(), pairs=(("a_x", "nobody"),), figure_x="retention KL", figure_y="target NLL"), base="base")


# ---------------------------------------------------------------------------------------------
# the experiment overlays


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_overlay_opens_with_its_commands_and_builds_every_run(path):
    """Each overlay opens with the Snakemake and the DVC command that run it, names its experiment
    after its file, and every run it lists is a policy or one of its variants whose TrainConfig builds;
    its sweeps and pairs name only runs it lists."""
    text = path.read_text()
    assert f"snakemake --cores 2 --configfile configs/experiments/{path.name}" in text
    assert f"sync_dvc.py --use configs/experiments/{path.name} && dvc repro" in text
    config = yaml.safe_load(text)
    assert config["experiment"] == path.stem
    section = "dpo" if config.get("routes") == ["dpo"] else "train"
    methods = config[section]["methods"]
    for method in methods:
        train_stage.read_train_config([PARAMS, path], section, "valuation", method, 0, "out")
    merges = [row_name(alpha) for alpha in (config.get("wiseft") or {}).get("alphas", [])]  # report rows of Wise-FT
    if merges:
        assert section == "train" and config["wiseft"]["of"] in methods  # DVC trains the train.methods matrix only
    for setting, runs in (config["report"].get("sweeps") or {}).items():
        assert set(runs) <= set(methods) | set(merges), setting
    for pair in config["report"].get("pairs", []):
        assert set(pair) <= set(methods) | set(merges)
    unused = set(config[section].get("variants", {})) - set(methods)
    assert not unused, f"variants defined but not run: {unused}"


def test_a_variant_name_means_the_same_run_in_every_overlay():
    """Runs are shared by name across experiments (results/train/<name>-<seed>): two overlays giving
    one variant name different settings would overwrite each other's runs."""
    seen: dict[str, tuple[str, dict]] = {}
    for path in EXPERIMENTS:
        config = yaml.safe_load(path.read_text())
        for section in ("train", "dpo"):
            for name, settings in (config.get(section, {}).get("variants") or {}).items():
                key = f"{section}.{name}"
                if key in seen:
                    assert seen[key][1] == settings, f"{key}: {seen[key][0]} and {path.name} differ"
                seen[key] = (path.name, settings)
