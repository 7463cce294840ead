"""Training data: chat / preference records, loaders (local JSONL, hub datasets with a local-path
override), chat-template encoding with labels only on assistant tokens, padding, and the paper's
hold-out splits (§5.1): a target-validation set and a Fisher-prompt set drawn before training and
excluded from it.

Nothing is dropped silently: every skipped line or example is counted per reason in a
:class:`DropLog` (with the first few `file:line` locations) that ends up in the split manifest.

Also here, because this module imports nothing else of the package (so every config can import it):
:class:`ConfigError` and the value checks the config dataclasses share (`check_number`, `check_int`,
`check_choice`, `check_bool`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

import torch

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, template tail, padding)


# ----------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class ChatExample:
    """One conversation whose last message is the assistant response that is trained on."""

    id: str  # stable identifier (the dataset's own id when it has one, else "source:line")
    messages: list  # [{"role": "system"|"user"|"assistant", "content": str}, ...], last = assistant
    source: str  # dataset id or file the example came from

    @property
    def prompt(self) -> list:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred and a dispreferred assistant response."""

    id: str  # stable identifier
    prompt: list  # chat messages before the response (system/user/assistant turns)
    chosen: str  # preferred assistant response
    rejected: str  # dispreferred assistant response
    source: str  # dataset id or file the example came from


Example = Union[ChatExample, PreferenceExample]


class DataError(ValueError):
    """Bad input; the message names the file (or dataset), the line (or row) and the field."""


class ConfigError(ValueError):
    """A setting of a config dataclass that cannot be used. `field` names the setting in a
    machine-readable way, so a front end that knows where each value came from (the pipeline's
    parameter files) can point at the value's own file and line; `message` says what is wrong."""

    def __init__(self, field: str, message: str, owner: str = ""):
        super().__init__(f"{owner}.{field}: {message}" if owner else f"{field}: {message}")
        self.field = field  # the dataclass field whose value is refused
        self.message = message  # what is wrong with it, without the field's name
        self.owner = owner  # the dataclass, e.g. "TrainConfig"


# Checks shared by the config dataclasses' `__post_init__` (TrainConfig, ValuationConfig, PolicyConfig,
# FisherConfig, DataLimits). Every float setting must be a finite real number in its range: `.inf` or
# `.nan` from a YAML file would otherwise pass a comparison such as `lr > 0` (inf) or fail every later
# one silently (nan).


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def interval_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
    """`in [a, b)`, `>= a`, `< b`, ...: an allowed range in words for error messages ("" when unbounded)."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(owner: str, field: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """ConfigError unless `value` is a finite int or float (not a bool) in the interval
    (`low`, `high`; open ends where `low_open` / `high_open`), or None when `optional`."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        what = " ".join(filter(None, ["a finite number", interval_text(low, high, low_open, high_open)]))
        raise ConfigError(field, f"expected {'None or ' if optional else ''}{what}, got {value!r}", owner)


def check_int(owner: str, field: str, value, low: int | None = None, *, optional: bool = False) -> None:
    """ConfigError unless `value` is an int (not a bool) >= `low`, or None when `optional`."""
    if optional and value is None:
        return
    if not _is_int(value) or (low is not None and value < low):
        what = "an integer" + (f" >= {low}" if low is not None else "")
        raise ConfigError(field, f"expected {'None or ' if optional else ''}{what}, got {value!r}", owner)


def check_choice(owner: str, field: str, value, choices: tuple) -> None:
    """ConfigError unless `value` is one of `choices`."""
    if isinstance(value, bool) or value not in choices:
        raise ConfigError(field, f"expected one of {list(choices)}, got {value!r}", owner)


def check_bool(owner: str, field: str, value) -> None:
    """ConfigError unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(field, f"expected true or false, got {value!r}", owner)


class FieldError(ValueError):
    """A record-level problem before it is located in a file: `reason` is the drop-count key."""

    def __init__(self, reason: str, field_name: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.field_name = field_name


class ExampleDropped(ValueError):
    """Raised by the encoders for an example that cannot be encoded within the limits."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DataLimits:
    """What a loaded record must satisfy, and what happens when it does not."""

    on_error: str = "raise"  # "raise": DataError at the first bad line; "drop": count it and go on
    min_response_chars: int = 1  # responses shorter than this (after stripping whitespace) are bad
    max_response_chars: int = 32_000  # responses longer than this are bad (0 = no limit)
    max_examples: int = 0  # stop after this many accepted examples (0 = all)
    max_drop_examples: int = 5  # how many "file:line" locations to keep per drop reason

    def __post_init__(self):
        check_choice("DataLimits", "on_error", self.on_error, ("raise", "drop"))
        for name in ("min_response_chars", "max_response_chars", "max_examples", "max_drop_examples"):
            check_int("DataLimits", name, getattr(self, name), 0)


@dataclass
class DropLog:
    """Counts of dropped items per reason, plus the first few locations of each."""

    max_examples: int = 5  # locations kept per reason
    counts: Counter = field(default_factory=Counter)  # reason -> number dropped
    examples: dict = field(default_factory=dict)  # reason -> ["file:line: message", ...]

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(where)

    def merge(self, other: "DropLog") -> "DropLog":
        for reason, n in other.counts.items():
            self.counts[reason] += n
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(kept))])
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: self.examples[k] for k in sorted(self.examples)},
        }


@dataclass
class LoadResult:
    """Records read from one file or dataset, with everything that was skipped."""

    examples: list  # ChatExample or PreferenceExample, in file order
    dropped: DropLog  # bad lines skipped under on_error="drop", and blank lines
    source: str  # the file path or "dataset_id[split]"
    rows_read: int  # lines/rows looked at (including dropped ones)

    def manifest(self) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "examples": len(self.examples),
            "dropped": self.dropped.to_dict(),
        }


# ----------------------------------------------------------------------------------------------
# Record validation (shared by every loader)


def _check_messages(messages, field_name: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise FieldError("bad_messages", field_name, "expected a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise FieldError("bad_messages", where, f"expected an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise FieldError("missing_field", f"{where}.{key}", "missing")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise FieldError("bad_role", f"{where}.role", f"expected one of {list(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise FieldError("bad_role", f"{where}.role", "a system message may only come first")
        if not isinstance(content, str):
            raise FieldError("bad_type", f"{where}.content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_prompt(prompt: list, field_name: str) -> None:
    if not any(m["role"] == "user" for m in prompt):
        raise FieldError("bad_role", field_name, "the prompt has no user message")
    if prompt[-1]["role"] == "assistant":
        raise FieldError("bad_role", f"{field_name}[{len(prompt) - 1}].role", "the prompt must not end with an assistant turn")


def _check_response(text, field_name: str, limits: DataLimits) -> str:
    if not isinstance(text, str):
        raise FieldError("bad_type", field_name, f"expected a string, got {type(text).__name__}")
    if len(text.strip()) < max(1, limits.min_response_chars):
        raise FieldError("empty_response", field_name, f"response is empty or shorter than {limits.min_response_chars} characters")
    if limits.max_response_chars and len(text) > limits.max_response_chars:
        raise FieldError("response_too_long", field_name, f"response has {len(text)} characters > max_response_chars={limits.max_response_chars}")
    return text


def _require(row: dict, key: str):
    if key not in row:
        raise FieldError("missing_field", key, "missing")
    return row[key]


def _prompt_from(value, field_name: str) -> list:
    """A prompt given as a string (one user turn) or as a message list."""
    if isinstance(value, str):
        if not value.strip():
            raise FieldError("empty_prompt", field_name, "prompt is empty")
        return [{"role": "user", "content": value}]
    messages = _check_messages(value, field_name)
    _check_prompt(messages, field_name)
    return messages


def chat_from_row(row: dict, ident: str, source: str, limits: DataLimits) -> ChatExample:
    """A local chat record: `{"messages": [...]}` (last message = assistant response) or
    `{"prompt": str | [...], "response": str, "system": str (optional)}`."""
    if not isinstance(row, dict):
        raise FieldError("bad_record", "<record>", f"expected a JSON object, got {type(row).__name__}")
    ident = str(row.get("id", ident))
    source = row["source"] if isinstance(row.get("source"), str) else source
    if "messages" in row:
        messages = _check_messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise FieldError("bad_role", f"messages[{len(messages) - 1}].role", "the last message must be the assistant response")
        if len(messages) < 2:
            raise FieldError("bad_messages", "messages", "need a prompt before the assistant response")
        _check_prompt(messages[:-1], "messages")
        _check_response(messages[-1]["content"], f"messages[{len(messages) - 1}].content", limits)
        return ChatExample(ident, messages, source)
    if "prompt" in row or "response" in row:
        prompt = _prompt_from(_require(row, "prompt"), "prompt")
        if "system" in row:
            if not isinstance(row["system"], str):
                raise FieldError("bad_type", "system", "expected a string")
            if prompt[0]["role"] == "system":
                raise FieldError("bad_role", "system", "given both `system` and a system message in `prompt`")
            prompt = [{"role": "system", "content": row["system"]}] + prompt
        response = _check_response(_require(row, "response"), "response", limits)
        return ChatExample(ident, prompt + [{"role": "assistant", "content": response}], source)
    raise FieldError("missing_field", "messages", "missing (expected `messages`, or `prompt` and `response`)")


def _response_from(value, field_name: str, limits: DataLimits):
    """A preference response: a string, or a full conversation whose last turn is the assistant
    response (UltraFeedback-binarized style). Returns (prompt messages or None, response)."""
    if isinstance(value, list):
        messages = _check_messages(value, field_name)
        last = len(messages) - 1
        if messages[-1]["role"] != "assistant":
            raise FieldError("bad_role", f"{field_name}[{last}].role", "the last message must be the assistant response")
        return messages[:-1], _check_response(messages[-1]["content"], f"{field_name}[{last}].content", limits)
    return None, _check_response(value, field_name, limits)


def preference_from_row(row: dict, ident: str, source: str, limits: DataLimits) -> PreferenceExample:
    """A preference record: `{"prompt": str | [...], "chosen": str | [...], "rejected": str | [...]}`.
    Message-list responses (UltraFeedback-binarized) must share the same prompt turns."""
    if not isinstance(row, dict):
        raise FieldError("bad_record", "<record>", f"expected a JSON object, got {type(row).__name__}")
    ident = str(row.get("id", row.get("prompt_id", ident)))
    source = row["source"] if isinstance(row.get("source"), str) else source
    chosen_prompt, chosen = _response_from(_require(row, "chosen"), "chosen", limits)
    rejected_prompt, rejected = _response_from(_require(row, "rejected"), "rejected", limits)
    if chosen.strip() == rejected.strip():  # chat templates may trim the content: the same tokens either way
        raise FieldError("identical_responses", "rejected", "equals `chosen` (up to surrounding whitespace): "
                         "the pair carries no preference signal")
    if chosen_prompt is not None and chosen_prompt:
        prompt = chosen_prompt
        _check_prompt(prompt, "chosen")
        if rejected_prompt is not None and rejected_prompt != prompt:
            raise FieldError("prompt_mismatch", "rejected", "the turns before the response differ from those in `chosen`")
        if isinstance(row.get("prompt"), list) and _check_messages(row["prompt"], "prompt") != prompt:
            raise FieldError("prompt_mismatch", "prompt", "differs from the turns before the response in `chosen`")
    else:
        prompt = _prompt_from(_require(row, "prompt"), "prompt")
        if rejected_prompt:
            raise FieldError("prompt_mismatch", "rejected", "has prompt turns while `chosen` does not")
    return PreferenceExample(ident, prompt, chosen, rejected, source)


# ----------------------------------------------------------------------------------------------
# Loaders


RowMapper = Callable[[dict, str, str, DataLimits], Example]


class _DuplicateKeys(dict):
    """A JSON object that named some key more than once (`duplicates`); JSON keeps only the last."""

    duplicates: list


def _object_pairs(pairs: list) -> dict:
    """`json.loads` object hook: a plain dict, or a `_DuplicateKeys` recording the repeated keys."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen, repeated = set(), []
    for key, _ in pairs:
        if key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    obj = _DuplicateKeys(obj)
    obj.duplicates = repeated
    return obj


def _child(path: str, key) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else str(key))


def row_problem(row, path: str = "") -> FieldError | None:
    """The first value of a parsed row (in document order) that no record may hold, as a FieldError
    naming its field (`messages[1].content`): a key given twice in one JSON object (JSON keeps the last
    silently, so which one was meant is unknown) or a string with a NUL character (C-string tools,
    tokenizers and terminals truncate or drop it, so the text trained on would not be the text shown)."""
    if isinstance(row, _DuplicateKeys):
        key = row.duplicates[0]
        return FieldError("duplicate_key", _child(path, key), "the key appears more than once in the same JSON object")
    if isinstance(row, str):
        if "\x00" in row:
            return FieldError("nul_byte", path or "<record>", f"contains a NUL character (\\u0000) at offset {row.index(chr(0))}")
        return None
    if isinstance(row, dict):
        for key, value in row.items():
            if "\x00" in str(key):
                return FieldError("nul_byte", _child(path, repr(key)), "the key contains a NUL character (\\u0000)")
            problem = row_problem(value, _child(path, key))
            if problem is not None:
                return problem
    elif isinstance(row, (list, tuple)):
        for i, value in enumerate(row):
            problem = row_problem(value, _child(path, i))
            if problem is not None:
                return problem
    return None


def _collect(rows: Iterable, location: str, source: str, mapper: RowMapper, limits: DataLimits) -> LoadResult:
    """Map `(line_number, row_or_exception)` pairs to records, raising or counting bad rows."""
    from tqdm.auto import tqdm

    drops = DropLog(max_examples=limits.max_drop_examples)
    examples, rows_read = [], 0
    for line_no, row in tqdm(rows, desc=f"read {location}", unit="rows", disable=None):
        rows_read += 1
        if row is None:  # blank line
            drops.add("blank_line", f"{location}:{line_no}")
            continue
        try:
            if isinstance(row, FieldError):
                raise row
            problem = row_problem(row)
            if problem is not None:
                raise problem
            example = mapper(row, f"{source}:{line_no}", source, limits)
        except FieldError as err:
            message = f"{location}:{line_no}: field `{err.field_name}`: {err}"
            if limits.on_error == "raise":
                raise DataError(message) from None
            drops.add(err.reason, message)
            continue
        examples.append(example)
        if limits.max_examples and len(examples) >= limits.max_examples:
            break
    return LoadResult(examples, drops, location, rows_read)


def _jsonl_rows(path: Path) -> Iterator:
    """`(line_number, dict | None | FieldError)` for each line: None for a blank line, a FieldError
    for bytes that are not UTF-8 or text that is not JSON."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no, FieldError("not_utf8", "<line>", f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not text.strip():
                yield line_no, None
                continue
            try:
                yield line_no, json.loads(text, object_pairs_hook=_object_pairs)
            except json.JSONDecodeError as err:
                yield line_no, FieldError("bad_json", "<json>", f"malformed JSON: {err.msg} at column {err.colno}")


def load_jsonl(path, kind: str = "chat", limits: DataLimits = DataLimits(), source: str | None = None) -> LoadResult:
    """Read a local JSONL file of chat (`kind="chat"`) or preference (`kind="preference"`) records.

    Bad lines raise :class:`DataError` naming file, line and field, or with
    `limits.on_error="drop"` are counted per reason in `LoadResult.dropped`. Blank lines are counted
    as `blank_line` and never raise.
    """
    mappers = {"chat": chat_from_row, "preference": preference_from_row}
    if kind not in mappers:
        raise ValueError(f"kind must be 'chat' or 'preference', got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return _collect(_jsonl_rows(path), str(path), source or path.name, mappers[kind], limits)


def require_examples(loaded: LoadResult, what: str = "record") -> None:
    """DataError naming the real cause when a load kept no record: an empty file, only blank lines,
    or every line dropped (with the drop counts and the first locations), rather than letting a later
    step fail on its size."""
    if loaded.examples:
        return
    if loaded.rows_read == 0:
        raise DataError(f"{loaded.source}: empty (0 lines): no {what} to read")
    counts = dict(sorted(loaded.dropped.counts.items()))
    if set(counts) == {"blank_line"}:
        raise DataError(f"{loaded.source}: no {what}: all {loaded.rows_read} lines are blank")
    first = next((where[0] for reason, where in sorted(loaded.dropped.examples.items())
                  if where and reason != "blank_line"), "")
    raise DataError(f"{loaded.source}: no usable {what}: all {loaded.rows_read} lines were dropped "
                    f"(by reason: {counts}); the first: {first}")


# Hub datasets of the paper (§5.1, App. C.2), each mapped to the records above.


def magicoder_row(row: dict, ident: str, source: str, limits: DataLimits) -> ChatExample:
    """Magicoder-OSS-Instruct-75K: `problem` (instruction) -> `solution` (the response)."""
    problem = _require(row, "problem")
    if not isinstance(problem, str) or not problem.strip():
        raise FieldError("empty_prompt", "problem", "expected a non-empty string")
    solution = _check_response(_require(row, "solution"), "solution", limits)
    return ChatExample(ident, [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}], source)


def ultrachat_row(row: dict, ident: str, source: str, limits: DataLimits) -> ChatExample:
    """UltraChat-200k (`train_sft`): `messages` is the whole conversation; the last message must
    be the assistant's. Uses `prompt_id` as the id."""
    messages = _check_messages(_require(row, "messages"), "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise FieldError("bad_role", f"messages[{len(messages) - 1}].role", "the last message must be the assistant response")
    _check_prompt(messages[:-1], "messages")
    _check_response(messages[-1]["content"], f"messages[{len(messages) - 1}].content", limits)
    return ChatExample(str(row.get("prompt_id", ident)), messages, source)


def ultrafeedback_row(row: dict, ident: str, source: str, limits: DataLimits) -> PreferenceExample:
    """UltraFeedback binarized (`train_prefs`): `chosen`/`rejected` are message lists
    [user, assistant] sharing the prompt; `prompt_id` is the id."""
    return preference_from_row(row, ident, source, limits)


@dataclass(frozen=True)
class HubDataset:
    """A dataset of the paper's protocol."""

    dataset_id: str  # hub id
    split: str  # split used for training
    kind: str  # "chat" or "preference"
    mapper: RowMapper  # row -> record


HUB_DATASETS = {
    "magicoder": HubDataset("ise-uiuc/Magicoder-OSS-Instruct-75K", "train", "chat", magicoder_row),
    "ultrachat": HubDataset("HuggingFaceH4/ultrachat_200k", "train_sft", "chat", ultrachat_row),
    "ultrafeedback": HubDataset("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "preference", ultrafeedback_row),
}


def map_rows(rows: Iterable[dict], name: str, location: str, limits: DataLimits = DataLimits()) -> LoadResult:
    """Map in-memory rows (e.g. a `datasets.Dataset`) of a known dataset `name` to records; row
    numbers start at 0 (the dataset index)."""
    spec = HUB_DATASETS[name]
    return _collect(enumerate(rows), location, spec.dataset_id, spec.mapper, limits)


def load_hub_dataset(name: str, limits: DataLimits = DataLimits(), local_path: str | None = None,
                     split: str | None = None) -> LoadResult:
    """Load one of :data:`HUB_DATASETS` ("magicoder", "ultrachat", "ultrafeedback").

    local_path: a JSONL file in the dataset's own schema (read line by line, errors name the line)
        or a directory `datasets.load_dataset` understands; otherwise the hub id is used
        (needs network or a populated HF cache).
    """
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(HUB_DATASETS)}")
    spec = HUB_DATASETS[name]
    split = split or spec.split
    if local_path is not None and not Path(local_path).exists():
        raise FileNotFoundError(f"{local_path}: local override for {spec.dataset_id} does not exist")
    if local_path is not None and Path(local_path).is_file():
        path = Path(local_path)
        return _collect(_jsonl_rows(path), str(path), spec.dataset_id, spec.mapper, limits)
    from datasets import load_dataset

    target = str(local_path) if local_path is not None else spec.dataset_id
    rows = load_dataset(target, split=split)
    return map_rows(rows, name, f"{target}[{split}]", limits)


# ----------------------------------------------------------------------------------------------
# Encoding through the chat template


def _render(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list:
    # The template already wrote every special token it wants; adding more would duplicate BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(example: ChatExample, tokenizer, max_length: int, overlong: str = "drop",
                assistant_turns: str = "last", end_of_turn: str | None = None) -> dict:
    """Token ids and labels of one conversation, labels only on assistant tokens.

    For each labelled assistant turn i the prompt rendering `render(messages[:i],
    add_generation_prompt=True)` must be a prefix of `render(messages[:i+1])` (else the template
    cannot be split and a ValueError says so). The pieces between those boundaries are tokenized
    separately, so the prompt tokens are exactly the ones generation would see. In an assistant
    piece, tokens up to and including the first end-of-turn token (`tokenizer.eos_token`) are
    labelled; the template's tail after it (e.g. ChatML's "\\n") is unlabelled, and dropped after
    the final turn. `end_of_turn` names that token when it is not the eos token (e.g. Llama-3's
    "<|eot_id|>" on a base tokenizer); if it does not occur, the whole assistant piece is labelled.

    overlong: "drop" (raise ExampleDropped("too_long")), "truncate" (cut the final response at
        max_length) or "error" (ValueError). A prompt that leaves no room for one response token is
        always ExampleDropped("prompt_too_long").
    assistant_turns: "last" labels only the final response; "all" labels every assistant turn.
    Returns {"input_ids": [T], "labels": [T]} as Python lists.
    """
    if overlong not in ("drop", "truncate", "error"):
        raise ValueError(f"overlong must be 'drop', 'truncate' or 'error', got {overlong!r}")
    if assistant_turns not in ("last", "all"):
        raise ValueError(f"assistant_turns must be 'last' or 'all', got {assistant_turns!r}")
    messages = example.messages
    last = len(messages) - 1
    turns = [last] if assistant_turns == "last" else [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    end_of_turn = end_of_turn or tokenizer.eos_token
    eot = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn is not None else None
    input_ids, labels, done = [], [], ""
    for i in turns:
        prompt_text = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full_text = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt_text.startswith(done) or not full_text.startswith(prompt_text):
            raise ValueError(
                f"example {example.id}: the chat template of {type(tokenizer).__name__} does not render the prompt "
                f"(add_generation_prompt=True) as a prefix of the conversation; cannot locate the assistant span"
            )
        context = _ids(tokenizer, prompt_text[len(done):])
        answer = _ids(tokenizer, full_text[len(prompt_text):])
        n_labelled = answer.index(eot) + 1 if eot in answer else len(answer)
        if i == last:
            answer = answer[:n_labelled]  # the sequence ends with the end-of-turn token
        input_ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer[:n_labelled] + [IGNORE_INDEX] * (len(answer) - n_labelled)
        done = full_text
    prompt_len = len(input_ids) - n_labelled  # everything before the final response
    if n_labelled == 0:
        raise ExampleDropped("empty_response", f"example {example.id}: the response encodes to no tokens")
    if prompt_len >= max_length:
        raise ExampleDropped("prompt_too_long", f"example {example.id}: prompt has {prompt_len} tokens >= max_length={max_length}")
    if len(input_ids) > max_length:
        if overlong == "error":
            raise ValueError(f"example {example.id}: {len(input_ids)} tokens > max_length={max_length}")
        if overlong == "drop":
            raise ExampleDropped("too_long", f"example {example.id}: {len(input_ids)} tokens > max_length={max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_preference(example: PreferenceExample, tokenizer, max_length: int, overlong: str = "drop",
                      end_of_turn: str | None = None) -> dict:
    """{"chosen": encode_chat(prompt + chosen), "rejected": encode_chat(prompt + rejected)}; both
    start with the same prompt tokens (checked). Either branch being dropped drops the pair."""
    out = {}
    for branch in ("chosen", "rejected"):
        messages = list(example.prompt) + [{"role": "assistant", "content": getattr(example, branch)}]
        out[branch] = encode_chat(ChatExample(f"{example.id}/{branch}", messages, example.source), tokenizer, max_length, overlong,
                                  end_of_turn=end_of_turn)
    n_c, n_r = (next(t for t, y in enumerate(out[b]["labels"]) if y != IGNORE_INDEX) for b in ("chosen", "rejected"))
    if n_c != n_r or out["chosen"]["input_ids"][:n_c] != out["rejected"]["input_ids"][:n_r]:
        raise ValueError(f"example {example.id}: chosen and rejected encodings do not share the prompt tokens")
    return out


@dataclass
class EncodeResult:
    """Encoded examples and the ones dropped for length."""

    features: list  # encode_chat / encode_preference outputs, in input order
    ids: list  # example id of each feature
    dropped: DropLog  # reason -> count ("prompt_too_long", "too_long", "empty_response")


def encode_examples(examples: list, tokenizer, max_length: int, overlong: str = "drop",
                    assistant_turns: str = "last", end_of_turn: str | None = None,
                    max_drop_examples: int = 5) -> EncodeResult:
    """Encode a list of records (chat or preference), counting drops."""
    from tqdm.auto import tqdm

    drops = DropLog(max_examples=max_drop_examples)
    features, ids = [], []
    for example in tqdm(examples, desc="encode", disable=len(examples) < 1000):
        try:
            if isinstance(example, PreferenceExample):
                feature = encode_preference(example, tokenizer, max_length, overlong, end_of_turn)
            else:
                feature = encode_chat(example, tokenizer, max_length, overlong, assistant_turns, end_of_turn)
        except ExampleDropped as err:
            drops.add(err.reason, str(err))
            continue
        features.append(feature)
        ids.append(example.id)
    return EncodeResult(features, ids, drops)


def collate(features: list, pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of {"input_ids", "labels"} to a batch of LongTensors [B, T]:
    input_ids (pad_token_id on padding), attention_mask (0 on padding), labels (-100 on padding)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not features:
        raise ValueError("collate: empty list of features")
    T = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for f in features:
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise ValueError("collate: input_ids and labels differ in length")
        pad = T - n
        rows = (f["input_ids"], [1] * n, f["labels"])
        fills = (pad_token_id, 0, IGNORE_INDEX)
        for key, row, fill in zip(batch, rows, fills):
            batch[key].append(list(row) + [fill] * pad if padding_side == "right" else [fill] * pad + list(row))
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}  # each (B, T)


# ----------------------------------------------------------------------------------------------
# Splits (§5.1)


def to_json(example: Example) -> dict:
    if isinstance(example, PreferenceExample):
        return {"id": example.id, "source": example.source, "prompt": example.prompt,
                "chosen": example.chosen, "rejected": example.rejected}
    return {"id": example.id, "source": example.source, "messages": example.messages}


def from_json(row: dict) -> Example:
    if "chosen" in row:
        return PreferenceExample(row["id"], row["prompt"], row["chosen"], row["rejected"], row["source"])
    return ChatExample(row["id"], row["messages"], row["source"])


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def content_key(example: Example) -> str:
    """SHA-256 of the example's text (id and source excluded): identical examples share it."""
    body = to_json(example)
    del body["id"], body["source"]
    return _digest(body)


def prompt_key(example: Example) -> str:
    """SHA-256 of the prompt turns only."""
    return _digest(example.prompt)


@dataclass(frozen=True)
class Splits:
    """Target-validation, Fisher-prompt and training pools, disjoint by prompt."""

    train: list  # D_tgt^train = D_tgt minus (val and Fisher), the examples training may use
    val: list  # D_tgt^val: B_val examples held out for the target-validation gradient
    fisher: list  # D_ref^Fisher: examples whose prompts build the Monte-Carlo Fisher
    seed: int  # seed of the draw
    stats: dict  # input size, duplicates removed, examples removed for sharing a held-out prompt
    test: list = field(default_factory=list)  # D_tgt^test: held out from everything, for the target metrics


def make_splits(examples: list, n_val: int, n_fisher: int, seed: int, n_test: int = 0) -> Splits:
    """Draw the §5.1 hold-outs, and a test hold-out for the target metrics, before training.

    1. Exact duplicates (same `content_key`) are removed, keeping the smallest id; counted.
    2. Examples are grouped by prompt; the groups are ordered by prompt hash and shuffled with
       `random.Random(seed)`. The first `n_val` groups give one example each to `val`, the next
       `n_fisher` one each to `fisher`, the next `n_test` one each to `test` (the smallest content
       hash of the group); the other examples of held-out groups are removed and counted, so no
       training example shares a prompt with a held-out one. The rest is `train`, in the shuffled
       order. `test` is drawn after the others, so adding it leaves `val` and `fisher` as they were.
    The result depends only on the set of examples and the seed, not on their input order.
    """
    if n_val < 0 or n_fisher < 0 or n_test < 0:
        raise ValueError("n_val, n_fisher and n_test must be >= 0")
    unique: dict = {}
    for example in examples:
        key = content_key(example)
        if key not in unique or example.id < unique[key].id:
            unique[key] = example
    groups: dict = {}
    for key in sorted(unique):
        groups.setdefault(prompt_key(unique[key]), []).append(unique[key])  # members sorted by content hash
    order = sorted(groups)
    held = n_val + n_fisher + n_test
    if held >= len(order):
        raise ValueError(f"need more than n_val + n_fisher + n_test = {held} distinct prompts, have {len(order)}")
    random.Random(seed).shuffle(order)
    val = [groups[k][0] for k in order[:n_val]]
    fisher = [groups[k][0] for k in order[n_val:n_val + n_fisher]]
    test = [groups[k][0] for k in order[n_val + n_fisher:held]]
    held_out_extra = sum(len(groups[k]) - 1 for k in order[:held])
    train = [e for k in order[held:] for e in groups[k]]
    stats = {
        "input": len(examples),
        "duplicates_removed": len(examples) - len(unique),
        "distinct_prompts": len(order),
        "removed_sharing_heldout_prompt": held_out_extra,
        "train": len(train),
        "val": len(val),
        "fisher": len(fisher),
        "test": len(test),
    }
    return Splits(train, val, fisher, seed, stats, test)


SPLIT_NAMES = ("train", "val", "fisher", "test")  # the files `write_splits` writes


def _write_jsonl(path: Path, examples: list) -> str:
    data = "".join(json.dumps(to_json(e), ensure_ascii=False, sort_keys=True) + "\n" for e in examples).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_splits(splits: Splits, out_dir, extra_manifest: dict | None = None) -> dict:
    """Write train.jsonl, val.jsonl, fisher.jsonl, test.jsonl and manifest.json (counts, SHA-256 of
    each file, seed, split statistics, examples per source, and `extra_manifest`, e.g.
    `{"inputs": [load_result.manifest()], "encode_drops": ...}`). Byte-identical
    for identical inputs. Returns {"train"|"val"|"fisher"|"test"|"manifest": Path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, hashes = {}, {}
    for name in SPLIT_NAMES:
        paths[name] = out / f"{name}.jsonl"
        hashes[paths[name].name] = _write_jsonl(paths[name], getattr(splits, name))
    manifest = {
        "seed": splits.seed,
        "counts": {name: len(getattr(splits, name)) for name in SPLIT_NAMES},
        "stats": splits.stats,
        "sha256": hashes,
        "sources": {name: dict(sorted(Counter(e.source for e in getattr(splits, name)).items()))
                    for name in SPLIT_NAMES},
        **(extra_manifest or {}),
    }
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def read_split(path) -> list:
    """Records of a split file written by :func:`write_splits` (strict: any bad line raises)."""
    path = Path(path)
    examples = []
    for line_no, row in _jsonl_rows(path):
        if isinstance(row, FieldError):
            raise DataError(f"{path}:{line_no}: field `{row.field_name}`: {row}")
        if row is None:
            continue
        problem = row_problem(row)
        if problem is not None:
            raise DataError(f"{path}:{line_no}: field `{problem.field_name}`: {problem}")
        try:
            examples.append(from_json(row))
        except (KeyError, TypeError) as err:
            raise DataError(f"{path}:{line_no}: field `{err}`: missing or malformed") from None
    return examples
