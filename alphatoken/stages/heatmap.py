"""Stage heatmap: HTML heatmaps of the four score components and the total (paper Fig. 4/9) for a few
training examples, scored on a trained AlphaToken run (the proxy P = F * (W - W_ref) is zero on the
reference itself) against the target-validation batch, with the reference model's scored weights and
its Fisher, by `alphatoken.eval.heatmap.score_heatmap` (skipped and truncated examples are counted in
the page title and the log).

    python -m alphatoken.stages.heatmap --params params.yaml --section valuation --runs-section train \
        --runs results/train --reference results/model --fisher results/fisher.safetensors \
        --val-data results/data/val.jsonl --train-data results/data/train.jsonl --out results/report/heatmap.html
"""

from __future__ import annotations

from pathlib import Path

from alphatoken.data import DataError, read_split
from alphatoken.eval.heatmap import score_heatmap
from alphatoken.fisher import FisherMismatchError
from alphatoken.stages.common import (
    ParamsError, fail, log_run_environment, pick_device, read_section, stage_parser, to_config,
)
from alphatoken.valuation import ValuationConfig

EXAMPLES, MAX_LENGTH = 4, 512  # training examples shown; tokens per example


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs-section", required=True, help="section with the `methods` and `seeds` lists")
    for flag in ("--runs", "--reference", "--fisher", "--val-data", "--train-data", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    try:
        cfg = to_config(read_section(args.params, args.section), ValuationConfig)
        runs = read_section(args.params, args.runs_section)
        methods, seeds = runs.values.get("methods"), runs.values.get("seeds")
        if not isinstance(methods, list) or not isinstance(seeds, list) or not methods or not seeds:
            raise ParamsError(f"{runs.locate('methods')}: {args.runs_section}.methods and .seeds must be non-empty lists")
    except ParamsError as err:
        fail(str(err))
    method = "alphatoken" if "alphatoken" in methods else methods[0]  # scores of the method's own run
    run = Path(args.runs) / f"{method}-{seeds[0]}"
    log_run_environment("heatmap", pick_device(), args.params)
    try:
        val, train = read_split(args.val_data), read_split(args.train_data)
    except (DataError, FileNotFoundError) as err:
        fail(f"{err} (rerun prepare_data)")
    n_val = runs.values.get("val_examples") or 0  # the validation examples the runs' G used (0: all)
    val = val[:n_val] if n_val else val
    try:
        page = score_heatmap(run / "final", args.fisher, args.reference, val, train, cfg, args.out,
                             max_length=MAX_LENGTH, n=EXAMPLES, name=f"{run.name} ({method} run)")
    except FisherMismatchError as err:
        fail(f"{err} (rerun the fisher rule)")
    except ValueError as err:
        fail(str(err))
    print(f"[heatmap] {run.name} -> {page}")


if __name__ == "__main__":
    main()
