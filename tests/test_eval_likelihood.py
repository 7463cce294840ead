"""Teacher-forced metrics against per-token loops over log_softmax (float64 tiny models, padded
batches), which tokens each metric scores, the seeded document subset, and the per-example files."""

import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from alphatoken.data import ChatExample, encode_chat
from alphatoken.eval import humaneval, mbpp
from alphatoken.eval.examples import read_per_example, write_per_example
from alphatoken.eval.likelihood import (
    SolutionExample,
    encode_continuation,
    encode_for_nll,
    encode_solution,
    gold_continuation,
    gold_continuation_drift,
    humaneval_solution_examples,
    mbpp_solution_examples,
    mean_se,
    response_nll,
    select_docs,
    solution_nll,
)
from alphatoken.eval.sandbox import run_in_sandbox
from alphatoken.models import build_tiny_model
from alphatoken.train.batches import encode_dataset
from conftest import BATCHING_TOL, TINY_ARCHS

MAX_LENGTH = 60


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat(i: int, prompt: str, response: str) -> ChatExample:
    return ChatExample(f"ex{i}", [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], "unit")


EXAMPLES = [
    chat(0, "Add.", "def add(a, b):\n    return a + b"),
    chat(1, "Name a colour.", "Blue."),
    chat(2, "Square it.", "x * x"),
    chat(3, "Long answer, please.", "word " * 20),  # overlong: truncated at MAX_LENGTH
    chat(4, "p" * 60, "unreachable"),  # the prompt alone exceeds MAX_LENGTH: skipped
    chat(5, "Hi", "Hello there, how are you?"),
]


@torch.no_grad()
def naive_token_log_probs(model, ids: list[int], t: int) -> torch.Tensor:
    """log pi(. | ids[:t]) from a forward over the prefix alone: (V,) float64."""
    logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]  # (V,)
    return torch.log_softmax(logits.double(), dim=-1)


def naive_mean_nll(model, feature: dict) -> float:
    """Mean over the labelled tokens t of -log pi(ids[t] | ids[:t]), one prefix forward per token."""
    ids, labels = feature["input_ids"], feature["labels"]
    nll = [-naive_token_log_probs(model, ids, t)[ids[t]] for t in range(1, len(ids)) if labels[t] != -100]
    return float(sum(nll) / len(nll))


def naive_drift(model, reference, feature: dict) -> dict:
    ids, labels = feature["input_ids"], feature["labels"]
    kl, nll, nll_ref = [], [], []
    for t in range(1, len(ids)):
        if labels[t] == -100:
            continue
        logp, logq = naive_token_log_probs(model, ids, t), naive_token_log_probs(reference, ids, t)
        kl.append(float((logq.exp() * (logq - logp)).sum()))  # KL(reference || model)
        nll.append(-float(logp[ids[t]]))
        nll_ref.append(-float(logq[ids[t]]))
    n = len(kl)
    return {"kl": sum(kl) / n, "nll": sum(nll) / n, "nll_reference": sum(nll_ref) / n,
            "nll_change": (sum(nll) - sum(nll_ref)) / n}


def assert_close(fast, slow, what: str, tol: float = BATCHING_TOL):
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(fast, slow))
    assert len(fast) == len(slow) and worst <= tol, f"{what}: max relative error {worst:.3g} > {tol}"


# ----------------------------------------------------------------------------------------------
# response_nll


def test_response_nll_encodes_as_training_and_counts_truncation(tokenizer):
    features, ids, truncated, skipped = encode_for_nll(tokenizer, EXAMPLES, MAX_LENGTH)
    training, stats = encode_dataset(tokenizer, EXAMPLES, MAX_LENGTH)  # what the training loop trains on
    assert features == training and stats.skipped == skipped == {"prompt_too_long": 1}
    assert ids == ["ex0", "ex1", "ex2", "ex3", "ex5"]
    full = [len(encode_chat(e, tokenizer, 10**6)["input_ids"]) for e in EXAMPLES]
    assert truncated == sum(n > MAX_LENGTH for i, n in enumerate(full) if i != 4) == 1


def test_response_nll_matches_per_token_loop(tiny_model, tokenizer):
    result = response_nll(tiny_model, tokenizer, EXAMPLES, MAX_LENGTH, batch_size=3)
    features, _, _, _ = encode_for_nll(tokenizer, EXAMPLES, MAX_LENGTH)
    assert_close(result.values, [naive_mean_nll(tiny_model, f) for f in features], "response NLL")
    assert result.ids == ("ex0", "ex1", "ex2", "ex3", "ex5") and result.truncated == 1
    assert result.skipped == {"prompt_too_long": 1}
    assert result.tokens == sum(sum(y != -100 for y in f["labels"][1:]) for f in features)
    assert result.mean == pytest.approx(statistics.fmean(result.values), abs=1e-12)
    assert result.se == pytest.approx(statistics.stdev(result.values) / math.sqrt(5), abs=1e-12)


def test_response_nll_does_not_depend_on_batching(tokenizer):
    model = build_tiny_model("qwen2", dtype=torch.float64)
    one = response_nll(model, tokenizer, EXAMPLES, MAX_LENGTH, batch_size=1).values
    all_at_once = response_nll(model, tokenizer, EXAMPLES, MAX_LENGTH, batch_size=8).values
    assert_close(all_at_once, one, "batch 8 vs 1")


def test_response_nll_refuses_duplicate_ids_and_nothing_scorable(tokenizer):
    model = build_tiny_model("llama", dtype=torch.float64)
    with pytest.raises(ValueError, match="duplicate example id 'ex1'"):
        response_nll(model, tokenizer, [EXAMPLES[1], EXAMPLES[1]], MAX_LENGTH)
    with pytest.raises(ValueError, match="no example could be scored.*prompt_too_long"):
        response_nll(model, tokenizer, [EXAMPLES[4]], MAX_LENGTH)


# ----------------------------------------------------------------------------------------------
# solution_nll


SOLUTIONS = [
    SolutionExample("s0", "Complete:\ndef inc(x):", "```python\ndef inc(x):\n", "    return x + 1\n", "```"),
    SolutionExample("s1", "Double it.", "```python\n", "def double(x):\n    return 2 * x", "\n```"),
    SolutionExample("s2", "Empty?", "```python\n", "pass", "\n```"),
]


def scored_text(tokenizer, feature: dict) -> str:
    return tokenizer.decode([y for y in feature["labels"] if y != -100])


def test_solution_tokens_are_exactly_the_solution_with_byte_tokens(tokenizer):
    # One token per byte: the scored tokens spell the solution, nothing before or after it.
    for example in SOLUTIONS + humaneval_solution_examples(humaneval.load_problems(3)):
        feature, truncated = encode_solution(example, tokenizer, 10**6)
        assert scored_text(tokenizer, feature) == example.solution and not truncated
        conversation = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer}]
        # The same ids as training's encoding of the conversation, up to the last solution token.
        full = encode_chat(ChatExample(example.id, conversation, "unit"), tokenizer, 10**6)["input_ids"]
        assert full[: len(feature["input_ids"])] == feature["input_ids"]


def test_solution_nll_matches_per_token_loop(tiny_model, tokenizer):
    result = solution_nll(tiny_model, tokenizer, SOLUTIONS, max_length=80, batch_size=2)
    features = [encode_solution(e, tokenizer, 80)[0] for e in SOLUTIONS]
    assert_close(result.values, [naive_mean_nll(tiny_model, f) for f in features], "solution NLL")
    assert result.ids == ("s0", "s1", "s2") and result.tokens == sum(len(e.solution) for e in SOLUTIONS)


def test_solution_truncation_is_counted_and_an_unreachable_solution_skipped(tokenizer):
    model = build_tiny_model("llama", dtype=torch.float64)
    prompt_len = len(encode_solution(SOLUTIONS[1], tokenizer, 10**6)[0]["input_ids"]) - len(SOLUTIONS[1].solution)
    feature, truncated = encode_solution(SOLUTIONS[1], tokenizer, prompt_len + 3)
    assert truncated and scored_text(tokenizer, feature) == SOLUTIONS[1].solution[:3]
    result = solution_nll(model, tokenizer, SOLUTIONS[1:2] + SOLUTIONS[0:1], max_length=prompt_len + 3)
    assert result.truncated == 1 and result.skipped == {"prompt_too_long": 1} and result.ids == ("s1",)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from alphatoken.models import EMBEDDED_GGUF, embedded_gguf_dir

    return AutoTokenizer.from_pretrained(embedded_gguf_dir(), gguf_file=EMBEDDED_GGUF)


def test_solution_tokens_with_a_real_tokenizer_and_the_generators_format(smollm_tokenizer):
    """With SmolLM2's BPE the prompt ids are the ones the generator feeds; the scored tokens spell the
    solution except leading whitespace merged into the token that starts in the prefix; and the
    answer, read by the generators' own extraction, passes the benchmark's tests in the sandbox."""
    tok = smollm_tokenizer
    he = humaneval.load_problems(3)
    mb = mbpp.load_mbpp_problems(3)
    for example in humaneval_solution_examples(he) + mbpp_solution_examples(mb):
        feature, _ = encode_solution(example, tok, 10**6)
        user = [{"role": "user", "content": example.prompt}]
        generator_ids = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert feature["input_ids"][: len(generator_ids)] == list(generator_ids)
        assert all(y == -100 for y in feature["labels"][: len(generator_ids)])
        text = scored_text(tok, feature)
        assert example.solution.endswith(text) and not example.solution[: len(example.solution) - len(text)].strip(), example.id
        code = humaneval.extract_code(example.answer)
        if example.id in he:
            program = humaneval.check_program(he[example.id], humaneval.completion_from_code(code, he[example.id]))
        else:
            program = mbpp.check_program(mb[example.id], code)
        assert run_in_sandbox(program, 10.0, 1024).passed, example.id


# ----------------------------------------------------------------------------------------------
# gold_continuation_drift


DOCS = [
    {"id": "wn-1", "context": "Definition: a small domesticated feline.\nWord:", "choices": [" dog", " cat", " fox"], "gold": 1},
    {"id": "py-7", "context": "def f(x):\n    y = x + 1\n", "choices": ["    return y\n", "    pass\n"], "gold": 0},
    {"id": "gsm-3", "context": "Question: Tom has 2 apples and buys 3. How many?\nAnswer:", "answer": "2 + 3 = 5.\n#### 5"},
    {"id": "gsm-4", "context": "Question: 4 minus 1?\nAnswer: ", "answer": "4 - 1 = 3.\n#### 3"},
]


def test_gold_continuation_and_lm_eval_encoding(tokenizer):
    from lm_eval.api.model import TemplateLM

    assert gold_continuation(DOCS[0]) == (DOCS[0]["context"], " cat")
    assert gold_continuation(DOCS[2]) == (DOCS[2]["context"], " 2 + 3 = 5.\n#### 5")
    assert gold_continuation(DOCS[3]) == (DOCS[3]["context"], "4 - 1 = 3.\n#### 3")
    lm = SimpleNamespace(backend="causal", tok_encode=lambda s, add_special_tokens=None: tokenizer(s)["input_ids"])
    for doc in DOCS:
        context, continuation = gold_continuation(doc)
        context_enc, continuation_enc = TemplateLM._encode_pair(lm, context, continuation)  # lm-eval's own code
        feature, truncated = encode_continuation(tokenizer, context, continuation, 10**6)
        assert feature["input_ids"] == context_enc + continuation_enc and not truncated
        assert [y for y in feature["labels"] if y != -100] == continuation_enc
    feature, truncated = encode_continuation(tokenizer, *gold_continuation(DOCS[2]), 12)
    assert truncated and len(feature["input_ids"]) == 12 and all(y != -100 for y in feature["labels"])
    with pytest.raises(ValueError, match="'gold' is not an index"):
        gold_continuation({**DOCS[0], "gold": 3})
    with pytest.raises(ValueError, match="neither 'choices' nor a non-empty 'answer'"):
        gold_continuation({"id": "x", "context": "c"})


def test_retention_benchmark_documents_give_their_own_gold_text(tokenizer):
    from alphatoken.eval.benchmarks import BENCHMARKS, load_benchmark

    for name in BENCHMARKS:
        for doc in select_docs(load_benchmark(name), 3, seed=0):
            context, continuation = gold_continuation(doc)
            gold = doc["choices"][doc["gold"]] if "choices" in doc else doc["answer"]
            assert (context, continuation) == (doc["context"], gold) and continuation[:1] == " ", doc["id"]
            feature, _ = encode_continuation(tokenizer, context, continuation, 10**6)
            assert tokenizer.decode([y for y in feature["labels"] if y != -100]) == continuation


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_drift_matches_per_token_loop(arch, tokenizer):
    tiny_model = build_tiny_model(arch, dtype=torch.float64)
    reference = build_tiny_model(arch, dtype=torch.float64, seed=1)
    result = gold_continuation_drift(tiny_model, reference, tokenizer, DOCS, batch_size=3, name="unit")
    features = [encode_continuation(tokenizer, *gold_continuation(d), 10**6)[0] for d in DOCS]
    slow = [naive_drift(tiny_model, reference, f) for f in features]
    for key in ("kl", "nll", "nll_reference", "nll_change"):
        assert result[key].name == f"unit/{key}" and result[key].ids == tuple(d["id"] for d in DOCS)
        assert_close(result[key].values, [s[key] for s in slow], key)
    assert min(result["kl"].values) > 1e-4  # different weights: a KL the comparison can see


def test_drift_of_a_model_against_itself_is_zero(tokenizer):
    model = build_tiny_model("gemma3", dtype=torch.float64)
    result = gold_continuation_drift(model, model, tokenizer, DOCS, batch_size=2)
    assert result["kl"].values == (0.0,) * 4 and result["nll_change"].values == (0.0,) * 4
    assert result["nll"].values == result["nll_reference"].values and result["kl"].se == 0.0


def test_select_docs_is_seeded_and_depends_only_on_ids():
    docs = [{"id": f"d{i}", "context": "c", "answer": str(i)} for i in range(50)]
    first = [d["id"] for d in select_docs(docs, 10, seed=0)]
    assert [d["id"] for d in select_docs(docs[::-1], 10, seed=0)] == first  # input order does not matter
    assert [d["id"] for d in select_docs(docs[:25] + docs[25:], 10, seed=0)] == first
    assert [d["id"] for d in select_docs(docs, 10, seed=1)] != first and len(set(first)) == 10
    assert [d["id"] for d in select_docs(docs, None, seed=0)][:10] == first
    with pytest.raises(ValueError, match="cannot select 51 of 50"):
        select_docs(docs, 51)
    with pytest.raises(ValueError, match="duplicate example id 'd0'"):
        select_docs(docs + docs[:1], 5)


# ----------------------------------------------------------------------------------------------
# Per-example files and the standard error


def test_mean_se_is_the_sample_standard_error():
    values = [1.0, 2.0, 4.0, 8.0]
    mean, se = mean_se(values)
    assert mean == 3.75 and se == pytest.approx(statistics.stdev(values) / 2.0, abs=1e-15)
    assert math.isnan(mean_se([1.0])[1])
    with pytest.raises(ValueError, match="no examples"):
        mean_se([])


def test_per_example_rows_round_trip_and_bad_rows_are_located(tmp_path, tokenizer):
    model = build_tiny_model("llama", dtype=torch.float64)
    rows = response_nll(model, tokenizer, EXAMPLES[:3], MAX_LENGTH).rows()
    path = write_per_example(rows, tmp_path / "per_example.jsonl")
    assert read_per_example(path) == rows and rows[0]["metric"] == "response_nll"

    with pytest.raises(ValueError, match=r"dup.jsonl:4: duplicate \(metric, id\).*first on line 1"):
        write_per_example(rows + rows[:1], tmp_path / "dup.jsonl")
    assert not (tmp_path / "dup.jsonl").exists()
    with pytest.raises(ValueError, match=r"nan.jsonl:1: field 'value' is not finite"):
        write_per_example([{"metric": "m", "id": "a", "value": float("nan")}], tmp_path / "nan.jsonl")

    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in rows]
    for text, message in [
        (lines + [lines[1]], r"bad.jsonl:4: duplicate \(metric, id\).*first on line 2"),
        (lines[:1] + ['{"metric": "m", "id": "x", "value": Infinity}'], r"bad.jsonl:2: field 'value' is not finite"),
        (lines[:1] + ['{"metric": "m", "value": 1.0}'], r"bad.jsonl:2: field 'id' missing"),
        (lines[:1] + ['{"metric": "m", "id": "x", "value": "1"}'], r"bad.jsonl:2: field 'value' missing or not a number"),
        (lines[:1] + ['{"metric": "m", "id": "x", "value": 1, "extra": 2}'], r"bad.jsonl:2: field 'extra' is not one of"),
        (["{not json"], r"bad.jsonl:1: not valid JSON"),
    ]:
        bad.write_text("\n".join(text) + "\n")
        with pytest.raises(ValueError, match=message):
            read_per_example(bad)
