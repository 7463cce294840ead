"""The offline retention suite: deterministic task building from local sources, and an lm-eval run
on a tiny saved model that never touches a hub, whose multiple-choice accuracy equals a brute-force
log-likelihood ranking with the same model."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from alphatoken.eval.harness import OFFLINE_TASKS, build_offline_tasks, run_retention
from alphatoken.eval.tasks.arithmetic import word_problems
from alphatoken.eval.tasks.wordnet import Synset, definition_questions, parse_data_file
from alphatoken.models import build_tiny_model, byte_tokenizer, save_pretrained

N_PER_TASK = 12
LIMIT = 4


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return build_offline_tasks(tmp_path_factory.mktemp("tasks"), n_per_task=N_PER_TASK, seed=3)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_tasks_are_deterministic_and_well_formed(task_dir, tmp_path):
    again = build_offline_tasks(tmp_path / "again", n_per_task=N_PER_TASK, seed=3)
    for name in ("alphatoken_wordnet", "alphatoken_arithmetic", "alphatoken_pyline"):
        docs = read_jsonl(task_dir / f"{name}.jsonl")
        assert docs == read_jsonl(again / f"{name}.jsonl")
        assert len(docs) == N_PER_TASK
        spec = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        assert spec["task"] == name and spec["dataset_path"] == "json"
        assert all(Path(f).is_file() for f in spec["dataset_kwargs"]["data_files"].values())
    for name in ("alphatoken_wordnet", "alphatoken_pyline"):
        for doc in read_jsonl(task_dir / f"{name}.jsonl"):
            assert len(doc["choices"]) == 4 == len(set(doc["choices"]))
            assert 0 <= doc["label"] < 4
    train = {d["question"] for d in read_jsonl(task_dir / "alphatoken_arithmetic_train.jsonl")}
    for doc in read_jsonl(task_dir / "alphatoken_arithmetic.jsonl"):
        assert doc["question"] not in train
        assert doc["answer"].endswith(f"#### {doc['value']}")
    manifest = json.loads((task_dir / "manifest.json").read_text())
    assert manifest["tasks"]["alphatoken_wordnet"]["skipped"]["answer_in_definition"] > 0


def test_other_seed_gives_other_questions():
    synsets = [Synset(f"{i:08d}", "noun", (f"word{i}",), f"meaning number {i}") for i in range(50)]
    first, _ = definition_questions(synsets, 10, seed=0)
    assert first == definition_questions(synsets, 10, seed=0)[0]
    assert first != definition_questions(synsets, 10, seed=1)[0]
    for doc in first:
        assert doc["choices"][doc["label"]] == "word" + doc["definition"].split()[-1]
    assert word_problems(20, seed=0)[0] != word_problems(20, seed=1)[0]


def test_wordnet_parse_error_names_file_line_and_field(tmp_path):
    bad = tmp_path / "data.noun"
    bad.write_text("  1 licence header\n00001740 03 n 0z cat 0 000 | a feline\n")
    with pytest.raises(ValueError, match=r"data.noun:2: field 'w_cnt'"):
        parse_data_file(bad, "noun")
    good = tmp_path / "data.adj"
    good.write_text('00002312 00 a 02 abaxial 0 dorsal(a) 4 000 | facing away from the axis; "an example"  \n')
    [synset] = parse_data_file(good, "adj")
    assert synset.lemmas == ("abaxial", "dorsal") and synset.definition == "facing away from the axis"


def test_word_problems_are_distinct():
    docs, _ = word_problems(200, seed=0)
    assert len({d["question"] for d in docs}) == 200


def brute_force_accuracy(model, tokenizer, docs, template, delimiter):
    """Pick the choice with the highest summed log-probability of its tokens after the context."""
    correct = 0
    for doc in docs:
        context = template(doc)
        scores = []
        for choice in doc["choices"]:
            context_ids = tokenizer(context)["input_ids"]
            ids = tokenizer(context + delimiter + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(float(logp[p - 1, ids[p]]) for p in range(len(context_ids), len(ids))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return 100.0 * correct / len(docs)


def test_lm_eval_runs_offline_on_a_tiny_model(task_dir, tmp_path, monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)  # the suite must set them for its child itself
    tokenizer = byte_tokenizer()
    # float32: the harness only needs a real checkpoint, and float64 generation is slow on CPU
    model = build_tiny_model("qwen2", dtype=torch.float32)
    save_pretrained(model, tokenizer, tmp_path / "model")
    raw_path = tmp_path / "raw.json"
    metrics = run_retention(tmp_path / "model", "offline", limit=LIMIT, task_dir=task_dir,
                            raw_results_path=raw_path)
    assert set(metrics) == set(OFFLINE_TASKS)
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    raw = json.loads(raw_path.read_text())
    assert raw["n-shot"] == {"alphatoken_wordnet": 0, "alphatoken_arithmetic": 5, "alphatoken_pyline": 0}
    assert all(raw["n-samples"][t]["effective"] == LIMIT for t in OFFLINE_TASKS)

    wordnet_docs = read_jsonl(task_dir / "alphatoken_wordnet.jsonl")[:LIMIT]
    expected = brute_force_accuracy(model, tokenizer, wordnet_docs,
                                    lambda d: f"Definition: {d['definition']}\nWord:", " ")
    assert metrics["alphatoken_wordnet"] == pytest.approx(expected)
    pyline_docs = read_jsonl(task_dir / "alphatoken_pyline.jsonl")[:LIMIT]
    expected = brute_force_accuracy(model, tokenizer, pyline_docs, lambda d: d["context"], "\n")
    assert metrics["alphatoken_pyline"] == pytest.approx(expected)


def test_unknown_suite_or_task_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown suite"):
        run_retention(tmp_path, "nope")
    with pytest.raises(ValueError, match=r"\['gsm8k'\] are not in the offline suite"):
        run_retention(tmp_path, "offline", tasks=["gsm8k"])


def test_paper_suite_maps_to_lm_eval_task_configs():
    """The paper suite (App. C.3, Table 5) against lm-eval's own task configs, without any download:
    ARC-C and HellaSwag 0-shot accuracy (`acc`, the paper reports "Accuracy", not normalised), MMLU
    5-shot accuracy (the group's size-weighted `acc`), GSM8K 5-shot exact match after the strict
    "#### <number>" answer extraction."""
    from lm_eval.tasks import TaskManager

    from alphatoken.eval.harness import PAPER_TASKS

    assert PAPER_TASKS == {"arc_challenge": (0, "acc,none"), "hellaswag": (0, "acc,none"),
                           "mmlu": (5, "acc,none"), "gsm8k": (5, "exact_match,strict-match")}
    index = TaskManager().task_index
    for task in ("arc_challenge", "hellaswag"):
        cfg = index[task].cfg
        assert cfg["output_type"] == "multiple_choice"
        assert "acc" in [m["metric"] for m in cfg["metric_list"]]
    assert [m["metric"] for m in index["mmlu"].cfg["aggregate_metric_list"]] == ["acc"]
    gsm8k = index["gsm8k"].cfg
    assert [m["metric"] for m in gsm8k["metric_list"]] == ["exact_match"]
    assert "strict-match" in [f["name"] for f in gsm8k["filter_list"]]
    assert gsm8k["num_fewshot"] == 5  # also passed explicitly by run_retention
