"""Generate dvc.yaml from the Snakemake rules, so the two front ends run one declaration.

    python workflow/scripts/sync_dvc.py            # rewrite dvc.yaml
    python workflow/scripts/sync_dvc.py --check    # exit 1 (with a diff) when dvc.yaml is stale

Every job of the default DAG (`snakemake --forceall`, default parameters) that runs a shell command
becomes one DVC stage with
    cmd     the rule's shell command without its log redirection,
    deps    the rule's inputs: upstream outputs and the stage's source files (its import closure
            inside alphatoken/, see stagedeps.py), so a library edit reruns the stages importing it,
    params  the parameter sections the rule lists in `params:` (each keyword is a section name),
    outs    the rule's outputs.
Rules with wildcards become one stage per job, named `rule-<wildcard values>`.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HEADER = (
    "# Generated from the Snakemake rules (workflow/rules/*.smk) by workflow/scripts/sync_dvc.py:\n"
    "# edit the rules, then run `python workflow/scripts/sync_dvc.py`. tests/test_pipeline_dag.py\n"
    "# fails when this file and the rules disagree.\n"
)


class RuleDeclarationError(ValueError):
    """A rule that cannot be expressed as a DVC stage; the message names the rule and the fix."""


def _stage_name(job) -> str:
    values = [str(v) for v in job.wildcards_dict.values()]
    return "-".join([job.rule.name, *values])


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
    """The parameter sections of a rule: each `params:` keyword must be a section passed whole."""
    names = list(job.rule.params._names) if hasattr(job.rule.params, "_names") else []
    for name in names:
        if name not in config:
            raise RuleDeclarationError(
                f"rule {job.rule.name}: params keyword {name!r} is not a section of params.yaml; "
                "name each params entry after the section it passes (e.g. fisher=config['fisher'])"
            )
        if job.params[name] != config[name]:
            raise RuleDeclarationError(
                f"rule {job.rule.name}: params.{name} is not config[{name!r}]; pass whole sections"
            )
    return names


def snakemake_stages(root: Path = ROOT) -> dict:
    """DVC stage declarations of every shell job of the default DAG, from the Snakemake rules."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import DAGSettings, OutputSettings, ResourceSettings

    stages: dict = {}
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL, Quietness.PROGRESS, Quietness.RULES,
                                            Quietness.HOST, Quietness.REASON})) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(), snakefile=root / "Snakefile", workdir=root)
        workflow_api.dag(DAGSettings(forceall=True))
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        for job in workflow.dag.toposorted():
            for j in sorted(job, key=_stage_name):
                if not j.rule.shellcmd:
                    continue  # target rules such as `all`
                stages[_stage_name(j)] = {
                    "cmd": _command(j),
                    "deps": sorted(str(f) for f in j.input),
                    "params": _params(j, workflow.config),
                    "outs": [str(f) for f in j.output],
                }
    return stages


def render(stages: dict) -> str:
    return HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with dvc.yaml instead of writing it")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    target = args.root / "dvc.yaml"
    text = render(snakemake_stages(args.root.resolve()))
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
