"""Stage evaluate: one checkpoint on the retention suite (lm-eval), HumanEval pass@1 and, with a
reference checkpoint, KL(model || reference) on target-validation prompts; writes the paper's metrics
to --out/metrics.json (percentages; `KL` in nats) and the raw outputs beside it.

    python -m alphatoken.stages.evaluate --params params.yaml --section eval --model results/train/full-0/final \
        --reference results/model --prompts results/data/val.jsonl --out results/eval/runs/full-0
"""

from __future__ import annotations

import json
from pathlib import Path

from alphatoken.data import DataError, read_split
from alphatoken.eval.drift import kl_to_reference
from alphatoken.eval.harness import build_offline_tasks, run_retention
from alphatoken.eval.humaneval import HumanEvalConfig, run_humaneval
from alphatoken.eval.report import sft_metrics, write_metrics_json
from alphatoken.models import ModelSpec, load_model
from alphatoken.stages.common import ParamsError, fail, log_run_environment, pick_device, read_section, stage_parser

DEFAULTS = {"suite": "offline", "limit": None, "n_per_task": 100, "batch_size": 1, "humaneval_limit": None,
            "max_new_tokens": 512, "kl_prompts": 0, "kl_max_new_tokens": 64, "dtype": "float32"}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory to evaluate")
    parser.add_argument("--reference", help="reference checkpoint for the KL (omitted for the base model)")
    parser.add_argument("--prompts", help="chat examples whose prompts the KL is measured on")
    parser.add_argument("--out", required=True, help="directory for metrics.json and the raw outputs")
    args = parser.parse_args(argv)
    try:
        section = read_section(args.params, args.section)
        unknown = sorted(set(section.values) - set(DEFAULTS))
        if unknown:
            raise ParamsError(f"{section.locate(unknown[0])}: unknown field(s) {unknown}; expected some of {sorted(DEFAULTS)}")
        cfg = {**DEFAULTS, **section.values}
        if cfg["suite"] not in ("offline", "paper"):
            raise ParamsError(f"{section.locate('suite')}: expected offline or paper, got {cfg['suite']!r}")
    except ParamsError as err:
        fail(str(err))
    device = pick_device()
    log_run_environment("evaluate", device, args.params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = build_offline_tasks(out / "tasks", n_per_task=cfg["n_per_task"]) if cfg["suite"] == "offline" else None
    try:
        retention = run_retention(args.model, cfg["suite"], cfg["limit"], device, cfg["batch_size"], task_dir=tasks,
                                  dtype=cfg["dtype"], raw_results_path=out / "retention.json")
    except RuntimeError as err:
        fail(f"{err}\n(retention suite {cfg['suite']!r} failed: for `paper` the lm-eval datasets must be cached)")
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=args.model, dtype=cfg["dtype"]), device)
    humaneval = run_humaneval(model, tokenizer, out / "humaneval",
                              HumanEvalConfig(limit=cfg["humaneval_limit"], max_new_tokens=cfg["max_new_tokens"]))
    metrics = sft_metrics(retention, humaneval["pass@1"])  # percentages
    if args.reference and cfg["kl_prompts"]:
        try:
            examples = read_split(args.prompts)[: cfg["kl_prompts"]]
        except (DataError, FileNotFoundError, TypeError) as err:
            fail(f"{err} (--prompts must be a split written by prepare_data)")
        reference, _ = load_model(ModelSpec(source="hub", name_or_path=args.reference, dtype=cfg["dtype"]), device)
        prompts = [ex.prompt[-1]["content"] for ex in examples]
        metrics["KL"] = kl_to_reference(model, reference, tokenizer, prompts, cfg["kl_max_new_tokens"])
    write_metrics_json(metrics, out / "metrics.json")
    (out / "humaneval" / "summary.json").write_text(json.dumps(
        {k: v for k, v in humaneval.items() if k != "results"}, indent=2, sort_keys=True) + "\n")
    print(f"[evaluate] {args.model}: {metrics}")


if __name__ == "__main__":
    main()
