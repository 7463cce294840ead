# Helpers shared by the rules: how a stage is invoked, which source files it depends on, and the
# compute resources of each rule. The rules stay declarative; dvc.yaml is generated from them
# (workflow/scripts/sync_dvc.py), so everything here must be reproducible from the rules alone.

import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))
from stagedeps import stage_sources  # noqa: E402

REPO = Path(workflow.basedir)
ENV = "../envs/alphatoken.yaml"  # conda env (relative to this file) for `--sdm conda`; see the file

# Stage commands call `python`: make it the interpreter running Snakemake (the project's venv),
# also inside SLURM jobs, which inherit this environment (sbatch --export=ALL).
_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

# Stages read their section from the parameter files, layered like Snakemake's: params.yaml, then
# every --configfile overlay. A --config KEY=VALUE override would reach the rules' params but not
# the stages, so it is refused with the fix.
if workflow.config_settings.config:  # --config KEY=VALUE (the --configfile overlays are fine)
    raise WorkflowError(
        "--config overrides are not seen by the stages, which read parameter files: put the "
        "values in a YAML overlay (like configs/smoke.yaml) and pass it with --configfile"
    )


def _rel(path):
    """Paths inside the repo are written relative to it, so commands are the same on every checkout."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


PARAMS_FILES = ["params.yaml"] + [_rel(f) for f in workflow.config_settings.configfiles]
LOG_REDIRECT = " > {log} 2>&1"


def stage(name, section, args=""):
    """Shell command running stage `name` on parameter section `section`; stdout and stderr go
    to the rule's log (Snakemake names the log when the stage fails, and the stage's last line
    says what to fix)."""
    return (
        f"python -m alphatoken.stages.{name} --params {' '.join(PARAMS_FILES)} --section {section} "
        + args
        + LOG_REDIRECT
    )


def stage_code(name):
    """Every repo source file stage `name` runs (its import closure inside alphatoken/): a change
    to any of them reruns the stage."""
    return stage_sources(name, REPO)


def rule_resources(rule_name):
    """The `resources:` of a rule from the `resources` section of the parameters (threads excluded).

    GPU rules run one process per job: `tasks`/`tasks_per_gpu` would make the SLURM plugin submit
    with --ntasks-per-gpu, so a multi-GPU job would start one copy of the stage per GPU. They are
    refused here; a multi-GPU stage launches torchrun inside its single job instead."""
    requests = dict(config["resources"].get(rule_name, {}))
    requests.pop("threads", None)
    if requests.get("gpu", 0) and ({"tasks", "tasks_per_gpu", "mpi"} & set(requests)):
        raise WorkflowError(
            f"resources.{rule_name}: GPU rules run one process per job; remove tasks/tasks_per_gpu/mpi "
            "(the SLURM plugin turns them into --ntasks-per-gpu, one copy of the stage per GPU) and "
            "launch torchrun inside the job for several GPUs"
        )
    return requests


def rule_threads(rule_name):
    """Local cores of a rule (also --cpus-per-task for CPU rules on SLURM)."""
    return int(config["resources"].get(rule_name, {}).get("threads", 1))
