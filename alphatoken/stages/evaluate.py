"""Stage evaluate: one checkpoint on the retention suite (lm-eval), HumanEval and MBPP pass@1 (in the
sandbox), the target NLLs (the test hold-out --test-data, HumanEval's and MBPP's reference solutions)
and, with a reference checkpoint, the drift metrics (KL and NLL change on the retention benchmarks'
gold continuations, KL on own answers to target-validation prompts), by
`alphatoken.eval.suite.evaluate_checkpoint` with the `EvalConfig` of the parameter section; writes
--out/metrics.json (percentages; NLLs and KLs in nats per token), --out/per_example.jsonl and the raw
outputs beside them.

    python -m alphatoken.stages.evaluate --params params.yaml --section eval --model results/train/full-0/final \
        --reference results/model --prompts results/data/val.jsonl --test-data results/data/test.jsonl \
        --out results/eval/runs/full-0
"""

from __future__ import annotations

from alphatoken.data import DataError, read_split
from alphatoken.eval.suite import EvalConfig, evaluate_checkpoint
from alphatoken.stages.common import ParamsError, fail, log_run_environment, pick_device, read_section, stage_parser, to_config


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory to evaluate")
    parser.add_argument("--reference", help="reference checkpoint for the KL (omitted for the base model)")
    parser.add_argument("--prompts", help="chat examples whose prompts the KL is measured on")
    parser.add_argument("--test-data", help="the target corpus' test hold-out (target NLL; omitted: not measured)")
    parser.add_argument("--out", required=True, help="directory for metrics.json and the raw outputs")
    args = parser.parse_args(argv)
    try:
        cfg = to_config(read_section(args.params, args.section), EvalConfig)
    except ParamsError as err:
        fail(str(err))
    log_run_environment("evaluate", pick_device(), args.params)
    prompts = None
    if args.reference and args.prompts and cfg.kl_prompts:
        try:
            prompts = [ex.prompt[-1]["content"] for ex in read_split(args.prompts)[: cfg.kl_prompts]]
        except (DataError, FileNotFoundError, TypeError) as err:
            fail(f"{err} (--prompts must be a split written by prepare_data)")
    test = None
    if args.test_data:
        try:
            test = read_split(args.test_data)
        except (DataError, FileNotFoundError, TypeError) as err:
            fail(f"{err} (--test-data must be a split written by prepare_data)")
        if not test:
            fail(f"{args.test_data} holds no example: set data.n_test > 0 to measure the target NLL")
    try:
        metrics = evaluate_checkpoint(args.model, args.out, cfg, reference_dir=args.reference, kl_prompts=prompts,
                                      test_examples=test)
    except RuntimeError as err:
        fail(f"{err}\n(retention suite {cfg.suite!r} failed: for `paper` the lm-eval datasets must be cached)")
    print(f"[evaluate] {args.model}: {metrics}")


if __name__ == "__main__":
    main()
