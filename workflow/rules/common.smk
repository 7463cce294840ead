# Helpers shared by the rules: how a stage is invoked, which source files it depends on, and the
# compute resources of each rule. The rules stay declarative; dvc.yaml is generated from them
# (workflow/scripts/sync_dvc.py), so everything here must be reproducible from the rules alone.

import importlib.util
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from alphatoken.runs import RUN_KINDS  # runs with rules of their own: their outputs, refusals and report rows

REPO = Path(workflow.basedir)


def _load_script_module(name):
    """workflow/scripts/<name>.py as module `name`, without putting workflow/scripts on sys.path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "workflow" / "scripts" / f"{name}.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # registered first, as `import` does (dataclasses and pickling look it up)
    spec.loader.exec_module(loaded)
    return loaded


_stagedeps = _load_script_module("stagedeps")
MATRIX, stage_sources = _stagedeps.MATRIX, _stagedeps.stage_sources
ENV = "../envs/alphatoken.yaml"  # conda env (relative to this file) for `--sdm conda`; see the file

# Stage commands call `python`: make it the interpreter running Snakemake (the project's venv),
# also inside SLURM jobs, which inherit this environment (sbatch --export=ALL).
_bin = os.path.dirname(sys.executable)
if _bin not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

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


# Local scheduling: a ready training job (both cores on the CPU default) goes before a ready evaluation
# (one core), so the evaluations run side by side after the trainings instead of leaving a core idle
# next to each one while the next training waits for both cores. No effect on what runs or on SLURM,
# where every ready job is submitted at once.
TRAIN_PRIORITY = 1


def rule_threads(rule_name):
    """Local cores of a rule (also --cpus-per-task for CPU rules on SLURM)."""
    return int(config["resources"].get(rule_name, {}).get("threads", 1))


# The run matrix: one train (and evaluate) job per method x seed of the parameters.
wildcard_constraints:
    method="[a-z0-9_]+",
    seed="[0-9]+",
    dpo_method="[a-z0-9_]+",
    dpo_seed="[0-9]+",
    sepo_seed="[0-9]+",


def matrix_values(wildcard):
    """The values the run-matrix wildcard ranges over (e.g. `train.methods` for `method`); a method
    must be a token policy or a variant of its section (the schema cannot tell a misspelt policy
    from a variant name)."""
    section, key = MATRIX[wildcard]
    values = config[section].get(key)
    if not isinstance(values, list) or not values:
        raise WorkflowError(f"{section}.{key} must be a non-empty list (the {wildcard}s to run), got {values!r}")
    if key == "methods":
        from alphatoken.policies import POLICIES
        from alphatoken.runs import refused_method

        refused = [refused_method(section, m) for m in values if refused_method(section, m)]
        if refused:  # runs with rules of their own (alphatoken.runs.RUN_KINDS: less, wiseft_a<alpha>, sepo)
            raise WorkflowError(f"{section}.{key}: " + "; ".join(refused))
        variants = config[section].get("variants") or {}
        unknown = [m for m in values if m not in POLICIES and m not in variants]
        if unknown:
            raise WorkflowError(f"{section}.{key}: {unknown} are neither token policies ({sorted(POLICIES)}) nor "
                                f"variants of {section}.variants ({sorted(variants)})")
    return values


def sepo_seeds():
    """The seeds of the SePO runs (`sepo.seeds`; empty: SePO is off)."""
    seeds = (config.get("sepo") or {}).get("seeds") or []
    if not isinstance(seeds, list):
        raise WorkflowError(f"sepo.seeds must be a list of seeds (empty: SePO off), got {seeds!r}")
    return seeds if "dpo" in routes() else []


def matrix_params(*wildcards):
    """The matrix lists of `wildcards` as a `params:` entry (the report reads them to know the runs)."""
    return {MATRIX[w][1]: matrix_values(w) for w in wildcards}


VARIANTS = "variants"  # named runs of a training section: {name: {policy, <keys>..., valuation: {...}}}


def run_params(section):
    """A section without the matrix lists and the variants: the settings every run shares (adding a
    seed or a variant does not rerun the others)."""
    matrix_keys = {key for s, key in MATRIX.values() if s == section}
    return {k: v for k, v in config[section].items() if k not in matrix_keys and k != VARIANTS}


def _variant(section, method):
    return dict((config[section].get(VARIANTS) or {}).get(method) or {})


def run_settings(section):
    """`params:` function: the settings of the run of wildcard `method` (or `dpo_method`), the
    section's own values with its variant's applied (alphatoken.stages.train.resolve_run does the
    same for the stage), so a run reruns exactly when its own settings change."""

    def settings(wildcards):
        method = wildcards.get("method") or wildcards.get("dpo_method")
        variant = _variant(section, method)
        variant.pop("policy", None)
        variant.pop("valuation", None)
        return {**run_params(section), **variant}

    return settings


def run_valuation(section):
    """`params:` function: the valuation settings of the run of wildcard `method` (its variant's
    `valuation:` values over the valuation section)."""

    def valuation(wildcards):
        method = wildcards.get("method") or wildcards.get("dpo_method")
        return {**config["valuation"], **(_variant(section, method).get("valuation") or {})}

    return valuation


def extra_runs(route="sft"):
    """The rows the report of `route` lists outside its matrices, as `alphatoken.runs.extra_runs` derives them
    from the parameters (LESS's less-<seed>, the Wise-FT merges wiseft_a<alpha>, SePO's runs), once the settings
    they come from are checked: their rule files make them, the report reads them (--extra-run) and `all` builds
    their evaluations."""
    from alphatoken.runs import extra_runs as registry_runs

    if less_enabled():
        matrix_values("less_seed")
    if wiseft_alphas():
        matrix_values("seed")
    sepo_seeds()
    return registry_runs(config, route)


def extra_run_args(route="sft"):
    """The report's --extra-run arguments of `extra_runs(route)`."""
    return "".join(run.report_arg() for run in extra_runs(route))


def less_enabled():
    """LESS (params.yaml `less`) runs: its selection, its runs and their evaluations (workflow/rules/less.smk)."""
    return bool((config.get("less") or {}).get("enabled"))


EXPERIMENT = config.get("experiment", "")  # configs/experiments/<name>.yaml sets it; "" is the default DAG


def report_dir(route="sft"):
    """Where a route's report goes: results/report (SFT) and results/dpo/report for the default DAG,
    results/experiments/<name> and results/experiments/<name>/dpo for an experiment overlay (its own
    table and figures; the runs themselves are shared by name)."""
    if route == "dpo":
        return f"results/experiments/{EXPERIMENT}/dpo" if EXPERIMENT else "results/dpo/report"
    return f"results/experiments/{EXPERIMENT}" if EXPERIMENT else "results/report"


def all_runs(pattern):
    """`pattern` expanded over the run-matrix wildcards it contains."""
    names = [w for w in MATRIX if f"{{{w}}}" in pattern]
    return expand(pattern, **{w: matrix_values(w) for w in names})


ROUTES = ("sft", "dpo")


def routes():
    """The routes the default target runs: `sft` (Alpha-SFT) and/or `dpo` (warm-start SFT, then DPO)."""
    chosen = config.get("routes", ["sft"])
    if not isinstance(chosen, list) or not chosen or set(chosen) - set(ROUTES):
        raise WorkflowError(f"routes: expected a non-empty list of {list(ROUTES)}, got {chosen!r}")
    return chosen


# Wise-FT merges after training (workflow/rules/wiseft.smk): alpha x seed, off while wiseft.alphas is [].
# An alpha's text in paths and row names is Python's str() of the float, which is what DVC writes for
# ${item.alpha} too: alphas are floats (1.0, not 1), checked here (alphatoken.merge.alpha_tag) and by the stage.
WISEFT_MERGE = "results/wiseft/{alpha}-{seed}"


def wiseft_alphas():
    """wiseft.alphas ([] when off), checked: floats in [0, 1] whose str() names the merge; when there are
    any, wiseft.of must be a token policy or a variant of train.variants."""
    from alphatoken.merge import MergeError, alpha_tag

    alphas = config["wiseft"].get("alphas") or []
    for alpha in alphas:
        try:
            alpha_tag(alpha)
        except MergeError as err:
            raise WorkflowError(f"wiseft.alphas: {err}")
    of = config["wiseft"].get("of")
    if alphas:
        from alphatoken.policies import POLICIES
        from alphatoken.runs import run_kind

        variants = config["train"].get("variants") or {}
        if run_kind(str(of)) or (of not in POLICIES and of not in variants):
            raise WorkflowError(f"wiseft.of: {of!r} is neither a token policy ({sorted(POLICIES)}) nor a variant of "
                                f"train.variants ({sorted(variants)}): name the trained run to merge")
    return alphas
