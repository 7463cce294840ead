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
    require_examples,
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
    # JSON that parses but is not the text it seems: a NUL character (written as \u0000), a key given twice
    ("nul_in_response", b'{"prompt": "a", "response": "b\\u0000c"}', "chat", DataLimits(), "response", "nul_byte"),
    ("nul_in_message", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\u0000"}]}',
     "chat", DataLimits(), "messages[1].content", "nul_byte"),
    ("nul_in_unused_field", b'{"prompt": "a", "response": "b", "note": "x\\u0000"}', "chat", DataLimits(), "note",
     "nul_byte"),
    ("duplicate_key", b'{"prompt": "a", "response": "first", "response": "second"}', "chat", DataLimits(), "response",
     "duplicate_key"),
    ("duplicate_nested_key", b'{"messages": [{"role": "user", "content": "a"}, '
     b'{"role": "assistant", "content": "b", "content": "c"}]}', "chat", DataLimits(), "messages[1].content",
     "duplicate_key"),
    ("pref_identical", b'{"prompt": "a", "chosen": "same", "rejected": " same\\n"}', "preference", DataLimits(),
     "rejected", "identical_responses"),
    ("pref_identical_turns",
     b'{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], '
     b'"rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "preference", DataLimits(), "rejected", "identical_responses"),
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


def test_no_record_names_the_real_cause(tmp_path):
    """An empty file, a file of blank lines and a file whose every line was dropped each say so (with
    the drop counts), instead of failing later on the hold-out sizes."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{path}: empty \(0 lines\): no chat example to read$"):
        require_examples(load_jsonl(path), "chat example")
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"^{path}: no chat example: all 2 lines are blank$"):
        require_examples(load_jsonl(path), "chat example")
    _write_lines(path, [b"{oops", b"[1]", b'{"prompt": "a", "response": "b", "response": "c"}'])
    with pytest.raises(DataError) as err:
        require_examples(load_jsonl(path, limits=DataLimits(on_error="drop")), "chat example")
    assert str(err.value).startswith(f"{path}: no usable chat example: all 3 lines were dropped (by reason: "
                                     "{'bad_json': 1, 'bad_record': 1, 'duplicate_key': 1}); the first: "
                                     f"{path}:1: field `<json>`: malformed JSON")
    require_examples(load_jsonl(_write_lines(path, [GOOD.encode()])))  # one record: fine


def test_hub_rows_with_a_nul_character_are_refused():
    from datasets import Dataset

    rows = Dataset.from_list([{"problem": "p", "solution": "s"}, {"problem": "p\x00", "solution": "s"}])
    with pytest.raises(DataError, match=r"magicoder\[train\]:1: field `problem`: contains a NUL character"):
        map_rows(rows, "magicoder", "magicoder[train]")
    assert dict(map_rows(rows, "magicoder", "m", DataLimits(on_error="drop")).dropped.counts) == {"nul_byte": 1}


def test_read_split_refuses_nul_and_duplicate_keys(tmp_path):
    path = tmp_path / "train.jsonl"
    row = {"id": "a", "source": "s", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r\x00"}]}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: field `messages\[1\].content`: contains a NUL"):
        read_split(path)
    path.write_text('{"id": "a", "id": "b", "source": "s", "messages": []}\n')
    with pytest.raises(DataError, match=rf"{path}:1: field `id`: the key appears more than once"):
        read_split(path)


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


# ---------------------------------------------------------------- the stages that load data


def _prepare(tmp_path, lines: list, kind: str = "chat", on_error: str = "raise", n_val: int = 1):
    """Run the prepare_data stage on `lines`; (exit code or None, stderr, output directory)."""
    import contextlib
    import io

    from alphatoken.stages import prepare_data

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b"".join(line + b"\n" for line in lines))
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  n_val: {n_val}\n  n_fisher: 1\n  n_test: 0\n  seed: 0\n  on_error: {on_error}\n")
    out, err = tmp_path / "out", io.StringIO()
    argv = ["--params", str(params), "--section", "data", "--corpus", str(corpus), "--kind", kind, "--out", str(out)]
    code = None
    with contextlib.redirect_stderr(err):
        try:
            prepare_data.main(argv)
        except SystemExit as exit_info:
            code = exit_info.code
    return code, err.getvalue(), out


def test_prepare_data_blames_the_real_cause_and_keeps_the_drop_counts(tmp_path):
    code, err, out = _prepare(tmp_path, [])
    assert code == 2 and "corpus.jsonl: empty (0 lines): no chat example to read" in err
    assert "n_val" not in err
    code, err, out = _prepare(tmp_path, [b"{oops", b"[1]", b'{"prompt": "a"}'], on_error="drop")
    assert code == 2 and "no usable chat example: all 3 lines were dropped" in err and "n_val" not in err
    report = json.loads((out / "drop_report.json").read_text())
    assert report["rows_read"] == 3 and report["dropped"]["counts"] == {"bad_json": 1, "bad_record": 1, "missing_field": 1}
    assert f"what was read and dropped: {out / 'drop_report.json'}" in err
    # enough records but too few prompts for the hold-outs: now the sizes are the cause
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() for i in range(2)] + [b"{oops"]
    code, err, out = _prepare(tmp_path, lines, on_error="drop", n_val=1)
    assert code == 2 and "need more than n_val + n_fisher + n_test = 2 distinct prompts, have 2" in err
    assert "among the 2 records" in err and "(1 lines dropped): lower data.n_val / n_fisher / n_test" in err
    assert json.loads((out / "drop_report.json").read_text())["dropped"]["counts"] == {"bad_json": 1}
    # a later success: the manifest has the counts, the earlier failure's report is gone
    lines.append(json.dumps({"prompt": "q9", "response": "a9"}).encode())
    code, err, out = _prepare(tmp_path, lines, on_error="drop")
    assert code is None and not (out / "drop_report.json").exists()
    assert json.loads((out / "manifest.json").read_text())["dropped"]["counts"] == {"bad_json": 1}


def test_prepare_data_never_writes_a_nul_a_duplicate_key_or_an_empty_pair(tmp_path):
    good = [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}).encode() for i in range(4)]
    nul = json.dumps({"prompt": "qn", "response": "a\u0000b"}).encode()
    twice = b'{"prompt": "qd", "response": "first", "response": "second"}'
    code, err, out = _prepare(tmp_path, good + [nul, twice])
    assert code == 2 and "corpus.jsonl:5: field `response`: contains a NUL character" in err
    assert "set data.on_error: drop" in err
    code, err, out = _prepare(tmp_path, good + [nul, twice], on_error="drop")
    assert code is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dropped"]["counts"] == {"duplicate_key": 1, "nul_byte": 1}
    written = "".join((out / f"{name}.jsonl").read_text() for name in ("train", "val", "fisher", "test"))
    assert "\\u0000" not in written and "first" not in written and "second" not in written
    pairs = [json.dumps({"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"}).encode() for i in range(4)]
    same = json.dumps({"prompt": "qs", "chosen": "x", "rejected": "x"}).encode()
    code, err, out = _prepare(tmp_path, pairs + [same], kind="preference", on_error="drop")
    assert code is None and json.loads((out / "manifest.json").read_text())["dropped"]["counts"] == {
        "identical_responses": 1}


CLAMP_MODULE = '''
def clamp(value, low, high):
    """Clamp the value into the closed interval from low to high, both ends included."""
    if value < low:
        return low
    return min(value, high)
'''


def test_build_corpus_fails_when_every_row_of_a_hub_dataset_is_dropped(tmp_path, capsys):
    """A preference dataset read from a local copy whose every row is bad: exit 2 naming the cause,
    with the drop counts in a report (before: exit 0 and an empty preference.jsonl)."""
    from alphatoken.stages import build_corpus

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mod.py").write_text(CLAMP_MODULE)
    local = _write_lines(tmp_path / "uf.jsonl", [
        b'{"prompt": "q", "chosen": "c"}',
        json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}).encode(),
        b"{oops"])
    params = tmp_path / "params.yaml"
    params.write_text(f"corpus:\n  stdlib_dir: {tmp_path / 'lib'}\n  min_doc_chars: 10\n  preference_dataset: ultrafeedback\n"
                      f"  preference_local_path: {local}\n")
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit) as exit_info:
        build_corpus.main(["--params", str(params), "--section", "corpus", "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {local}: no usable preference pair: all 3 lines were dropped (by reason: {{'bad_json': 1, " \
           "'identical_responses': 1, 'missing_field': 1})" in err
    assert "corpus.preference_dataset='ultrafeedback'" in err
    report = json.loads((out / "drop_report.json").read_text())
    assert report["preference"]["dropped"]["total"] == 3
    # one good row: the corpus is written, the row counted, the report of the failure removed
    local.write_text(local.read_text() + json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n")
    build_corpus.main(["--params", str(params), "--section", "corpus", "--out", str(out)])
    assert len(read_split(out / "preference.jsonl")) == 1 and not (out / "drop_report.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hub"]["preference"]["dropped"]["total"] == 3 and manifest["counts"]["preference"] == 1


def test_corpus_builder_skips_a_docstring_holding_a_nul_and_counts_it(tmp_path):
    """A docstring is the prompt: an escape that makes it hold a NUL character would be refused by
    every loader downstream, so the builder counts it out (the code itself holds only the escape)."""
    from alphatoken.corpus import build_stdlib_corpus

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "mod.py").write_text(CLAMP_MODULE + '''

def terminate(text):
    """Return the text followed by a terminating \\0 character, as C functions expect it."""
    return text + "\\0"
''')
    result = build_stdlib_corpus(str(tmp_path / "lib"), min_doc_chars=10)
    assert [e.id for e in result.examples] == ["mod:clamp"]
    assert result.skipped.counts["nul_in_docstring"] == 1
