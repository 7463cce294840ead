"""Training examples -> features (`input_ids`, `labels` lists) for the loops, and padding into batches.

Encoding is `alphatoken.data`'s (chat template, labels on the assistant response only). Accepted
examples:
- `alphatoken.data.ChatExample` / `PreferenceExample` records (what its loaders return);
- plain dict rows in the forms `alphatoken.data.chat_from_row` / `preference_from_row` read
  (`{"prompt", "response"}`, `{"messages"}`, `{"prompt", "chosen", "rejected"}`); a row may carry
  `"__source__": "file:line"` so errors name it;
- pre-tokenized dicts `{"input_ids", "labels"}` (labels -100 on the prompt), or for preference data
  `{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}`.

Examples that cannot train are skipped and counted by reason (an empty response, a prompt that
leaves no room for a response token within `max_length`); other malformed input raises a ValueError
naming the example's file and line (or index) and the field.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from alphatoken import data as records
from alphatoken.losses import IGNORE_INDEX


@dataclass
class EncodeStats:
    """How many examples were kept and skipped (by reason)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values())}


def _where(example, index: int) -> str:
    if isinstance(example, dict):
        return example.get("__source__", f"example {index}")
    return f"{getattr(example, 'source', 'example')} (id {getattr(example, 'id', index)})"


def _pretokenized(ids, labels, where: str, prefix: str, max_length: int) -> dict:
    if not isinstance(ids, list) or not isinstance(labels, list):
        raise ValueError(f"{where}: fields '{prefix}input_ids' and '{prefix}labels' must be lists of ints")
    if len(ids) != len(labels):
        raise ValueError(f"{where}: fields '{prefix}input_ids' ({len(ids)}) and '{prefix}labels' ({len(labels)}) differ in length")
    response = [i for i, label in enumerate(labels) if label != IGNORE_INDEX and i > 0]
    if not response:
        raise records.ExampleDropped("empty_response", f"{where}: no labelled response token")
    if response[0] >= max_length:
        raise records.ExampleDropped("prompt_too_long", f"{where}: prompt has {response[0]} tokens >= max_length={max_length}")
    return {"input_ids": list(ids[:max_length]), "labels": list(labels[:max_length])}


def encode_example(tokenizer, example, index: int, max_length: int, preference: bool, overlong: str = "truncate") -> dict:
    """One example -> `{"input_ids", "labels"}` (SFT) or `{"chosen": ..., "rejected": ...}` (preference).
    Raises `alphatoken.data.ExampleDropped` for skips and ValueError for malformed input."""
    where = _where(example, index)
    if isinstance(example, dict) and ("input_ids" in example or "chosen_input_ids" in example):
        if preference:
            return {b: _pretokenized(example.get(f"{b}_input_ids"), example.get(f"{b}_labels"), where, f"{b}_", max_length) for b in ("chosen", "rejected")}
        return _pretokenized(example["input_ids"], example.get("labels"), where, "", max_length)
    if isinstance(example, dict):
        row = {k: v for k, v in example.items() if k != "__source__"}
        try:
            example = (records.preference_from_row if preference else records.chat_from_row)(row, str(index), where, records.DataLimits())
        except records.FieldError as err:
            if err.reason == "empty_response":
                raise records.ExampleDropped("empty_response", f"{where}: field {err.field_name!r}: {err}") from None
            raise ValueError(f"{where}: field {err.field_name!r}: {err}") from None
    if preference:
        if not isinstance(example, records.PreferenceExample):
            raise ValueError(f"{where}: expected a preference example, got {type(example).__name__}")
        return records.encode_preference(example, tokenizer, max_length, overlong)
    if not isinstance(example, records.ChatExample):
        raise ValueError(f"{where}: expected a chat example, got {type(example).__name__}")
    return records.encode_chat(example, tokenizer, max_length, overlong)


def encode_dataset(tokenizer, examples, max_length: int, preference: bool = False, overlong: str = "truncate") -> tuple[list[dict], EncodeStats]:
    """Encode all examples in order; skipped ones are counted in the returned stats."""
    stats, features = EncodeStats(), []
    for index, example in enumerate(examples):
        try:
            features.append(encode_example(tokenizer, example, index, max_length, preference, overlong))
            stats.kept += 1
        except records.ExampleDropped as drop:
            stats.skipped[drop.reason] += 1
    return features, stats


def collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad `{"input_ids", "labels"}` lists to a `[B, T]` batch (`alphatoken.data.collate`)."""
    return records.collate(features, pad_id)


def collate_pairs(pairs: list[dict], pad_id: int) -> dict:
    """Preference pairs -> one `[2B, T]` batch: rows `[:B]` chosen, `[B:]` rejected (common length T)."""
    return records.collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def as_batch(tokenizer, batch_or_examples, max_length: int, preference: bool = False) -> dict:
    """A ready batch dict passes through; a list of examples is encoded (>= 1 must be usable) and padded."""
    if isinstance(batch_or_examples, dict):
        return batch_or_examples
    if batch_or_examples is None:
        raise ValueError("this policy needs a validation batch (val_batch) for its token values")
    features, stats = encode_dataset(tokenizer, batch_or_examples, max_length, preference)
    if not features:
        raise ValueError(f"validation examples: none usable ({stats.as_dict()})")
    pad_id = pad_token_id(tokenizer)
    return collate_pairs(features, pad_id) if preference else collate(features, pad_id)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id (EOS when it has no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)
