# AlphaToken pipeline. Every rule lives in workflow/rules/; dvc.yaml is generated from them
# (python workflow/scripts/sync_dvc.py).
#   snakemake --cores 2                                    default DAG, this machine
#   snakemake --cores 2 --configfile configs/smoke.yaml    the same DAG on a tiny model
#   snakemake --profile slurm                              on a SLURM cluster (workflow/profiles/slurm)

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.27")  # the pin of pyproject.toml


configfile: "params.yaml"


# Stages read their section from the parameter files, layered like Snakemake's: params.yaml, then
# every --configfile overlay. A --config KEY=VALUE override would reach the rules' params but not
# the stages, so it is refused with the fix, before the schema check would report its value's type.
if workflow.config_settings.config:  # --config KEY=VALUE (the --configfile overlays are fine)
    raise WorkflowError(
        "--config overrides are not seen by the stages, which read parameter files: put the "
        "values in a YAML overlay (like configs/smoke.yaml) and pass it with --configfile"
    )


# The merged parameters (params.yaml and every --configfile overlay) against their schema (types, ranges,
# no unknown keys) before any job starts; the stages check the section they read against the same file
# (alphatoken.stages.common.SCHEMA_PATH), for DVC.
validate(config, "workflow/schemas/config.schema.yaml")


envvars:
    "PATH",  # stage commands find `python` (the venv running Snakemake) through it


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/fisher.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/less.smk"  # LESS (less.enabled): selection, its runs and their evaluations
include: "workflow/rules/wiseft.smk"  # Wise-FT merges of a trained run (wiseft.alphas; none by default)
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/dpo.smk"
include: "workflow/rules/diagnostics.smk"  # run by name (not in `all`): proxy_oracle, attention_deviation


rule all:
    input:
        rules.report.output if "sft" in routes() else [],
        # rows outside the matrix (alphatoken.runs: less, wiseft_a<alpha>), also inputs of the report
        [run.eval_dir for run in extra_runs("sft")] if "sft" in routes() else [],
        rules.heatmap.output if "sft" in routes() else [],
        rules.report_dpo.output if "dpo" in routes() else [],
    default_target: True
