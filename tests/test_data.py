"""alphatoken.data: loaders and their error reporting, chat-template encoding, padding, splits."""

import json
import random

import pytest
import torch

from alphatoken.data import (
    IGNORE_INDEX,
    ChatExample,
    DataError,
    DataLimits,
    ExampleDropped,
    PreferenceExample,
    collate,
    content_key,
    encode_chat,
    encode_examples,
    encode_preference,
    load_hub_dataset,
    load_jsonl,
    make_splits,
    map_rows,
    prompt_key,
    read_split,
    write_splits,
)
from alphatoken.models import build_tiny_model


def chat(i, prompt=None, response=None):
    return ChatExample(f"ex{i}", [{"role": "user", "content": prompt or f"question {i}"},
                                  {"role": "assistant", "content": response or f"answer {i}"}], "unit")


GOOD = json.dumps({"prompt": "What is 2+2?", "response": "4"})

# (name, bad line bytes, kind, limits, field named in the message, drop reason)
BAD_LINES = [
    ("malformed_json", b'{"messages": [', "chat", DataLimits(), "<json>", "bad_json"),
    ("not_an_object", b"[1, 2]", "chat", DataLimits(), "<record>", "bad_record"),
    ("missing_response", b'{"prompt": "hi"}', "chat", DataLimits(), "response", "missing_field"),
    ("missing_messages", b'{"text": "hi"}', "chat", DataLimits(), "messages", "missing_field"),
    ("missing_content", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}', "chat",
     DataLimits(), "messages[1].content", "missing_field"),
    ("wrong_role", b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}', "chat",
     DataLimits(), "messages[1].role", "bad_role"),
    ("last_not_assistant", b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "chat", DataLimits(), "messages[1].role", "bad_role"),
    ("late_system", b'{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, '
     b'{"role": "assistant", "content": "b"}]}', "chat", DataLimits(), "messages[1].role", "bad_role"),
    ("content_not_string", b'{"prompt": "a", "response": 7}', "chat", DataLimits(), "response", "bad_type"),
    ("empty_response", b'{"prompt": "a", "response": "   "}', "chat", DataLimits(), "response", "empty_response"),
    ("overlong_response", b'{"prompt": "a", "response": "0123456789ABC"}', "chat",
     DataLimits(max_response_chars=10), "response", "response_too_long"),
    ("not_utf8", b'{"prompt": "caf\xe9", "response": "x"}', "chat", DataLimits(), "<line>", "not_utf8"),
    ("pref_missing_rejected", b'{"prompt": "a", "chosen": "b"}', "preference", DataLimits(), "rejected",
     "missing_field"),
    ("pref_empty_chosen", b'{"prompt": "a", "chosen": "", "rejected": "c"}', "preference", DataLimits(),
     "chosen", "empty_response"),
    ("pref_prompt_mismatch",
     b'{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
     b'"rejected": [{"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "c"}]}',
     "preference", DataLimits(), "rejected", "prompt_mismatch"),
]


def _write_lines(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("name,bad,kind,limits,field,reason", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_line_raises_with_file_line_field(tmp_path, name, bad, kind, limits, field, reason):
    good = GOOD.encode() if kind == "chat" else json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode()
    path = _write_lines(tmp_path / "in.jsonl", [good, bad, good])
    with pytest.raises(DataError) as err:
        load_jsonl(path, kind, limits)
    message = str(err.value)
    assert f"{path}:2:" in message, message
    assert f"field `{field}`" in message, message


@pytest.mark.parametrize("name,bad,kind,limits,field,reason", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_line_dropped_and_counted_in_manifest(tmp_path, name, bad, kind, limits, field, reason):
    good = GOOD.encode() if kind == "chat" else json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode()
    path = _write_lines(tmp_path / "in.jsonl", [good, bad, good])
    drop = DataLimits(**{**limits.__dict__, "on_error": "drop"})
    result = load_jsonl(path, kind, drop)
    assert len(result.examples) == 2 and result.rows_read == 3
    assert dict(result.dropped.counts) == {reason: 1}
    assert result.dropped.examples[reason][0].startswith(f"{path}:2: field `{field}`")
    # The drop travels into the split manifest.
    examples = result.examples + [chat(i) for i in range(5)]
    if kind == "preference":
        examples = result.examples + [PreferenceExample(f"p{i}", [{"role": "user", "content": f"q{i}"}], "c", "r", "u")
                                      for i in range(5)]
    paths = write_splits(make_splits(examples, 1, 1, seed=0), tmp_path / "out", {"inputs": [result.manifest()]})
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["inputs"][0]["dropped"]["counts"] == {reason: 1}


def test_blank_lines_are_counted_not_silent(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(GOOD + "\n\n" + GOOD + "\n")
    result = load_jsonl(path)
    assert len(result.examples) == 2 and dict(result.dropped.counts) == {"blank_line": 1}


def test_accepted_record_forms(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}], "id": "m1"},
        {"prompt": "u", "response": "a", "system": "s"},
        {"prompt": [{"role": "user", "content": "u"}], "response": "b"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = load_jsonl(path, source="mine")
    assert [e.id for e in result.examples] == ["m1", "mine:2", "mine:3"]
    assert result.examples[0].messages == result.examples[1].messages
    assert result.examples[2].response == "b" and result.examples[2].prompt == [{"role": "user", "content": "u"}]
    prefs = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "prompt_id": "uf1",
         "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]},
    ]
    path = tmp_path / "pref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prefs))
    examples = load_jsonl(path, "preference").examples
    assert [e.id for e in examples][2] == "uf1"
    assert all((e.prompt, e.chosen, e.rejected) == ([{"role": "user", "content": "q"}], "good", "bad") for e in examples)


def test_max_examples_stops_early(tmp_path):
    path = _write_lines(tmp_path / "in.jsonl", [GOOD.encode()] * 5)
    result = load_jsonl(path, limits=DataLimits(max_examples=3))
    assert len(result.examples) == 3 and result.rows_read == 3


# ---------------------------------------------------------------- hub mappings (no hub access)


def test_hub_mappings_on_in_memory_rows():
    from datasets import Dataset

    magicoder = Dataset.from_list([
        {"lang": "python", "problem": "Write add(a, b).", "solution": "def add(a, b):\n    return a + b", "seed": "x"},
    ])
    result = map_rows(magicoder, "magicoder", "magicoder[train]")
    (example,) = result.examples
    assert example.messages == [{"role": "user", "content": "Write add(a, b)."},
                                {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]
    assert example.source == "ise-uiuc/Magicoder-OSS-Instruct-75K"

    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "more"}, {"role": "assistant", "content": "sure"}]
    ultrachat = Dataset.from_list([{"prompt": "hi", "prompt_id": "abc", "messages": conversation}])
    (example,) = map_rows(ultrachat, "ultrachat", "ultrachat[train_sft]").examples
    assert example.id == "abc" and example.messages == conversation and example.response == "sure"

    ultrafeedback = Dataset.from_list([{
        "prompt": "hi", "prompt_id": "p1", "score_chosen": 8.0, "score_rejected": 3.0,
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}],
    }])
    (example,) = map_rows(ultrafeedback, "ultrafeedback", "uf[train_prefs]").examples
    assert (example.id, example.prompt, example.chosen, example.rejected) == (
        "p1", [{"role": "user", "content": "hi"}], "good", "bad")


def test_hub_mapping_bad_row_names_dataset_row_and_field():
    from datasets import Dataset

    rows = Dataset.from_list([{"problem": "p", "solution": "s"}, {"problem": "p", "solution": ""}])
    with pytest.raises(DataError, match=r"magicoder\[train\]:1: field `solution`"):
        map_rows(rows, "magicoder", "magicoder[train]")
    dropped = map_rows(rows, "magicoder", "magicoder[train]", DataLimits(on_error="drop")).dropped
    assert dict(dropped.counts) == {"empty_response": 1}


def test_hub_loader_local_path_override(tmp_path):
    path = tmp_path / "magicoder.jsonl"
    path.write_text(json.dumps({"problem": "Write f.", "solution": "def f(): pass"}) + "\n"
                    + json.dumps({"problem": "Write g."}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: field `solution`"):
        load_hub_dataset("magicoder", local_path=str(path))
    result = load_hub_dataset("magicoder", DataLimits(on_error="drop"), local_path=str(path))
    assert [e.response for e in result.examples] == ["def f(): pass"]
    assert dict(result.dropped.counts) == {"missing_field": 1}
    with pytest.raises(FileNotFoundError, match="local override"):
        load_hub_dataset("ultrachat", local_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_hub_dataset("nope")


# ---------------------------------------------------------------- encoding


def labelled_text(tokenizer, feature):
    return tokenizer.decode([t for t in feature["labels"] if t != IGNORE_INDEX])


def check_labels_only_on_response(tokenizer, example, feature):
    ids, labels = feature["input_ids"], feature["labels"]
    assert len(ids) == len(labels)
    labelled = [t for t, y in enumerate(labels) if y != IGNORE_INDEX]
    assert labelled == list(range(labelled[0], len(ids)))  # one contiguous span at the end
    assert all(labels[t] == ids[t] for t in labelled)
    assert labelled_text(tokenizer, feature) == example.response + tokenizer.eos_token
    prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[: labelled[0]]) == prompt_text


@pytest.mark.parametrize("with_system", [False, True])
def test_labels_only_on_assistant_tokens_byte_tokenizer(tokenizer, with_system):
    example = chat(0, "Reverse a list.\nKeep it short.", "def rev(x):\n    return x[::-1]  # ünïcode")
    if with_system:
        example = ChatExample("s", [{"role": "system", "content": "Be terse."}] + example.messages, "unit")
    check_labels_only_on_response(tokenizer, example, encode_chat(example, tokenizer, 512))


def test_labels_on_all_assistant_turns(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]
    example = ChatExample("m", messages, "unit")
    last = encode_chat(example, tokenizer, 512)
    every = encode_chat(example, tokenizer, 512, assistant_turns="all")
    assert last["input_ids"] == every["input_ids"]
    assert labelled_text(tokenizer, last) == "second<|im_end|>"
    assert labelled_text(tokenizer, every) == "first<|im_end|>second<|im_end|>"


def test_smollm2_template_injects_default_system_prompt():
    from transformers import AutoTokenizer

    from alphatoken.models import EMBEDDED_GGUF, embedded_gguf_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_gguf_dir(), gguf_file=EMBEDDED_GGUF)
    example = chat(1, "Write a function that adds two numbers.", "def add(a, b):\n    return a + b")
    feature = encode_chat(example, tokenizer, 512)
    check_labels_only_on_response(tokenizer, example, feature)
    prompt = tokenizer.decode(feature["input_ids"][: feature["labels"].index(next(y for y in feature["labels"] if y != -100))])
    assert prompt.startswith("<|im_start|>system\n") and "SmolLM" in prompt  # the injected default
    # Same tokens as tokenizing the whole rendering at once (no merge across the boundary here).
    full = tokenizer.apply_chat_template(example.messages, tokenize=False).removesuffix("\n")
    assert feature["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]


def test_end_of_turn_override_and_fallback(tokenizer):
    example = chat(0, "q", "resp")
    assert labelled_text(tokenizer, encode_chat(example, tokenizer, 64, end_of_turn="<|im_end|>")) == "resp<|im_end|>"
    # A token that never ends the turn: the whole assistant piece, template tail included, is labelled.
    assert labelled_text(tokenizer, encode_chat(example, tokenizer, 64, end_of_turn="<|pad|>")) == "resp<|im_end|>\n"


def test_written_split_reads_back_through_load_jsonl(tmp_path):
    examples = [chat(i) for i in range(6)]
    paths = write_splits(make_splits(examples, 1, 1, seed=0), tmp_path)
    loaded = load_jsonl(paths["train"]).examples
    assert loaded == read_split(paths["train"]) and {e.source for e in loaded} == {"unit"}


def test_template_without_prefix_property_is_rejected():
    from alphatoken.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    # A template that renders the generation prompt differently from a finished turn.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>ASSISTANT\n' }}{% endif %}"
    )
    with pytest.raises(ValueError, match="prefix"):
        encode_chat(chat(0), tokenizer, 512)


def test_overlong_drop_truncate_error(tokenizer):
    example = chat(0, "short prompt", "x" * 100)
    n_prompt = encode_chat(example, tokenizer, 10_000)["labels"].count(IGNORE_INDEX)
    with pytest.raises(ExampleDropped) as err:
        encode_chat(example, tokenizer, n_prompt + 10)
    assert err.value.reason == "too_long"
    with pytest.raises(ValueError, match="max_length"):
        encode_chat(example, tokenizer, n_prompt + 10, overlong="error")
    cut = encode_chat(example, tokenizer, n_prompt + 10, overlong="truncate")
    assert len(cut["input_ids"]) == n_prompt + 10 and labelled_text(tokenizer, cut) == "x" * 10
    # A prompt that leaves no room for a response token is dropped even when truncating.
    for mode in ("drop", "truncate", "error"):
        with pytest.raises(ExampleDropped) as err:
            encode_chat(example, tokenizer, n_prompt, overlong=mode)
        assert err.value.reason == "prompt_too_long"


def test_encode_examples_counts_drops(tokenizer):
    examples = [chat(0), chat(1, "p" * 300), chat(2, response="r" * 300), chat(3)]
    result = encode_examples(examples, tokenizer, 200)
    assert result.ids == ["ex0", "ex3"]
    assert dict(result.dropped.counts) == {"prompt_too_long": 1, "too_long": 1}


def test_encode_preference_shares_prompt(tokenizer):
    example = PreferenceExample("p", [{"role": "user", "content": "Which is larger, 2 or 3?"}], "3", "2 is larger", "u")
    pair = encode_preference(example, tokenizer, 512)
    n = pair["chosen"]["labels"].count(IGNORE_INDEX)
    assert pair["rejected"]["labels"].count(IGNORE_INDEX) == n
    assert pair["chosen"]["input_ids"][:n] == pair["rejected"]["input_ids"][:n]
    assert labelled_text(tokenizer, pair["chosen"]) == "3<|im_end|>"
    assert labelled_text(tokenizer, pair["rejected"]) == "2 is larger<|im_end|>"


# ---------------------------------------------------------------- collate


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding(side):
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(features, pad_token_id=0, padding_side=side)
    assert all(v.shape == (2, 3) and v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"][0].tolist() == [5, 6, 7] and batch["attention_mask"][0].tolist() == [1, 1, 1]
    if side == "right":
        assert batch["input_ids"][1].tolist() == [8, 0, 0]
        assert batch["attention_mask"][1].tolist() == [1, 0, 0]
        assert batch["labels"][1].tolist() == [8, -100, -100]
    else:
        assert batch["input_ids"][1].tolist() == [0, 0, 8]
        assert batch["attention_mask"][1].tolist() == [0, 0, 1]
        assert batch["labels"][1].tolist() == [-100, -100, 8]


def test_right_padded_batch_loss_matches_unpadded_examples(tokenizer):
    """The padded batch gives each example the same summed token loss as running it alone."""
    model = build_tiny_model("llama", dtype=torch.float64)
    features = [encode_chat(chat(i, "q" * (3 * i + 1), "a" * (i + 2)), tokenizer, 512) for i in range(3)]
    batch = collate(features, tokenizer.pad_token_id, "right")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
    for b, f in enumerate(features):
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        alone = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], labels[0, 1:],
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
        assert torch.allclose(nll[b].sum(), alone, atol=1e-9)


# ---------------------------------------------------------------- splits


def corpus(n=60):
    examples = [chat(i) for i in range(n)]
    examples += [chat(100 + i, prompt=f"question {i}", response=f"other answer {i}") for i in range(0, n, 10)]
    examples += [ChatExample(f"dup{i}", chat(i).messages, "unit") for i in range(5)]  # exact duplicates
    return examples


def test_splits_deterministic_and_seed_dependent(tmp_path):
    a = write_splits(make_splits(corpus(), 4, 8, seed=1), tmp_path / "a")
    b = write_splits(make_splits(corpus(), 4, 8, seed=1), tmp_path / "b")
    c = write_splits(make_splits(corpus(), 4, 8, seed=2), tmp_path / "c")
    for name in ("train", "val", "fisher", "manifest"):
        assert a[name].read_bytes() == b[name].read_bytes()
    assert a["val"].read_bytes() != c["val"].read_bytes()
    shuffled = corpus()
    random.Random(7).shuffle(shuffled)
    d = write_splits(make_splits(shuffled, 4, 8, seed=1), tmp_path / "d")
    for name in ("train", "val", "fisher"):
        assert a[name].read_bytes() == d[name].read_bytes()  # independent of input order


def test_splits_disjoint_and_counted(tmp_path):
    examples = corpus()
    splits = make_splits(examples, 4, 8, seed=3)
    assert (len(splits.val), len(splits.fisher)) == (4, 8)
    parts = {name: getattr(splits, name) for name in ("train", "val", "fisher")}
    contents = {name: {content_key(e) for e in part} for name, part in parts.items()}
    prompts = {name: {prompt_key(e) for e in part} for name, part in parts.items()}
    for x, y in (("train", "val"), ("train", "fisher"), ("val", "fisher")):
        assert not contents[x] & contents[y] and not prompts[x] & prompts[y]
    assert all(len(contents[n]) == len(parts[n]) for n in parts)  # no duplicates inside a part
    stats = splits.stats
    assert stats["duplicates_removed"] == 5
    assert stats["train"] + stats["val"] + stats["fisher"] + stats["removed_sharing_heldout_prompt"] == len(examples) - 5
    manifest = json.loads(write_splits(splits, tmp_path)["manifest"].read_text())
    assert manifest["counts"] == {"train": stats["train"], "val": 4, "fisher": 8, "test": 0} and manifest["seed"] == 3
    assert manifest["sources"]["val"] == {"unit": 4}
    import hashlib
    assert manifest["sha256"]["val.jsonl"] == hashlib.sha256((tmp_path / "val.jsonl").read_bytes()).hexdigest()
    assert read_split(tmp_path / "train.jsonl") == splits.train
    with pytest.raises(ValueError, match="distinct prompts"):
        make_splits(examples[:10], 5, 5, seed=0)


def test_test_hold_out_is_disjoint_and_leaves_the_other_hold_outs_unchanged(tmp_path):
    examples = corpus()
    without = make_splits(examples, 4, 8, seed=3)
    splits = make_splits(examples, 4, 8, seed=3, n_test=6)
    assert splits.val == without.val and splits.fisher == without.fisher  # drawn after them
    assert len(splits.test) == 6
    prompts = {name: {prompt_key(e) for e in getattr(splits, name)} for name in ("train", "val", "fisher", "test")}
    for other in ("train", "val", "fisher"):
        assert not prompts["test"] & prompts[other], other
    # the test examples (and any example sharing their prompts) left the training pool, counted
    assert {prompt_key(e) for e in without.train} - prompts["train"] == prompts["test"]
    removed = splits.stats["removed_sharing_heldout_prompt"] - without.stats["removed_sharing_heldout_prompt"]
    assert len(without.train) - len(splits.train) == 6 + removed
    paths = write_splits(splits, tmp_path)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["counts"]["test"] == 6 and manifest["stats"]["test"] == 6
    assert read_split(paths["test"]) == splits.test
    with pytest.raises(ValueError, match="n_val \\+ n_fisher \\+ n_test = 70"):
        make_splits(examples, 4, 8, seed=3, n_test=58)


def test_read_split_reports_bad_line(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"id": "a", "source": "s", "messages": []}) + "\n{oops\n")
    with pytest.raises(DataError, match=rf"{path}:2: field `<json>`"):
        read_split(path)
