"""The smoke DAG end to end, and what reruns after a change, in both front ends.

One scratch git repository (`git init`, `dvc init`) with a copy of the pipeline:
1. `snakemake -c2 --configfile configs/smoke.yaml` runs the whole DAG on a tiny random model
   (the CI smoke run); a second dry run has nothing to do.
2. DVC records the same outputs (`dvc commit`); its params.yaml there is the smoke overlay merged
   into params.yaml, so both front ends see the same values.
3. A parameter of one section, a parameter of an upstream section and a library module are changed
   in turn: `snakemake --dry-run` and `dvc status` must list exactly the dependants, and
   `dvc repro` must rerun exactly those.
"""

from __future__ import annotations

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
STAGES = {"prepare_model", "build_corpus", "prepare_data", "fisher"}

pytestmark = pytest.mark.slow


def run(cwd: Path, *cmd: str, timeout: float = 600) -> str:
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
    return set(re.findall(r"^(\w+):\s*$", out, re.M)) & STAGES


@pytest.fixture(scope="module")
def smoke_repo(tmp_path_factory) -> tuple[Path, float]:
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()
    for name in ("Snakefile", "params.yaml", "dvc.yaml", "workflow", "configs", "alphatoken"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, repo / name)
    began = time.perf_counter()
    run(repo, str(BIN / "snakemake"), "-c2", "--configfile", "configs/smoke.yaml")
    return repo, time.perf_counter() - began


def test_smoke_dag_runs_end_to_end(smoke_repo):
    repo, seconds = smoke_repo
    print(f"smoke DAG: {seconds:.1f} s")
    assert seconds < 180
    for rule in STAGES:
        assert (repo / f"logs/{rule}.log").is_file() and (repo / f"benchmarks/{rule}.tsv").is_file()
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
    assert snakemake_pending(repo) == set()


def test_a_change_reruns_only_its_dependants_in_both_front_ends(smoke_repo):
    repo, _ = smoke_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    merged = merge(params, yaml.safe_load((repo / "configs/smoke.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, str(BIN / "dvc"), "init", "-q")
    run(repo, str(BIN / "dvc"), "commit", "-f", "-q")  # record the outputs Snakemake made
    assert dvc_changed(repo) == set()
    assert snakemake_pending(repo) == set()  # merging the overlay into params.yaml changed no value

    def edit_params(section: str, key: str, value) -> None:
        merged[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))

    # a Fisher setting: only the Fisher
    edit_params("fisher", "seed", 7)
    assert snakemake_pending(repo) == {"fisher"}
    assert snakemake_pending(repo, "--rerun-triggers", "params") == {"fisher"}
    assert dvc_changed(repo) == {"fisher"}
    out = run(repo, str(BIN / "dvc"), "repro")
    assert "Running stage 'fisher'" in out and "Running stage 'prepare_data'" not in out
    assert dvc_changed(repo) == set()
    run(repo, str(BIN / "snakemake"), "-c2", "--configfile", "configs/smoke.yaml")
    assert snakemake_pending(repo) == set()

    # an upstream setting: the split and everything after it, not the model or the corpus
    edit_params("data", "seed", 1)
    assert snakemake_pending(repo) == {"prepare_data", "fisher"}
    # `dvc status` names the stages whose own dependencies changed; their dependants follow once
    # the upstream outputs change, which the `dvc repro` at the end of this test shows
    assert dvc_changed(repo) == {"prepare_data"}
    edit_params("data", "seed", 0)

    # a library module imported by one stage only
    assert snakemake_pending(repo) == set() and dvc_changed(repo) == set()
    fisher_py = repo / "alphatoken/fisher.py"
    time.sleep(1.1)  # a strictly newer modification time for Snakemake's mtime trigger
    fisher_py.write_text(fisher_py.read_text() + "\n# edited\n")
    assert snakemake_pending(repo) == {"fisher"}
    assert dvc_changed(repo) == {"fisher"}
    fisher_py.write_text(fisher_py.read_text().removesuffix("\n# edited\n"))

    edit_params("data", "seed", 1)
    out = run(repo, str(BIN / "dvc"), "repro")
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == {"prepare_data", "fisher"}, out
