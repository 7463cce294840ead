"""Continuous teacher-forced metrics: they move with small changes of the weights, where pass@1 and
accuracies move by less than their noise.

Every metric is a value per example (document, problem) plus its mean over examples and the standard
error of that mean, std(values, ddof=1) / sqrt(n) (`MetricResult`; `MetricResult.rows()` gives the
`alphatoken.eval.examples` rows for paired comparisons between models). With z_p the logits at
position p and y_{p+1} the token that follows,

    nll_p = logsumexp(z_p) - z_p[y_{p+1}]                                  (float64)

- `response_nll`: mean nll over the response tokens of chat examples, encoded exactly as training
  encodes them (`alphatoken.train.batches.encode_example`: chat template, labels on the final
  assistant response and its end-of-turn token; an overlong example is truncated at `max_length`,
  as in training, and counted). The held-out loss of the target corpus.
- `solution_nll`: mean nll over the tokens of a reference solution inside the chat answer the pass@1
  generator expects (`SolutionExample`; `humaneval_solution_examples`, `mbpp_solution_examples`).
- `gold_continuation_drift`: on the gold continuation of retention documents, per document the mean
  over its continuation tokens of KL(pi_ref || pi) and of nll, under the model and the reference.

Naive equivalent of every metric (one token at a time; what the tests compare against):

    for t in scored_tokens(ids):                                   # t = index of a scored token
        logp = log_softmax(model(ids[None, :t]).logits[0, -1].double(), -1)   # (V,)
        nll_t = -logp[ids[t]]
    value = mean_t nll_t

Fast path: examples sorted by length, `batch_size` per forward, right-padded (padding after a
sequence does not change its causal logits), eval mode, no gradient; the logits of the scored
positions only are taken to float64.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm.auto import tqdm

from alphatoken import data as records
from alphatoken.eval.drift import token_kl
from alphatoken.losses import IGNORE_INDEX, loss_positions
from alphatoken.train.batches import encode_example, pad_token_id


@dataclass(frozen=True)
class MetricResult:
    """One metric over a set of examples."""

    name: str  # metric name, the "metric" field of the per-example rows
    ids: tuple  # example ids (str) of the scored examples, in input order
    values: tuple  # per-example values (float), aligned with `ids`
    mean: float  # mean of `values`
    se: float  # standard error of the mean: std(values, ddof=1) / sqrt(n); NaN when n < 2
    tokens: int  # scored tokens over all examples
    truncated: int  # examples cut at max_length and scored on the tokens that fit
    skipped: dict = field(default_factory=dict)  # reason -> examples with no scorable token (not in `ids`)

    def rows(self) -> list[dict]:
        """Per-example rows {"metric", "id", "value"} (`alphatoken.eval.examples.write_per_example`)."""
        return [{"metric": self.name, "id": i, "value": v} for i, v in zip(self.ids, self.values)]

    def summary(self) -> dict:
        """{name: mean, "name SE": se, "name n": examples, "name truncated": ..., "name skipped": ...}."""
        return {self.name: self.mean, f"{self.name} SE": self.se, f"{self.name} n": float(len(self.ids)),
                f"{self.name} truncated": float(self.truncated), f"{self.name} skipped": float(sum(self.skipped.values()))}


def mean_se(values) -> tuple[float, float]:
    """(mean, std(ddof=1) / sqrt(n)) of a non-empty sequence; the standard error is NaN for n = 1."""
    x = torch.as_tensor(list(values), dtype=torch.float64)  # (n,)
    if x.numel() == 0:
        raise ValueError("no examples were scored")
    se = float(x.std(correction=1) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
    return float(x.mean()), se


def _result(name: str, ids: list, values: list, tokens: int, truncated: int, skipped: Counter) -> MetricResult:
    mean, se = mean_se(values)
    return MetricResult(name, tuple(ids), tuple(float(v) for v in values), mean, se, tokens, truncated, dict(sorted(skipped.items())))


def token_nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """nll_i = logsumexp(z_i) - z_i[y_i] in float64.  logits (n, V), targets (n,) -> (n,)"""
    z = logits.double()  # (n, V)
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets[:, None].to(z.device))[:, 0]  # (n,)


def _check_ids(ids: list) -> None:
    seen = set()
    for ident in ids:
        if ident in seen:
            raise ValueError(f"duplicate example id {ident!r}: per-example values need unique ids")
        seen.add(ident)


# ----------------------------------------------------------------------------------------------
# Batched teacher forcing


def _batches(features: list[dict], batch_size: int) -> Iterator[list[int]]:
    """Indices of `features` in batches of `batch_size`, longest first (little padding per batch)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def _scored_logits(model, batch: dict) -> list[torch.Tensor]:
    """Per row b, the logits at the positions p whose next token is labelled (labels[b, p+1] != -100),
    in position order: a list of (n_b, V) tensors.

    The batch is right-padded and read without its attention mask: under the causal mask a token
    never sees the padding after it, so its logits are those of the unpadded sequence, while a padding
    mask would leave padding queries with no key inside a sliding window (Gemma3), whose NaN softmax
    rows then reach every position through 0 * NaN in the next layer's attention.

    Only the positions from the first scored one on go through the output head (`logits_to_keep`):
    the same head on the same hidden states, without the cost of the prompt's logits."""
    device = next(model.parameters()).device
    scored = loss_positions(batch["labels"]).to(device)  # (B, T-1)
    first = int(scored.any(0).nonzero()[0])  # earliest scored position of the batch
    keep = batch["input_ids"].shape[1] - first  # positions first .. T-1
    logits = model(input_ids=batch["input_ids"].to(device), logits_to_keep=keep).logits  # (B, keep, V)
    return [logits[b, :-1][scored[b, first:]] for b in range(logits.shape[0])]  # each (n_b, V)


def _scored_targets(batch: dict) -> list[torch.Tensor]:
    """Per row, the labelled tokens in position order: a list of (n_b,) tensors."""
    labels = batch["labels"][:, 1:]  # (B, T-1)
    return [labels[b][labels[b] != IGNORE_INDEX] for b in range(labels.shape[0])]


class _EvalMode:
    """Put models in eval mode for a block and restore their training flags afterwards."""

    def __init__(self, *models):
        self.models = models

    def __enter__(self):
        self.flags = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, flag in zip(self.models, self.flags):
            m.train(flag)


def _mean_nll(model, features: list[dict], pad_id: int, batch_size: int, desc: str) -> tuple[list[float], int]:
    """Per-feature mean nll over its labelled tokens (input order), and the number of tokens."""
    values: list[float] = [math.nan] * len(features)
    tokens = 0
    with _EvalMode(model):
        for index in tqdm(list(_batches(features, batch_size)), desc=desc):
            batch = records.collate([features[i] for i in index], pad_id)  # each (B, T)
            for i, logits, targets in zip(index, _scored_logits(model, batch), _scored_targets(batch)):
                nll = token_nll_rows(logits, targets)  # (n_i,)
                values[i], tokens = float(nll.mean()), tokens + nll.numel()
    return values, tokens


# ----------------------------------------------------------------------------------------------
# Response NLL of chat examples (the target corpus' held-out loss)


def _example_id(example, index: int) -> str:
    ident = example.get("id") if isinstance(example, dict) else getattr(example, "id", None)
    if ident is None:
        raise ValueError(f"example {index}: no 'id' (per-example values need one)")
    return str(ident)


def encode_for_nll(tokenizer, examples: list, max_length: int) -> tuple[list[dict], list[str], int, Counter]:
    """Encode chat examples as training does (`encode_example`, overlong ones truncated).
    Returns (features, ids, number truncated, skipped reason -> count)."""
    features, ids, truncated, skipped = [], [], 0, Counter()
    for index, example in enumerate(examples):
        try:
            feature = encode_example(tokenizer, example, index, max_length, preference=False, overlong="drop")
        except records.ExampleDropped as drop:
            if drop.reason != "too_long":
                skipped[drop.reason] += 1
                continue
            feature = encode_example(tokenizer, example, index, max_length, preference=False, overlong="truncate")
            truncated += 1
        else:  # pre-tokenized rows are cut to max_length without a signal
            truncated += isinstance(example, dict) and len(example.get("input_ids") or ()) > max_length
        features.append(feature)
        ids.append(_example_id(example, index))
    _check_ids(ids)
    return features, ids, truncated, skipped


def response_nll(model, tokenizer, examples: list, max_length: int = 1024, batch_size: int = 4,
                 name: str = "response_nll") -> MetricResult:
    """Per example, the mean nll (nats/token) of its response tokens (module docstring); examples are
    `alphatoken.data.ChatExample` (or the rows `encode_example` accepts, with an "id"). Examples whose
    prompt leaves no room for a response token, or whose response is empty, are skipped and counted
    by reason, as in training."""
    features, ids, truncated, skipped = encode_for_nll(tokenizer, examples, max_length)
    if not features:
        raise ValueError(f"{name}: no example could be scored (skipped: {dict(skipped)})")
    values, tokens = _mean_nll(model, features, pad_token_id(tokenizer), batch_size, name)
    return _result(name, ids, values, tokens, truncated, skipped)


# ----------------------------------------------------------------------------------------------
# Reference solutions inside the pass@1 chat format


@dataclass(frozen=True)
class SolutionExample:
    """A reference solution written as the assistant answer the pass@1 generator expects.

    The conversation is [user: prompt, assistant: answer_prefix + solution + answer_suffix]; only the
    tokens that start inside `solution` are scored (see `encode_solution`).
    """

    id: str  # problem id ("HumanEval/0", "Mbpp/11")
    prompt: str  # the user turn, exactly as the generator sends it
    answer_prefix: str  # answer text before the solution, not scored (code fence, repeated signature)
    solution: str  # the scored text
    answer_suffix: str  # answer text after the solution, not scored (closing fence)

    @property
    def answer(self) -> str:
        return self.answer_prefix + self.solution + self.answer_suffix


def humaneval_solution_examples(problems: dict[str, dict]) -> list[SolutionExample]:
    """HumanEval's canonical solutions in the format `alphatoken.eval.humaneval` generates for:
    user turn `INSTRUCTION.format(prompt=prompt)`, answer "```python\\n" + prompt + canonical_solution
    + "```" (the complete function in one Python block). Scored: the canonical solution (the body);
    the prompt's imports, signature and docstring repeated in the answer are not."""
    from alphatoken.eval.humaneval import INSTRUCTION

    return [SolutionExample(task_id, INSTRUCTION.format(prompt=p["prompt"]), "```python\n" + p["prompt"],
                            p["canonical_solution"], "```" if p["canonical_solution"].endswith("\n") else "\n```")
            for task_id, p in problems.items()]


def mbpp_solution_examples(problems: dict[str, dict]) -> list[SolutionExample]:
    """MBPP's reference code in the format `alphatoken.eval.mbpp` generates for: user turn
    `mbpp_prompt(problem)`, answer "```python\\n" + code + "\\n```". Scored: the whole code (the
    prompt contains only the description and the asserts)."""
    from alphatoken.eval.mbpp import mbpp_prompt

    return [SolutionExample(task_id, mbpp_prompt(p), "```python\n", p["code"], "```" if p["code"].endswith("\n") else "\n```")
            for task_id, p in problems.items()]


def encode_solution(example: SolutionExample, tokenizer, max_length: int) -> tuple[dict, bool]:
    """({"input_ids", "labels"}, truncated) of one solution example.

    Token ids: the rendering of [user] with the generation prompt, tokenized (the ids the generator
    feeds the model), followed by the tokens of the rest of the rendered conversation (the assistant
    answer and its end-of-turn token), tokenized on their own: the pieces `alphatoken.data.encode_chat`
    uses. The sequence ends with the last scored token.

    Scored tokens (labels set, everything else -100): the answer tokens whose first character (by the
    tokenizer's offset mapping) lies inside `solution`. A token that straddles the boundary from the
    prefix (e.g. "\\n   " made of the docstring's last newline and the body's first indentation)
    starts in the prefix and is not scored; the end-of-turn token and the closing fence are not.
    Longer than max_length: cut there (truncated = True); if no scored token is left,
    `ExampleDropped("prompt_too_long")`.
    """
    user = [{"role": "user", "content": example.prompt}]
    conversation = user + [{"role": "assistant", "content": example.answer}]
    prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"example {example.id}: the chat template does not render the prompt (add_generation_prompt=True) "
                         f"as a prefix of the conversation; cannot locate the answer")
    answer_text = full_text[len(prompt_text):]
    start = answer_text.find(example.answer)
    if start < 0:
        raise ValueError(f"example {example.id}: the chat template changed the answer text; cannot locate the solution")
    begin, end = start + len(example.answer_prefix), start + len(example.answer_prefix) + len(example.solution)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    try:
        answer = tokenizer(answer_text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ValueError(f"{type(tokenizer).__name__} gives no offset mapping (a fast tokenizer is needed)") from None
    starts = [a for a, _ in answer["offset_mapping"]]
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"example {example.id}: the tokenizer's offsets are not increasing; cannot locate the solution")
    scored = [begin <= s < end for s in starts]
    if not any(scored):
        raise records.ExampleDropped("empty_solution", f"example {example.id}: the solution encodes to no token")
    last = max(j for j, s in enumerate(scored) if s)
    input_ids = prompt_ids + answer["input_ids"][: last + 1]
    labels = [IGNORE_INDEX] * len(prompt_ids) + [t if s else IGNORE_INDEX for t, s in zip(answer["input_ids"][: last + 1], scored)]
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(y == IGNORE_INDEX for y in labels[1:]):
        raise records.ExampleDropped("prompt_too_long", f"example {example.id}: no solution token within max_length={max_length}")
    return {"input_ids": input_ids, "labels": labels}, truncated


def solution_nll(model, tokenizer, examples: list[SolutionExample], max_length: int = 2048, batch_size: int = 4,
                 name: str = "solution_nll") -> MetricResult:
    """Per problem, the mean nll (nats/token) of its reference solution's tokens inside the answer
    (`encode_solution` says exactly which tokens count)."""
    features, ids, truncated, skipped = [], [], 0, Counter()
    for example in examples:
        try:
            feature, cut = encode_solution(example, tokenizer, max_length)
        except records.ExampleDropped as drop:
            skipped[drop.reason] += 1
            continue
        features.append(feature)
        ids.append(example.id)
        truncated += cut
    _check_ids(ids)
    if not features:
        raise ValueError(f"{name}: no example could be scored (skipped: {dict(skipped)})")
    values, tokens = _mean_nll(model, features, pad_token_id(tokenizer), batch_size, name)
    return _result(name, ids, values, tokens, truncated, skipped)


# ----------------------------------------------------------------------------------------------
# Drift on the gold continuations of retention documents


def gold_continuation(doc: dict) -> tuple[str, str]:
    """(context, continuation) of a retention document.

    Multiple choice (`choices`, `gold`): the gold choice, which carries its leading delimiter.
    GSM8K-style (`answer`): the worked answer, joined by lm-eval's target delimiter " " unless the
    answer starts, or the context ends, with whitespace already.
    """
    where = f"document {doc.get('id', '?')!r}"
    context = doc.get("context")
    if not isinstance(context, str) or not context:
        raise ValueError(f"{where}: field 'context' missing or empty")
    if "choices" in doc:
        choices, gold = doc["choices"], doc.get("gold")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: field 'choices' is not a list of strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"{where}: field 'gold' is not an index into 'choices'")
        return context, choices[gold]
    answer = doc.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: neither 'choices' nor a non-empty 'answer'")
    delimiter = "" if answer[:1].isspace() or context[-1:].isspace() else " "
    return context, delimiter + answer


def encode_continuation(tokenizer, context: str, continuation: str, max_length: int) -> tuple[dict, bool]:
    """({"input_ids", "labels"}, truncated) with labels on the continuation tokens, encoded as
    lm-eval encodes a loglikelihood request (`LM._encode_pair`): trailing whitespace of the context
    moves to the continuation, whole = encode(context + continuation), continuation tokens =
    whole[len(encode(context)):] (the tokenizer's default special tokens, as lm-eval's HF model).
    Longer than max_length: the oldest context tokens are cut (truncated = True)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    if n_context >= len(whole):
        raise records.ExampleDropped("empty_continuation", "the continuation encodes to no token")
    labels = [IGNORE_INDEX] * n_context + whole[n_context:]
    truncated = len(whole) > max_length
    return {"input_ids": whole[-max_length:], "labels": labels[-max_length:]}, truncated


def select_docs(docs: list[dict], n: int | None, seed: int = 0) -> list[dict]:
    """A seeded subset of n documents that depends only on their ids: the n with the smallest
    SHA-256 of f"{seed}:{id}", in that order (the same ids for every model and any input order).
    n=None takes all of them (in the same order). Ids must be unique."""
    ids = [str(doc.get("id")) if isinstance(doc, dict) and doc.get("id") is not None else None for doc in docs]
    missing = [i for i, ident in enumerate(ids) if ident is None]
    if missing:
        raise ValueError(f"document {missing[0]}: field 'id' missing")
    _check_ids(ids)
    if n is not None and not 0 < n <= len(docs):
        raise ValueError(f"cannot select {n} of {len(docs)} documents")
    key = {ident: hashlib.sha256(f"{seed}:{ident}".encode()).hexdigest() for ident in ids}
    order = sorted(range(len(docs)), key=lambda i: key[ids[i]])
    return [docs[i] for i in order[: len(docs) if n is None else n]]


@torch.no_grad()
def gold_continuation_drift(model, reference, tokenizer, docs: list[dict], max_length: int = 1024, batch_size: int = 8,
                            name: str = "gold_continuation") -> dict[str, MetricResult]:
    """Per document, over its gold-continuation tokens t (`gold_continuation`, `encode_continuation`):

        kl          = mean_t KL(pi_ref(.|x_<t) || pi(.|x_<t))   (float64 softmaxes, `drift.token_kl`)
        nll         = mean_t nll_t under the model
        nll_reference = mean_t nll_t under the reference
        nll_change  = nll - nll_reference

    Returns {"kl", "nll", "nll_reference", "nll_change"} -> MetricResult named f"{name}/{key}". Both
    models must share the tokenizer. Documents come from `select_docs` (the same ids for every model)."""
    features, ids, truncated, skipped = [], [], 0, Counter()
    for doc in docs:
        try:
            feature, cut = encode_continuation(tokenizer, *gold_continuation(doc), max_length)
        except records.ExampleDropped as drop:
            skipped[drop.reason] += 1
            continue
        features.append(feature)
        ids.append(str(doc["id"]))
        truncated += cut
    _check_ids(ids)
    if not features:
        raise ValueError(f"{name}: no document could be scored (skipped: {dict(skipped)})")
    keys = ("kl", "nll", "nll_reference", "nll_change")
    values = {k: [math.nan] * len(features) for k in keys}
    tokens = 0
    pad_id = pad_token_id(tokenizer)
    with _EvalMode(model, reference):
        for index in tqdm(list(_batches(features, batch_size)), desc=name):
            batch = records.collate([features[i] for i in index], pad_id)  # each (B, T)
            rows = zip(index, _scored_logits(model, batch), _scored_logits(reference, batch), _scored_targets(batch))
            for i, logits, ref_logits, targets in rows:
                ref_logits = ref_logits.to(logits.device)  # (n_i, V)
                kl = token_kl(ref_logits, logits)  # (n_i,) KL(ref || model)
                nll, nll_ref = token_nll_rows(logits, targets), token_nll_rows(ref_logits, targets)  # (n_i,)
                values["kl"][i], values["nll"][i] = float(kl.mean()), float(nll.mean())
                values["nll_reference"][i], values["nll_change"][i] = float(nll_ref.mean()), float((nll - nll_ref).mean())
                tokens += nll.numel()
    return {k: _result(f"{name}/{k}", ids, values[k], tokens, truncated, skipped) for k in keys}
