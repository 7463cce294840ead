"""Reference per-token losses of the training data under the frozen reference model, computed once.

DPO compares the policy with the reference model pi_ref (the warm-start checkpoint) on every training
pair, and the reference-loss policies (STM, Token Cleaning, Rho-1) compare per-token losses. Both need,
for every training sequence n (each branch of a pair) and position p,

    l_ref[n, p] = -log pi_ref(x[n, p+1] | x[n, <=p])        one tensor [len_n - 1] per sequence
                                                             (0 where the label is ignored: the prompt)

and the valuer's DPO validation objective needs the validation pairs' sequence log-probabilities

    logp_ref[b] = -sum_p l_ref[b, p]                         (2 Bv,): chosen rows, then rejected rows.

Naive equivalent (one sequence at a time; what the tests compare against):

    for ids, labels in sequences:                                        # (T,), (T,)
        logp = log_softmax(model(ids[None]).logits[0, :-1], -1)          # (T-1, V)
        l_ref = -logp.gather(-1, labels[1:, None].clamp(min=0))[:, 0]    # (T-1,)
        l_ref[labels[1:] == -100] = 0

Fast path (`reference_token_losses`): the encoded training features in their order, `micro_batch_size`
sequences (pairs) per forward, right-padded, eval mode, no grad: the batching the training loop uses
when it computes them itself, so a file and the loop's own computation are bit-identical on the same
device and CPU thread count.

A file (`save_reference_logps`; the pipeline's `ref_logps` stage) holds them once for every run that
shares the reference model and the data. Safetensors, the per-sequence rows concatenated with their
lengths, and string metadata that identifies
    the model     weights fingerprint (`alphatoken.models.weights_fingerprint`: names, shapes, dtype,
                  bytes) and attention kernel,
    the data      kind (preference / chat), SHA-256 of the encoded training features and of the
                  validation batch, their counts, max_length,
    the batching  micro_batch_size,
so `load_reference_logps` refuses a file computed for other weights, data or batching, naming the file
and every field that differs with the expected and the found value.
"""

from __future__ import annotations

import hashlib
import json
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alphatoken import __version__
from alphatoken.checkpoint import atomic_write_bytes
from alphatoken.tensorfile import deterministic_safetensors, read_safetensors_metadata
from alphatoken.losses import token_nll
from alphatoken.models import weights_fingerprint
from alphatoken.train.batches import as_batch, collate, collate_pairs, encode_dataset, pad_token_id

FORMAT = "alphatoken.reference_logps/1"  # metadata tag of a reference file; bump when its layout changes
BRANCHES = ("chosen", "rejected")
# Metadata fields that must equal the training run's for the file to be used (the rest is provenance).
CHECKED = ("kind", "weights_fingerprint", "attn_implementation", "max_length", "micro_batch_size",
           "train_count", "train_sha256")
CHECKED_VAL = ("val_count", "val_sha256")  # checked when the run needs the validation log-probs


class ReferenceMismatchError(ValueError):
    """A reference file that does not belong to the given model, data or batching."""


@dataclass
class ReferenceLogps:
    """The reference model's per-token losses of the training data (and validation log-probs)."""

    train: list  # per example: tensor [len-1] (chat), or {"chosen": [Lc-1], "rejected": [Lr-1]} (pairs)
    val: torch.Tensor | None  # (2Bv,) sequence log-probs of the validation pairs, or None
    metadata: dict = field(default_factory=dict)  # identity and provenance (strings), see the module docstring


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def reference_token_losses(model, features: list[dict], pad_id: int, device, micro_batch_size: int, preference: bool,
                           desc: str = "reference losses") -> list:
    """Per-example per-position NLL `[len-1]` under `model` (eval mode), in example order; for
    preference data a dict with "chosen" and "rejected"."""
    was_training = model.training
    model.eval()
    out = []
    for start in tqdm(range(0, len(features), micro_batch_size), desc=desc, leave=False, disable=len(features) < 64):
        chunk = features[start : start + micro_batch_size]
        batch = _to(collate_pairs(chunk, pad_id) if preference else collate(chunk, pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B', T, V)
        losses = token_nll(logits, batch["labels"]).cpu()  # (B', T-1)
        b = len(chunk)
        for row in range(b):
            if preference:
                lc, lr = len(chunk[row]["chosen"]["input_ids"]) - 1, len(chunk[row]["rejected"]["input_ids"]) - 1
                out.append({"chosen": losses[row, :lc].clone(), "rejected": losses[b + row, :lr].clone()})
            else:
                out.append(losses[row, : len(chunk[row]["input_ids"]) - 1].clone())
    model.train(was_training)
    return out


@torch.no_grad()
def reference_sequence_logps(model, batch: dict, device) -> torch.Tensor:
    """`-sum_p l_ref[b, p]` of every row of one batch (validation pairs: `(2Bv,)`), in one forward."""
    was_training = model.training
    model.eval()
    vb = _to(batch, device)
    logits = model(input_ids=vb["input_ids"], attention_mask=vb["attention_mask"]).logits  # (2Bv, T, V)
    logps = -token_nll(logits, vb["labels"]).sum(dim=1).cpu()  # (2Bv,)
    model.train(was_training)
    return logps


def features_sha256(features: list[dict], preference: bool) -> str:
    """SHA-256 over the token ids and labels of the encoded features, in order (each list prefixed
    with its length, int64 little-endian)."""
    digest = hashlib.sha256(b"preference" if preference else b"chat")
    for feature in features:
        for sequence in ([feature[b] for b in BRANCHES] if preference else [feature]):
            for key in ("input_ids", "labels"):
                values = array("q", sequence[key])
                if sys.byteorder != "little":
                    values.byteswap()
                digest.update(len(values).to_bytes(8, "little") + values.tobytes())
    return digest.hexdigest()


def batch_sha256(batch: dict) -> str:
    """SHA-256 over a batch's input_ids, attention_mask and labels (shape and int64 bytes)."""
    digest = hashlib.sha256()
    for key in ("input_ids", "attention_mask", "labels"):
        tensor = batch[key].detach().to("cpu", torch.int64).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def reference_identity(model, features: list[dict], val_batch: dict | None, max_length: int, micro_batch_size: int,
                       preference: bool) -> dict[str, str]:
    """The metadata fields a reference file must match (`CHECKED`, and `CHECKED_VAL` for `val_batch`)."""
    identity = {
        "kind": "preference" if preference else "chat",
        "weights_fingerprint": weights_fingerprint(model),
        "attn_implementation": str(getattr(getattr(model, "config", None), "_attn_implementation", "") or ""),
        "max_length": str(max_length),
        "micro_batch_size": str(micro_batch_size),
        "train_count": str(len(features)),
        "train_sha256": features_sha256(features, preference),
    }
    if val_batch is not None:
        identity["val_count"] = str(int(val_batch["input_ids"].shape[0]) // (2 if preference else 1))
        identity["val_sha256"] = batch_sha256(val_batch)
    return identity


def compute_reference_logps(model, tokenizer, examples: list, val_examples: list | None, max_length: int,
                            micro_batch_size: int, preference: bool = True) -> ReferenceLogps:
    """The reference losses of `examples` (encoded as the training loop encodes them: `max_length`,
    responses truncated, unusable examples skipped and counted in `metadata["train_skipped"]`) and,
    for preference data with `val_examples`, the validation pairs' sequence log-probs, under `model`
    on its device."""
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    device = next(model.parameters()).device
    features, stats = encode_dataset(tokenizer, examples, max_length, preference)
    if not features:
        raise ValueError(f"no usable training example within max_length={max_length} ({stats.as_dict()})")
    val_batch = as_batch(tokenizer, val_examples, max_length, preference) if preference and val_examples else None
    train = reference_token_losses(model, features, pad_token_id(tokenizer), device, micro_batch_size, preference)
    val = reference_sequence_logps(model, val_batch, device) if val_batch is not None else None
    config = getattr(model, "config", None)
    metadata = {
        "format": FORMAT,
        "library_version": __version__,
        "model_name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "device": device.type,
        "values_dtype": str(train[0]["chosen"].dtype if preference else train[0].dtype).removeprefix("torch."),
        "train_skipped": json.dumps(stats.as_dict(), sort_keys=True),
        "val_count": "0",
        "val_sha256": "",
        **reference_identity(model, features, val_batch, max_length, micro_batch_size, preference),
    }
    return ReferenceLogps(train, val, metadata)


def save_reference_logps(path: str | Path, reference: ReferenceLogps) -> Path:
    """Write `reference` as safetensors (`train[.<branch>]` rows concatenated, `...lengths` int64,
    `val`) with its metadata; written atomically (`alphatoken.checkpoint.atomic_write_bytes`: a
    temporary file in the same directory, fsync'ed, renamed over `path`), so never half-written."""
    path = Path(path)
    preference = reference.metadata.get("kind") == "preference"
    tensors = {}
    for branch in (BRANCHES if preference else (None,)):
        rows = [row[branch] for row in reference.train] if preference else reference.train
        name = f"train.{branch}" if preference else "train"
        tensors[name] = torch.cat([r.reshape(-1) for r in rows]).contiguous()  # (sum of lengths,)
        tensors[f"{name}.lengths"] = torch.tensor([r.numel() for r in rows], dtype=torch.int64)  # (N,)
    if reference.val is not None:
        tensors["val"] = reference.val.detach().to("cpu").contiguous()  # (2Bv,)
    return atomic_write_bytes(path, deterministic_safetensors(tensors, {k: str(v) for k, v in reference.metadata.items()}))


def read_reference_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a reference file (strings); ReferenceMismatchError when it is not one."""
    return read_safetensors_metadata(path, FORMAT, ReferenceMismatchError, "reference log-probs",
                                     "not written by alphatoken.train.reference.save_reference_logps")


def load_reference_logps(path: str | Path, model, features: list[dict], val_batch: dict | None, max_length: int,
                         micro_batch_size: int, preference: bool = True) -> ReferenceLogps:
    """Load a file written by `save_reference_logps` after checking that it was computed from `model`
    (the reference model, before any update) on exactly `features` (and `val_batch`, when given) with
    this `max_length` and `micro_batch_size`. Raises ReferenceMismatchError naming the file and every
    field that differs (expected, found). `val` is None unless `val_batch` is given."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_reference_metadata(path)
    expected = reference_identity(model, features, val_batch, max_length, micro_batch_size, preference)
    checked = CHECKED + (CHECKED_VAL if val_batch is not None else ())
    problems = [f"field {name!r}: expected {expected[name]!r}, found {metadata.get(name)!r}"
                for name in checked if metadata.get(name) != expected[name]]
    if problems:
        hints = []
        if any("'weights_fingerprint'" in p for p in problems):
            hints.append("it was computed from other weights than this reference model")
        if any("'train_" in p or "'kind'" in p or "'max_length'" in p for p in problems):
            hints.append("it was computed for other training data")
        if any("'val_" in p for p in problems):
            hints.append("it holds the log-probs of other validation pairs" if metadata.get("val_sha256")
                         else "it holds no validation log-probs")
        raise ReferenceMismatchError(f"{path}: reference log-probs do not match ({'; '.join(hints) or 'other settings'}): "
                                     + "; ".join(problems) + " -- recompute them (the ref_logps stage)")
    tensors = load_file(str(path))
    train_columns = {}
    for branch in (BRANCHES if preference else (None,)):
        name = f"train.{branch}" if preference else "train"
        lengths = tensors[f"{name}.lengths"].tolist()
        train_columns[branch] = [row.clone() for row in torch.split(tensors[name], lengths)]
    train = ([{b: train_columns[b][i] for b in BRANCHES} for i in range(len(features))] if preference
             else train_columns[None])
    return ReferenceLogps(train, tensors["val"] if val_batch is not None else None, metadata)
