"""The smoke DAG through `snakemake --profile slurm` on a real single-node SLURM cluster started by
the test (tests/slurm_cluster.py: Debian slurmctld/slurmd/munge, one node with one a100 GPU whose
device file is a character node, no accounting).

What it proves: every job is submitted with sbatch and completes; the rules that request GPUs
(params `resources.<rule>.gpu` > 0, GPU model from the profile) run with CUDA_VISIBLE_DEVICES set by
SLURM's GPU binding, and still run (on CPU) without a CUDA driver; CPU rules get no GPU.
Skipped, with the reason, only where SLURM cannot be installed or started (e.g. not root)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slurm_cluster import ClusterUnavailable, SlurmCluster

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def merged_params(repo: Path) -> dict:
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return merge(yaml.safe_load((repo / "params.yaml").read_text()), yaml.safe_load((repo / "configs/smoke.yaml").read_text()))


def gpu_rules(params: dict) -> set[str]:
    return {rule for rule, req in params["resources"].items() if (req or {}).get("gpu", 0)}


def test_every_gpu_rule_has_a_gpu_model_in_the_slurm_profile():
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    models = {rule for rule, res in (profile.get("set-resources") or {}).items() if "gpu_model" in (res or {})}
    gpu = gpu_rules(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert gpu - models == set(), f"GPU rules without a gpu_model in the slurm profile: {sorted(gpu - models)}"
    assert models - gpu == set(), f"gpu_model set for rules that request no GPU: {sorted(models - gpu)}"
    assert (REPO / "slurm").resolve() == (REPO / "workflow/profiles/slurm").resolve()  # `--profile slurm` from the root


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as reason:
        cluster.stop()
        print(f"SLURM unavailable: {reason}")
        pytest.skip(f"SLURM unavailable: {reason}")
    yield cluster
    cluster.stop()


def test_smoke_dag_runs_through_the_slurm_executor(cluster, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Snakefile", "params.yaml", "dvc.yaml", "workflow", "profiles", "configs", "alphatoken", "slurm"):
        src = REPO / name
        if src.is_symlink():
            (repo / name).symlink_to(src.readlink())
        elif src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, repo / name)
    env = {**cluster.env, "PATH": f"{BIN}:{cluster.env.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "--profile", "slurm", "--configfile", "configs/smoke.yaml",
           "--slurm-status-command", "squeue", "--slurm-no-account", "--latency-wait", "5", "--jobs", "4"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}\n{cluster.daemon_log('slurmctld')}"
    assert re.search(r"\d+ of \d+ steps \(100%\) done", output), output[-3000:]

    params = merged_params(repo)
    logs = {path: path.read_text() for path in (repo / "logs").rglob("*.log") if "slurm" not in path.parts}
    assert logs, "no stage logs were written"
    ran_gpu, ran_cpu = 0, 0
    for path, text in logs.items():
        rule = path.relative_to(repo / "logs").parts[0].removesuffix(".log")
        if "[run] SLURM_JOB_ID=" not in text:
            continue
        assert re.search(r"^\[run\] SLURM_JOB_ID=\d+$", text, re.M), f"{path}: not run inside a SLURM job"
        if rule in gpu_rules(params):
            ran_gpu += 1
            assert "[run] CUDA_VISIBLE_DEVICES=0" in text, f"{path}: GPU rule {rule} got no GPU from SLURM"
            assert "[run] device=cpu" in text, f"{path}: expected the CPU fallback without a CUDA driver"
        else:
            ran_cpu += 1
            assert re.search(r"^\[run\] CUDA_VISIBLE_DEVICES=$", text, re.M), f"{path}: CPU rule {rule} was given a GPU"
    assert ran_gpu >= 1 and ran_cpu >= 1, f"stage logs with SLURM job ids: {ran_gpu} GPU rules, {ran_cpu} CPU rules"
