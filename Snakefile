# AlphaToken pipeline. Every rule lives in workflow/rules/; dvc.yaml is generated from them
# (python workflow/scripts/sync_dvc.py).
#   snakemake --cores 2                                    default DAG, this machine
#   snakemake --cores 2 --configfile configs/smoke.yaml    the same DAG on a tiny model
#   snakemake --profile slurm                              on a SLURM cluster (workflow/profiles/slurm)

configfile: "params.yaml"


envvars:
    "PATH",  # stage commands find `python` (the venv running Snakemake) through it


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/fisher.smk"


rule all:
    input:
        rules.fisher.output,
    default_target: True
