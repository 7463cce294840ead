"""Generate dvc.yaml from the Snakemake rules, so the two front ends run one declaration.

    python workflow/scripts/sync_dvc.py            # rewrite dvc.yaml
    python workflow/scripts/sync_dvc.py --check    # exit 1 (with a diff) when dvc.yaml is stale
    python workflow/scripts/sync_dvc.py --use configs/smoke.yaml
                                  # merge an overlay into params.yaml (DVC reads only that file),
                                  # then write dvc.yaml for it (e.g. its `routes`)

Every job of the default DAG (`snakemake --forceall`, default parameters) and of the rules run by name
(`ON_DEMAND_RULES`: not in `all`, but DVC has no default target, so they are stages too and `dvc repro`
runs them; `dvc repro report heatmap` runs the default targets only) that runs a shell command becomes one DVC
stage with
    cmd     the rule's shell command without its log redirection,
    deps    the rule's inputs: upstream outputs and the stage's source files (its import closure
            inside alphatoken/, see stagedeps.py), so a library edit reruns the stages importing it,
    params  the parameters the rule lists in `params:`: each keyword names a section; a whole section
            is listed as `section`, a part of one (a dict of some of its keys) key by key,
            `section.key`, so DVC and Snakemake rerun on exactly the same values,
    outs    the rule's outputs (an output named `metrics` is a DVC metrics file, not cached; the
            outputs of the stages that resume from a checkpoint inside them, RESUMABLE_STAGES, are
            `persist: true`, which DVC keeps when it reruns the stage instead of deleting them first).
Rules with wildcards (the run matrix, `MATRIX` in stagedeps.py) become one DVC `matrix:` stage over
the same parameter lists (`${train.methods}`), whose jobs DVC names `rule@<method>-<seed>`; a stage
reading all jobs of a matrix rule depends on their common parent directory. The report's outputs
named `metrics` are declared as top-level `metrics:`, and the report's `table_csv` brings the
report's plots (`alphatoken.eval.report.dvc_plots`: table, curves, trade-off, images) as `plots:`, for
`dvc exp show`, `dvc metrics diff` and `dvc plots`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stagedeps import MATRIX  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package, not an installed one
from alphatoken.stages.common import merge_params  # noqa: E402  (the stages' own layering of parameter files)

ROOT = Path(__file__).resolve().parents[2]
# Stage modules whose outputs hold their own resumable checkpoint (the training runs): DVC deletes a
# stage's outputs before running it unless they are `persist: true`, and then a preempted or killed
# run could not resume under `dvc repro`. The stage decides itself whether what it finds there may be
# reused (alphatoken.train.loop: the run identity), so persisting never mixes two configurations.
RESUMABLE_STAGES = ("alphatoken.stages.train", "alphatoken.stages.less")  # less: its warm-up and gradients
DEFAULT_TARGET = "all"  # the Snakefile's default target rule
# Rules outside the default target (`snakemake proxy_oracle` runs them by name): the diagnostics.
ON_DEMAND_RULES = ("proxy_oracle", "attention_deviation")
HEADER = (
    "# Generated from the Snakemake rules (workflow/rules/*.smk) by workflow/scripts/sync_dvc.py:\n"
    "# edit the rules, then run `python workflow/scripts/sync_dvc.py`. tests/test_pipeline_dag.py\n"
    "# fails when this file and the rules disagree.\n"
)


class RuleDeclarationError(ValueError):
    """A rule that cannot be expressed as a DVC stage; the message names the rule and the fix."""


def _sentinel(wildcard: str) -> str:
    return f"@@{wildcard}@@"


def _command(job) -> str:
    """The rule's shell command without the trailing `> {log} 2>&1` that `stage()` appends."""
    cmd = " ".join(job.shellcmd.split())
    if len(job.log) != 1:
        raise RuleDeclarationError(f"rule {job.rule.name}: needs exactly one log: file (has {len(job.log)})")
    suffix = f"> {job.log[0]} 2>&1"
    if not cmd.endswith(suffix):
        raise RuleDeclarationError(
            f"rule {job.rule.name}: shell command must end with its log redirection ({suffix!r}); "
            "build it with stage() from workflow/rules/common.smk"
        )
    return cmd[: -len(suffix)].strip()


def _params(job, config: dict) -> list[str]:
    """The parameters of a rule: each `params:` keyword is a section, passed whole or as a dict of
    some of its keys (listed key by key)."""
    names = list(job.rule.params._names) if hasattr(job.rule.params, "_names") else []
    listed = []
    for name in names:
        if name not in config:
            raise RuleDeclarationError(
                f"rule {job.rule.name}: params keyword {name!r} is not a section of params.yaml; "
                "name each params entry after the section it passes (e.g. fisher=config['fisher'])"
            )
        value = job.params[name]
        if value == config[name]:
            listed.append(name)
        elif isinstance(value, dict) and all(k in config[name] and config[name][k] == v for k, v in value.items()):
            listed += [f"{name}.{key}" for key in sorted(value)]
        else:
            raise RuleDeclarationError(
                f"rule {job.rule.name}: params.{name} is neither config[{name!r}] nor a dict of some of its keys"
            )
    return listed


def _matrix(rule, jobs: list, config: dict) -> dict:
    """The DVC `matrix:` of a wildcard rule, checked against the jobs Snakemake scheduled."""
    from itertools import product

    names = list(jobs[0].wildcards_dict)
    unknown = [w for w in names if w not in MATRIX]
    if unknown:
        raise RuleDeclarationError(f"rule {rule.name}: wildcards {unknown} are not run-matrix wildcards {sorted(MATRIX)}")
    lists = [config[MATRIX[w][0]][MATRIX[w][1]] for w in names]
    expected = {tuple(str(v) for v in combo) for combo in product(*lists)}
    scheduled = {tuple(str(j.wildcards_dict[w]) for w in names) for j in jobs}
    if scheduled != expected:
        raise RuleDeclarationError(
            f"rule {rule.name}: jobs {sorted(scheduled)} are not the matrix {sorted(expected)} of "
            f"{', '.join('.'.join(MATRIX[w]) for w in names)}: a run that another rule reads (wiseft.of, "
            "diagnostics.run) must be in those lists for dvc.yaml")
    return {w: "${%s.%s}" % MATRIX[w] for w in names}


def _template(text: str, names) -> str:
    for w in names:
        text = text.replace(_sentinel(w), "${item.%s}" % w)
    return text


def _matrix_dir(pattern: str, rule_name: str) -> str:
    """`results/eval/runs/{method}-{seed}` (or `results/eval/less/less-{less_seed}`) -> `results/eval/runs`:
    where all jobs of a rule write, each in an entry of its own."""
    static = pattern.split("{", 1)[0]
    if "/" not in static or "/" in pattern[len(static):]:
        raise RuleDeclarationError(
            f"rule {rule_name}: output {pattern!r} must be a directory entry of its own (results/<dir>/<wildcards>) "
            "so that stages reading all its jobs can depend on the directory")
    return static.rsplit("/", 1)[0]


def snakemake_stages(root: Path = ROOT) -> tuple[dict, dict]:
    """DVC stage declarations of every shell job of the default DAG, from the Snakemake rules, and
    the top-level metrics/plots declarations."""
    from snakemake.api import SnakemakeApi
    from snakemake.jobs import Job
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import DAGSettings, OutputSettings, ResourceSettings

    stages: dict = {}
    extra: dict = {"metrics": [], "plots": []}
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL, Quietness.PROGRESS, Quietness.RULES,
                                            Quietness.HOST, Quietness.REASON})) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(), snakefile=root / "Snakefile", workdir=root)
        # the diagnostics diagnose an SFT run: without the SFT route there is none to diagnose
        routes = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("routes", ["sft"])
        on_demand = ON_DEMAND_RULES if "sft" in routes else ()
        workflow_api.dag(DAGSettings(forceall=True, targets=frozenset((DEFAULT_TARGET, *on_demand))))
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        config = workflow.config
        by_rule: dict = {}
        for level in workflow.dag.toposorted():
            for job in sorted(level, key=lambda j: (j.rule.name, sorted(j.wildcards_dict.items()))):
                if job.rule.shellcmd:  # not target rules such as `all`
                    by_rule.setdefault(job.rule.name, []).append(job)
        matrix_dirs: dict = {}  # output file of a matrix job -> the directory of all its jobs
        for name, jobs in by_rule.items():
            if jobs[0].wildcards_dict:
                for j in jobs:
                    for pattern, out in zip(j.rule.output, j.output):
                        matrix_dirs[str(out)] = _matrix_dir(str(pattern), name)
        for name, jobs in by_rule.items():
            job, stage = jobs[0], {}
            if job.wildcards_dict:
                stage["matrix"] = _matrix(job.rule, jobs, config)
                job = Job(job.rule, workflow.dag, wildcards_dict={w: _sentinel(w) for w in job.wildcards_dict})
                workflow.dag._jobid[job] = len(workflow.dag._jobid) + 1  # formatting the command needs an id
            elif len(jobs) > 1:
                raise RuleDeclarationError(f"rule {name}: several jobs without wildcards")
            deps = {matrix_dirs.get(str(f), str(f)) for f in job.input}
            names = list(job.wildcards_dict)
            outs = []
            named = {str(job.output[k]): k for k in (job.output._names or {})}
            command = _command(job)
            module = re.match(r"python -m (\S+)", command)
            resumable = module is not None and module.group(1) in RESUMABLE_STAGES
            for out in job.output:
                path = _template(str(out), names)
                if named.get(str(out)) == "metrics":
                    outs.append({path: {"cache": False}})
                    extra["metrics"].append(path)
                elif resumable:
                    outs.append({path: {"persist": True}})
                else:
                    outs.append(path)
                if named.get(str(out)) == "table_csv":  # the report's plots: table, curves, trade-off, images
                    from alphatoken.eval.report import dvc_plots
                    extra["plots"] += dvc_plots(str(Path(path).parent))
            stage.update({
                "cmd": _template(command, names),
                "deps": sorted(_template(d, names) for d in deps),
                "params": _params(job, config),
                "outs": outs,
            })
            stages[name] = stage
    return stages, {k: v for k, v in extra.items() if v}


def render(stages: dict, extra: dict) -> str:
    return HEADER + yaml.safe_dump({"stages": stages, **extra}, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with dvc.yaml instead of writing it")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    parser.add_argument("--use", type=Path, help="overlay to merge into params.yaml first (rewrites params.yaml)")
    args = parser.parse_args(argv)
    if args.use:
        params = args.root / "params.yaml"
        merged = merge_params(yaml.safe_load(params.read_text()), yaml.safe_load(args.use.read_text()) or {})
        params.write_text(f"# params.yaml with {args.use} merged in (workflow/scripts/sync_dvc.py --use)\n"
                          + yaml.safe_dump(merged, sort_keys=False, width=200))
    target = args.root / "dvc.yaml"
    try:
        text = render(*snakemake_stages(args.root.resolve()))
    except RuleDeclarationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.check:
        target.write_text(text)
        print(f"wrote {target}")
        return 0
    current = target.read_text() if target.is_file() else ""
    if current == text:
        print(f"{target} agrees with the Snakemake rules")
        return 0
    sys.stdout.writelines(difflib.unified_diff(
        current.splitlines(True), text.splitlines(True), f"{target} (on disk)", f"{target} (from the rules)"))
    print(f"\n{target} is stale: run `python workflow/scripts/sync_dvc.py`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
