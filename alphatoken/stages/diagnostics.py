"""Stage diagnostics: the paper's App. D.1 (Fisher-drift proxy vs oracle retention-gradient scores,
`alphatoken.eval.proxy_oracle`) or D.2 (attention weight vs value-output deviation over causal-window
pairs, `alphatoken.eval.attention_deviation`) on one trained run, for a seeded draw of training examples.

    python -m alphatoken.stages.diagnostics --diagnostic proxy_oracle --params params.yaml --section diagnostics \
        --valuation-section valuation --train-section train --eval-section eval --run results/train/alphatoken-0 \
        --reference results/model --fisher results/fisher.safetensors --train-data results/data/train.jsonl \
        --out results/diagnostics/proxy_oracle
    python -m alphatoken.stages.diagnostics --diagnostic attention_deviation --params params.yaml --section diagnostics \
        --valuation-section valuation --run results/train/alphatoken-0 --train-data results/data/train.jsonl \
        --out results/diagnostics/attention
"""

from __future__ import annotations

from pathlib import Path

from alphatoken.data import DataError, read_split
from alphatoken.eval.diagnostics import DiagnosticsConfig
from alphatoken.fisher import FisherMismatchError
from alphatoken.stages.common import (
    ParamsError, fail, log_run_environment, pick_device, read_section, split_section, stage_parser, to_config,
)
from alphatoken.valuation import ValuationConfig

EVAL_KEYS = ("suite", "limit", "task_limits", "drift_docs")  # what decides the documents the evaluation reads


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--diagnostic", required=True, choices=("proxy_oracle", "attention_deviation"))
    for flag in ("--valuation-section", "--run", "--train-data", "--out"):
        parser.add_argument(flag, required=True)
    for flag in ("--train-section", "--eval-section", "--reference", "--fisher"):
        parser.add_argument(flag, help="proxy_oracle only")
    args = parser.parse_args(argv)
    oracle = args.diagnostic == "proxy_oracle"
    if oracle and not all((args.train_section, args.eval_section, args.reference, args.fisher)):
        parser.error("proxy_oracle needs --train-section, --eval-section, --reference and --fisher")
    try:
        _, section = split_section(read_section(args.params, args.section), ("run",))  # `run` names the rule's input
        cfg = to_config(section, DiagnosticsConfig)
        valuation = to_config(read_section(args.params, args.valuation_section), ValuationConfig)
        if oracle:
            train = read_section(args.params, args.train_section)
            if "rho" not in train.values:
                raise ParamsError(f"{train.locate('rho')}: missing: the top-rho overlap uses the runs' retained ratio")
            rho = train.values["rho"]
            eval_values = read_section(args.params, args.eval_section).values
            eval_settings = {k: eval_values[k] for k in EVAL_KEYS if k in eval_values}
    except ParamsError as err:
        fail(str(err))
    log_run_environment(args.diagnostic, pick_device(), args.params)
    model_dir = Path(args.run) / "final"
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir}: no final checkpoint (rerun the train rule for {Path(args.run).name})")
    try:
        examples = read_split(args.train_data)
    except (DataError, FileNotFoundError) as err:
        fail(f"{err} (rerun prepare_data)")
    try:
        if oracle:
            from alphatoken.eval.proxy_oracle import run_proxy_oracle

            summary = run_proxy_oracle(model_dir, args.reference, args.fisher, examples, valuation, rho, eval_settings,
                                       cfg, args.out, name=Path(args.run).name)
            print(f"[proxy_oracle] pearson={summary['pearson']} spearman={summary['spearman']} "
                  f"top_overlap={summary['top_overlap']}")
        else:
            from alphatoken.eval.attention_deviation import run_attention_deviation

            summary = run_attention_deviation(model_dir, examples, valuation.last_k, valuation.window, cfg, args.out,
                                              name=Path(args.run).name)
            print(f"[attention_deviation] pairs={summary['pairs']} fraction_below={summary['fraction_below']}")
    except FisherMismatchError as err:
        fail(f"{err} (rerun the fisher rule)")
    except ValueError as err:
        fail(str(err))


if __name__ == "__main__":
    main()
