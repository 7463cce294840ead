"""Pipeline stages: thin command-line entry points, one per DAG node (`python -m alphatoken.stages.NAME`).

Each stage reads only its own section of the parameter files named on its command line
(`--params params.yaml [overlay.yaml ...] --section NAME`), calls one library function and writes
its artifacts. Snakemake (`workflow/rules/*.smk`) and DVC (`dvc.yaml`, generated from the rules by
`workflow/scripts/sync_dvc.py`) run exactly the same commands.
"""
