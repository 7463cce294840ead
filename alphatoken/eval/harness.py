"""General-capability retention with lm-evaluation-harness (paper §5.1, App. C.3, Table 5).

Two suites, both run through `lm_eval.simple_evaluate(model="hf", model_args="pretrained=PATH,...")`
in a child interpreter:

- "paper" (clusters with the datasets cached or hub access): ARC-C 0-shot (acc), HellaSwag 0-shot
  (acc), MMLU 5-shot (acc), GSM8K 5-shot (exact match, "####" extraction).
- "offline" (no network; what tests and default runs use): lm-eval tasks defined in YAML over JSONL
  files that `build_offline_tasks` writes from local sources:
  WordNet definitions 0-shot 4-way multiple choice (acc), templated arithmetic word problems 5-shot
  exact match with GSM8K's "####" extraction, next line of stdlib Python 0-shot 4-way multiple choice
  (acc). The child runs with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE set and
  the tasks read only `dataset_path: json` with local `data_files`, so nothing reaches a hub.

All returned metrics are percentages, as in the paper's tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import alphatoken
from alphatoken.eval.tasks import arithmetic, python_lines, wordnet

# task -> (num_fewshot, lm-eval metric key reported)
PAPER_TASKS = {
    "arc_challenge": (0, "acc,none"),
    "hellaswag": (0, "acc,none"),
    "mmlu": (5, "acc,none"),
    "gsm8k": (5, "exact_match,strict-match"),
}
OFFLINE_TASKS = {
    "alphatoken_wordnet": (0, "acc,none"),
    "alphatoken_arithmetic": (5, "exact_match,strict-match"),
    "alphatoken_pyline": (0, "acc,none"),
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _write_jsonl(docs: list[dict], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
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
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
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
        "metric_list": [{
            "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
            "ignore_case": True, "ignore_punctuation": False,
            "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
        }],
        "generation_kwargs": {
            "until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "max_gen_toks": 64,
        },
        "filter_list": [
            {"name": "strict-match", "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"}]},
        ],
        "metadata": {"version": 1.0},
    }


def build_offline_tasks(
    out_dir: str | Path,
    n_per_task: int = 500,
    seed: int = 0,
    *,
    wordnet_dir: str | Path = "/usr/share/wordnet",
    n_fewshot_pool: int = 50,
) -> Path:
    """Write the offline suite (JSONL data + lm-eval YAML + `manifest.json`) to `out_dir`; return it.

    Deterministic in (n_per_task, seed, the WordNet files, the Python version). The manifest records
    document counts, skipped items per reason, the Python version and the settings.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"seed": seed, "n_per_task": n_per_task, "python": sys.version.split()[0], "tasks": {}}

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

    docs, skipped_files = python_lines.next_line_questions(n_per_task, seed)
    data = _write_jsonl(docs, out / "alphatoken_pyline.jsonl")
    spec = _multiple_choice_yaml("alphatoken_pyline", data, "{{context}}", target_delimiter="\n")
    manifest["tasks"]["alphatoken_pyline"] = {"n": len(docs), "skipped": {"unreadable_files": skipped_files}}
    (out / "alphatoken_pyline.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# The child: runs lm-eval for each few-shot setting, writes the raw results (no per-sample logs).
_CHILD = r"""
import json, sys
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
spec = json.load(open(sys.argv[1]))
if spec["task_dir"]:
    manager = TaskManager(include_path=spec["task_dir"], include_defaults=False)
else:
    manager = TaskManager()
lm = get_model("hf").create_from_arg_string(
    spec["model_args"], {"batch_size": spec["batch_size"], "device": spec["device"]})  # loaded once
merged = {"results": {}, "n-shot": {}, "versions": {}, "n-samples": {}}
for shots, tasks in spec["groups"].items():
    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=int(shots), limit=spec["limit"], task_manager=manager,
        log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=1234,
        torch_random_seed=1234, fewshot_random_seed=1234,
    )
    for key in merged:
        merged[key].update(out.get(key, {}))
json.dump(merged, open(sys.argv[2], "w"), indent=2, default=str)
"""


def run_retention(
    model_path: str | Path,
    suite: str = "offline",
    limit: int | float | None = None,
    device: str = "cpu",
    batch_size: int | str = 1,
    *,
    task_dir: str | Path | None = None,
    tasks: list[str] | None = None,
    dtype: str = "auto",
    raw_results_path: str | Path | None = None,
) -> dict[str, float]:
    """Evaluate an HF checkpoint directory on the retention suite; return {task: percent}.

    suite: "offline" (tasks from `task_dir`, built with `build_offline_tasks`; built into a temporary
        directory with the defaults when None) or "paper" (lm-eval's own ARC-C/HellaSwag/MMLU/GSM8K).
    limit: documents per task (lm-eval's `limit`; a float in (0, 1) is a fraction), None = all.
    tasks: a subset of the suite's tasks (default: all of them).
    raw_results_path: where to keep lm-eval's merged raw results JSON (default: discarded).
    """
    if suite not in ("offline", "paper"):
        raise ValueError(f"unknown suite {suite!r}; expected 'offline' or 'paper'")
    table = OFFLINE_TASKS if suite == "offline" else PAPER_TASKS
    tasks = list(tasks or table)
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the {suite} suite {list(table)}")
    groups: dict[str, list[str]] = {}
    for task in tasks:
        groups.setdefault(str(table[task][0]), []).append(task)

    with tempfile.TemporaryDirectory(prefix="alphatoken-retention-") as tmp:
        if suite == "offline" and task_dir is None:
            task_dir = build_offline_tasks(Path(tmp) / "tasks")
        spec = {
            "task_dir": str(Path(task_dir).resolve()) if suite == "offline" else None,
            "groups": groups,
            "model_args": f"pretrained={Path(model_path).resolve() if Path(model_path).exists() else model_path},dtype={dtype}",
            "limit": limit,
            "device": device,
            "batch_size": batch_size,
        }
        spec_path, results_path = Path(tmp) / "spec.json", Path(tmp) / "results.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)  # the child inherits the caller's environment (caches, tokens, CUDA)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(alphatoken.__file__).parents[1]), env.get("PYTHONPATH", "")])
        if suite == "offline":
            env.update(OFFLINE_ENV)
        run = subprocess.run([sys.executable, "-c", _CHILD, str(spec_path), str(results_path)],
                             env=env, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"lm-eval failed for {model_path} on {tasks}:\n{run.stderr[-4000:]}")
        raw = json.loads(results_path.read_text())
        if raw_results_path is not None:
            Path(raw_results_path).parent.mkdir(parents=True, exist_ok=True)
            Path(raw_results_path).write_text(json.dumps(raw, indent=2))

    metrics = {}
    for task in tasks:
        key = table[task][1]
        values = raw["results"].get(task, {})
        if key not in values:
            raise KeyError(f"lm-eval results for {task!r} have no {key!r}; keys: {sorted(values)}")
        metrics[task] = 100.0 * float(values[key])
    return metrics
