"""The smoke DAG end to end, and what reruns after a change, in both front ends.

One scratch git repository (`git init`, `dvc init`) with a copy of the pipeline:
1. `snakemake -c2 --configfile configs/smoke.yaml` runs the whole DAG (both routes: Alpha-SFT, and
   warm-start SFT -> DPO) on a tiny random model, within the smoke budget (the CI smoke run), and
   writes a report with one row per method; a second dry run has nothing to do.
2. DVC records the same outputs (`dvc commit`); there, params.yaml is the smoke overlay merged in and
   dvc.yaml is regenerated for it (`sync_dvc.py --use`), so both front ends see the same DAG.
3. A Fisher setting, an upstream data setting, a library module and `train.rho` are changed in turn:
   `snakemake --dry-run` and `dvc status` must list exactly the dependants; `dvc exp run -S
   train.rho=...` must rerun exactly train, evaluate, report and the heatmap, and `dvc exp show`
   list the experiment's parameter and metrics.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alphatoken.fisher import FisherConfig, load_fisher
from alphatoken.models import ModelSpec, load_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_COMMITTER_NAME": "test",
       "GIT_AUTHOR_EMAIL": "test@example.invalid", "GIT_COMMITTER_EMAIL": "test@example.invalid"}
SFT_RUNS = ["alphatoken-0", "full-0", "random-0", "bottom-0"]
DPO_RUNS = ["alphatoken-0", "full-0"]
# every job of the smoke DAG, as DVC names them
DVC_STAGES = ({"build_corpus", "prepare_model", "prepare_data", "prepare_preference", "fisher", "fisher_dpo",
               "warmstart_sft", "ref_logps", "evaluate_base", "evaluate_warmstart", "report", "report_dpo", "heatmap"}
              | {f"{rule}@{run}" for rule in ("train", "evaluate") for run in SFT_RUNS}
              | {f"{rule}@{run}" for rule in ("train_dpo", "evaluate_dpo") for run in DPO_RUNS})

# the diagnostics (App. D), run by name on the smoke DAG's alphatoken run; DVC stages too
DIAGNOSTIC_STAGES = {"proxy_oracle", "attention_deviation"}

pytestmark = pytest.mark.slow


def run(cwd: Path, *cmd: str, timeout: float = 1200) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def snakemake_pending(repo: Path, *extra: str) -> set[str]:
    """Rules a dry run would execute (the job table of `snakemake -n`), besides the target `all`."""
    out = run(repo, str(BIN / "snakemake"), "-n", "--configfile", "configs/smoke.yaml", *extra)
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m for m in re.findall(r"^(\w+)\s+\d+\s*$", table, re.M)} - {"all", "job"}


def dvc_changed(repo: Path) -> set[str]:
    out = run(repo, str(BIN / "dvc"), "status")
    return set(re.findall(r"^([\w@-]+):\s*$", out, re.M)) & DVC_STAGES


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory) -> tuple[Path, float]:
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()
    for name in ("Snakefile", "params.yaml", "dvc.yaml", ".dvcignore", "workflow", "profiles", "configs", "alphatoken"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, repo / name)
    began = time.perf_counter()
    run(repo, str(BIN / "snakemake"), "-c2", "--configfile", "configs/smoke.yaml")
    return repo, time.perf_counter() - began


@pytest.fixture(scope="module")
def smoke_diagnostics(smoke_repo) -> tuple[Path, float]:
    """Both diagnostic rules run by name on the smoke DAG's outputs (its Fisher, alphatoken run, data)."""
    repo, _ = smoke_repo
    began = time.perf_counter()
    out = run(repo, str(BIN / "snakemake"), "-c2", *sorted(DIAGNOSTIC_STAGES), "--configfile", "configs/smoke.yaml")
    assert "Job stats" in out and "train" not in re.findall(r"^(\w+)\s+\d+\s*$", out.split("Job stats:", 1)[1], re.M)
    return repo, time.perf_counter() - began


def table_rows(path: Path) -> list[str]:
    """Method names of a report table (Markdown), in order."""
    return re.findall(r"^\| ([\w.]+) \| \d+ \|", path.read_text(), re.M)  # wiseft_a0.5: a dot


def test_smoke_dag_runs_end_to_end(smoke_repo):
    repo, seconds = smoke_repo
    print(f"smoke DAG: {seconds:.1f} s")
    # the time is reported (docs/PIPELINE.md), not asserted: it depends on the machine and its load
    for job in DVC_STAGES:
        rule, _, run_name = job.partition("@")
        name = f"{rule}/{run_name}" if run_name else rule
        assert (repo / f"logs/{name}.log").is_file() and (repo / f"benchmarks/{name}.tsv").is_file(), job
    assert (repo / "results/model/model.safetensors").is_file()
    assert all((repo / f"results/data/{s}.jsonl").stat().st_size > 0 for s in ("train", "val", "fisher"))
    # the Fisher belongs to the reference checkpoint and to the smoke settings
    model, _ = load_model(ModelSpec(source="hub", name_or_path=str(repo / "results/model"), attn_implementation="eager"))
    smoke = yaml.safe_load((repo / "configs/smoke.yaml").read_text())["fisher"]
    cfg = FisherConfig(**{k: v for k, v in merge(yaml.safe_load((repo / "params.yaml").read_text())["fisher"], smoke).items()
                          if k in FisherConfig.__dataclass_fields__})
    fisher = load_fisher(repo / "results/fisher.safetensors", model, cfg)
    assert len(fisher) == 7 * cfg.last_k and all(float(f.min()) >= 0 for f in fisher.values())
    assert "[run] device=cpu" in (repo / "logs/fisher.log").read_text()
    # the DPO route's Fisher is the warm-started model's, not the base model's
    warm, _ = load_model(ModelSpec(source="hub", name_or_path=str(repo / "results/dpo/warmstart/final"), attn_implementation="eager"))
    load_fisher(repo / "results/dpo/fisher.safetensors", warm, cfg)
    with pytest.raises(ValueError, match="weights_fingerprint"):
        load_fisher(repo / "results/dpo/fisher.safetensors", model, cfg)

    # one row per method (the reference model first), in Markdown, CSV and the DVC metrics
    assert table_rows(repo / "results/report/table.md") == ["base", "alphatoken", "full", "random", "bottom"]
    assert table_rows(repo / "results/dpo/report/table.md") == ["warmstart", "alphatoken", "full"]
    csv_methods = [line.split(",")[0] for line in (repo / "results/report/table.csv").read_text().splitlines()[1:]]
    assert csv_methods == ["base", "alphatoken", "full", "random", "bottom"]
    metrics = json.loads((repo / "results/report/metrics.json").read_text())
    evaluated = json.loads((repo / "results/eval/runs/random-0/metrics.json").read_text())
    assert metrics["random/Overall"] == evaluated["Overall"]  # one seed: the mean is the run's value
    assert evaluated["KL"] > 0  # the run moved away from the reference
    for run_name in SFT_RUNS:
        curve = (repo / f"results/report/curves/{run_name}.csv").read_text().splitlines()
        assert curve[0] == "step,loss,kept_fraction" and len(curve) == 3  # two optimizer steps
    kept = float((repo / "results/report/curves/alphatoken-0.csv").read_text().splitlines()[1].split(",")[2])
    assert 0.4 < kept < 0.6  # rho = 0.5 of the tokens trained
    # heatmaps of the four components and the total on the AlphaToken run: the proxy is not zero there
    page = (repo / "results/heatmap.html").read_text()
    assert page.count('<div class="example">') == 4
    for component in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau", "total"):
        values = [float(v) for v in re.findall(rf'title="{component}=([^"]+)"', page)]
        assert values and any(v != 0 for v in values), component
    trained = json.loads((repo / "results/dpo/train/alphatoken-0/metrics.json").read_text())
    assert trained["objective"] == "dpo" and trained["policy"] == "alphatoken"
    # the DPO runs used the reference log-probs of the ref_logps stage, computed from the warm-start
    from alphatoken.models import weights_fingerprint
    from alphatoken.train.reference import read_reference_metadata

    meta = read_reference_metadata(repo / "results/dpo/ref_logps.safetensors")
    assert meta["weights_fingerprint"] == weights_fingerprint(warm) and int(meta["val_count"]) == 2
    assert not list((repo / "results/dpo/train").glob("*/reference_losses.pt"))  # not recomputed by the runs
    assert snakemake_pending(repo) == set()


def test_diagnostics_run_by_name_on_the_smoke_dag(smoke_diagnostics):
    """proxy_oracle and attention_deviation reuse the DAG's outputs (nothing upstream reruns) and write
    finite summaries with their figures; the oracle set names its 4 x oracle_per_task documents."""
    repo, seconds = smoke_diagnostics
    print(f"smoke diagnostics: {seconds:.1f} s")
    smoke = yaml.safe_load((repo / "configs/smoke.yaml").read_text())["diagnostics"]
    oracle = json.loads((repo / "results/diagnostics/proxy_oracle/summary.json").read_text())
    for name in ("pearson", "spearman"):
        value, (lo, hi) = oracle[name]["value"], oracle[name]["ci"]
        assert all(map(math.isfinite, (value, lo, hi))) and -1 <= lo <= value <= hi <= 1, name
    top = oracle["top_overlap"]
    assert 0 <= top["proxy_vs_oracle"] <= 1 and abs(top["random_expected"] - 0.5) < 0.05 and top["random_draws"] == 20
    assert oracle["examples"] == smoke["n_examples"] and oracle["tokens"] > 0
    assert all(math.isfinite(v) and v > 0 for v in oracle["oracle_nll"].values())
    docs = json.loads((repo / "results/diagnostics/proxy_oracle/oracle_docs.json").read_text())
    assert {task: len(ids) for task, ids in docs["ids"].items()} == {
        t: smoke["oracle_per_task"] for t in ("arc_challenge", "hellaswag", "mmlu", "gsm8k")}
    tokens = (repo / "results/diagnostics/proxy_oracle/tokens.csv").read_text().splitlines()
    assert tokens[0] == "example,position,token,proxy,oracle" and len(tokens) == oracle["tokens"] + 1
    attention = json.loads((repo / "results/diagnostics/attention/summary.json").read_text())
    assert attention["pairs"] > 0 and attention["blocks"] == [2, 3]  # the tiny model's last K = 2 of 4 blocks
    for key in ("alpha", "deviation", "alpha_times_d"):
        assert all(math.isfinite(v) for v in attention[key].values()), key
    assert 0 <= attention["alpha"]["max"] <= 1
    assert all(0 <= f <= 1 for f in attention["fraction_below"].values())
    for png in ("proxy_oracle/proxy_oracle.png", "attention/attention.png"):
        assert (repo / "results/diagnostics" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for name in DIAGNOSTIC_STAGES:
        assert (repo / f"logs/{name}.log").is_file() and (repo / f"benchmarks/{name}.tsv").is_file()



EXPERIMENTS = ["ranking", "ablations", "baselines", "causes_core", "causes", "sensitivity", "dpo"]  # later ones reuse earlier runs


@pytest.fixture(scope="module")
def experiments_repo(smoke_repo, tmp_path_factory) -> Path:
    """A copy of the finished smoke DAG (outputs and Snakemake's records), taken before any test edits it."""
    repo, _ = smoke_repo
    copy = tmp_path_factory.mktemp("experiments") / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    (copy / "configs" / "one_seed.yaml").write_text("train: {seeds: [0]}\ndpo: {seeds: [0]}\nless: {seeds: [0]}\n"
                                                    "sepo: {seeds: [0]}\n")
    return copy


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_runs_end_to_end_on_the_smoke_model(experiments_repo, name):
    """configs/experiments/<name>.yaml on the smoke model (one seed): every run it lists trains and is
    evaluated, and its own report lands in results/experiments/<name>/ (the DPO one in .../dpo/), with
    the sweep figures (sensitivity) and the value-realisation record (causes)."""
    repo = experiments_repo
    config = yaml.safe_load((repo / "configs" / "experiments" / f"{name}.yaml").read_text())
    sft = "sft" in config.get("routes", ["sft"])
    runs_dir = repo / "results" / ("train" if sft else "dpo/train")
    before = {p.name for p in runs_dir.iterdir()} if runs_dir.is_dir() else set()
    began = time.perf_counter()
    out = run(repo, str(BIN / "snakemake"), "-c2", "--configfile", "configs/smoke.yaml", f"configs/experiments/{name}.yaml",
              "configs/one_seed.yaml", timeout=3000)
    print(f"experiment {name} on the smoke model: {time.perf_counter() - began:.1f} s")
    # runs are shared by name: only the experiment's new runs train (the overlay changes no other job's parameters)
    listed = {f"{m}-0" for m in config["train" if sft else "dpo"]["methods"]}
    trained = re.findall(r"^(?:local)?rule (train|train_dpo):\n(?:.*\n)*?\s+wildcards: \w+=(\w+), \w+=(\d+)", out, re.M)
    assert {f"{m}-{s}" for _, m, s in trained} == listed - before, out[-3000:]
    out = repo / "results" / "experiments" / name / ("" if sft else "dpo")
    section = "train" if sft else "dpo"
    methods = config[section]["methods"]
    extra = ["less"] if sft and (config.get("less") or {}).get("enabled") else []  # runs outside the matrix
    if extra:  # LESS: trained on its selection, evaluated, in the report
        manifest = json.loads((repo / "results/less/selection/manifest.json").read_text())
        assert manifest["counts"]["selected"] == len((repo / "results/less/selection/selection.jsonl").read_text().splitlines())
        assert (repo / "results/eval/less/less-0/metrics.json").is_file()
    own_rules = ["sepo"] if not sft and (config.get("sepo") or {}).get("seeds") else []  # rows of --extra-run
    alphas = (config.get("wiseft") or {}).get("alphas", [])  # Wise-FT merges of wiseft.of: rows after the trained runs
    merges = [f"wiseft_a{alpha}" for alpha in alphas]
    assert table_rows(out / "table.md") == [("base" if sft else "warmstart"), *methods, *extra, *merges, *own_rules]
    for alpha in alphas:
        record = json.loads((repo / "results" / "wiseft" / f"{alpha}-0" / "merge.json").read_text())
        assert (record["alpha"], record["of"], record["seed"]) == (alpha, config["wiseft"]["of"], 0)
    comparisons = (out / "comparisons.md").read_text()
    for baseline in config["report"]["baselines"]:
        assert f"### Against {baseline}" in comparisons
    for method, baseline in config["report"].get("pairs", []):
        assert re.search(rf"^\| {method} \| .* \|", comparisons.split(f"### Against {baseline}", 1)[1], re.M)
    if "sweeps" in config["report"]:
        rows = list(csv.DictReader(open(out / "sweeps.csv")))
        assert {r["sweep"] for r in rows} == set(config["report"]["sweeps"])
        assert all(float(r["time"]) > 0 for r in rows if r["method"] not in merges)  # a merge has no step time
        for sweep in config["report"]["sweeps"]:
            assert (out / f"sweep_{sweep}.png").stat().st_size > 0
    if any(v.get("realisation_every") for v in config[section].get("variants", {}).values()):
        rows = {r["method"]: r for r in csv.DictReader(open(out / "realisation.csv"))}
        recorded = [m for m, v in config[section]["variants"].items() if v.get("realisation_every")]
        assert set(rows) == set(recorded)
        assert all(math.isfinite(float(rows[m]["heldout_loss_change"])) for m in recorded)
        assert "## Value realisation" in comparisons and (out / "realisation.png").stat().st_size > 0


def test_a_change_reruns_only_its_dependants_in_both_front_ends(smoke_repo, smoke_diagnostics):
    repo, _ = smoke_repo
    run(repo, sys.executable, "workflow/scripts/sync_dvc.py", "--use", "configs/smoke.yaml")
    (repo / ".gitignore").write_text("/.snakemake/\n/logs/\n/benchmarks/\n__pycache__/\n")
    run(repo, "git", "init", "-q")
    run(repo, str(BIN / "dvc"), "init", "-q")
    stages = set(re.findall(r"^([\w@-]+)\s", run(repo, str(BIN / "dvc"), "stage", "list"), re.M))
    assert stages == DVC_STAGES | DIAGNOSTIC_STAGES  # the same jobs as Snakemake ran, matrix stages expanded
    run(repo, str(BIN / "dvc"), "commit", "-f", "-q")  # record the outputs Snakemake made
    assert dvc_changed(repo) == set()
    assert snakemake_pending(repo) == set()  # merging the overlay into params.yaml changed no value
    merged = yaml.safe_load((repo / "params.yaml").read_text())

    def edit_params(section: str, key: str, value) -> None:
        merged[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))

    # a Fisher setting: both Fisher caches and what was trained with them; not data or warm-start
    edit_params("fisher", "seed", 7)
    after_fisher = {"fisher", "train", "evaluate", "report", "heatmap", "fisher_dpo", "train_dpo", "evaluate_dpo",
                    "report_dpo"}
    assert snakemake_pending(repo) == after_fisher
    assert snakemake_pending(repo, "--rerun-triggers", "params") == after_fisher
    # `dvc status` names the stages whose own dependencies changed; their dependants follow once
    # the upstream outputs change (the `dvc exp run` at the end shows the rerun set). The training
    # runs read the `fisher` section themselves (the Fisher of the LoRA factors is computed by the
    # `alphatoken_lora` runs), so they are named too.
    runs = {s for s in DVC_STAGES if s.startswith(("train@", "train_dpo@"))}
    assert runs and dvc_changed(repo) == {"fisher", "fisher_dpo"} | runs
    edit_params("fisher", "seed", 0)

    # an upstream setting: the split and everything after it (the base row too: its target NLL is
    # measured on the test hold-out), not the model or the corpus
    edit_params("data", "seed", 1)
    assert snakemake_pending(repo) == ({"prepare_data", "warmstart_sft", "evaluate_warmstart", "ref_logps", "evaluate_base"}
                                       | after_fisher)
    assert dvc_changed(repo) == {"prepare_data"}
    edit_params("data", "seed", 0)

    # a library module imported by the evaluate stage only
    assert snakemake_pending(repo) == set() and dvc_changed(repo) == set()
    drift_py = repo / "alphatoken/eval/drift.py"
    time.sleep(1.1)  # a strictly newer modification time for Snakemake's mtime trigger
    drift_py.write_text(drift_py.read_text() + "\n# edited\n")
    assert snakemake_pending(repo) == {"evaluate_base", "evaluate", "report", "evaluate_warmstart", "evaluate_dpo", "report_dpo"}
    assert dvc_changed(repo) == ({"evaluate_base", "evaluate_warmstart"} | {f"evaluate@{r}" for r in SFT_RUNS}
                                 | {f"evaluate_dpo@{r}" for r in DPO_RUNS})
    drift_py.write_text(drift_py.read_text().removesuffix("\n# edited\n"))
    assert dvc_changed(repo) == set()

    # the retained ratio: train, evaluate and report only, in both front ends
    edit_params("train", "rho", 0.25)
    assert snakemake_pending(repo) == {"train", "evaluate", "report", "heatmap"}
    assert snakemake_pending(repo, "--rerun-triggers", "params") == {"train", "evaluate", "report", "heatmap"}
    assert dvc_changed(repo) == {f"train@{r}" for r in SFT_RUNS}
    edit_params("train", "rho", 0.5)

    # a DPO run setting: the DPO runs, not the reference log-probs computed once from the warm-start
    edit_params("dpo", "rho", 0.25)
    assert snakemake_pending(repo) == {"train_dpo", "evaluate_dpo", "report_dpo"}
    assert dvc_changed(repo) == {f"train_dpo@{r}" for r in DPO_RUNS}
    edit_params("dpo", "rho", 0.5)

    # `dvc exp run -S` on an ablation knob records an experiment with its parameter and metrics
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "smoke pipeline")
    out = run(repo, str(BIN / "dvc"), "exp", "run", "-S", "train.rho=0.25", "-n", "rho-quarter")
    ran = set(re.findall(r"Running stage '([\w@-]+)'", out))
    # the diagnostics depend on the runs' directory (and proxy_oracle on train.rho): DVC has no default target
    assert ran == ({f"{rule}@{r}" for rule in ("train", "evaluate") for r in SFT_RUNS} | {"report", "heatmap"}
                   | DIAGNOSTIC_STAGES), out
    shown = json.loads(run(repo, str(BIN / "dvc"), "exp", "show", "--json"))
    experiments = [e for base in shown for e in (base.get("experiments") or [])]
    record = next(r["revs"][0]["data"] for r in experiments if r.get("name") == "rho-quarter")
    assert record["params"]["params.yaml"]["data"]["train"]["rho"] == 0.25
    metrics = record["metrics"]["results/report/metrics.json"]["data"]
    assert set(metrics) >= {f"{m}/Overall" for m in ("base", "alphatoken", "full", "random", "bottom")}
    kept = float((repo / "results/report/curves/alphatoken-0.csv").read_text().splitlines()[1].split(",")[2])
    assert 0.2 < kept < 0.3  # the experiment's rho was trained with
