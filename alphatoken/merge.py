"""Weight-space merges after training: Wise-FT (Wortsman et al., CVPR 2022).

    theta = (1 - alpha) * theta_0 + alpha * theta_ft        for every tensor of the state dict

with theta_0 the model before fine-tuning (here the base model) and theta_ft after it; alpha = 0 is
the base model, alpha = 1 the fine-tuned one, the paper's default is 0.5 and it sweeps alpha in
[0, 1]. As the official code (mlfoundations/wise-ft `src/wise_ft.py`, `_merge` without Fisher
weights): the two state dicts must have the same keys, every key is interpolated, and the merged dict
is loaded into the fine-tuned model, so the result has the fine-tuned model's dtypes and structure.
Beyond it: shapes are checked (naming the key), integer buffers are copied from theta_ft instead of
being interpolated and truncated back, the arithmetic runs in the wider dtype of the two tensors, and
tied weights (one tensor under two keys, SmolLM2's `embed_tokens` / `lm_head`) are merged once, so a
model loading the dict stays tied.

`alpha_tag` is the text of an alpha in run paths and report rows (`wiseft_a0.5`): Python's `str()`
of the float, which is what both Snakemake's `expand` and DVC's `${item.alpha}` write, so the two
front ends name the same merge the same way.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import torch
from torch import nn

from alphatoken.runs import WISEFT_ROW_PREFIX

ROW_PREFIX = WISEFT_ROW_PREFIX  # report row of a merge: wiseft_a<alpha_tag> (its run kind: alphatoken.runs)
TAG_PATTERN = r"[01]\.[0-9]+"  # str() of a float in [0, 1] without an exponent: 0.5, 0.25, 1.0


class MergeError(ValueError):
    """Two state dicts that cannot be merged, or a bad alpha; the message names the key or the value."""


def check_alpha(alpha) -> float:
    """`alpha` as a float in [0, 1] (a bool, a string, NaN or a value outside is a MergeError)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise MergeError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def alpha_tag(alpha) -> str:
    """The text of `alpha` in paths and row names: `str(alpha)` of a float in [0, 1] written with a
    decimal point and no exponent (0.5 -> "0.5", 1.0 -> "1.0"). An int (1 for 1.0) is refused, so one
    merge has one name; so is a float whose str() has an exponent (1e-05)."""
    check_alpha(alpha)
    if not isinstance(alpha, float):
        raise MergeError(f"alpha {alpha!r} is an integer: write it as a float ({float(alpha)!r}); the run's path and "
                         "row name are str(alpha)")
    if not re.fullmatch(TAG_PATTERN, str(alpha)):
        raise MergeError(f"alpha {alpha!r} is written {str(alpha)!r} by str(): use a value of at least 1e-4 "
                         f"(paths and row names are str(alpha), matching {TAG_PATTERN})")
    return str(alpha)


def row_name(alpha: float) -> str:
    """Report row of the merge with `alpha`: wiseft_a0.5."""
    return ROW_PREFIX + alpha_tag(alpha)


def _identity(tensor: torch.Tensor) -> tuple:
    """What makes two state-dict entries one tensor: the same memory, offset, shape, strides, dtype."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tensor.stride(), tensor.dtype)


def ties(state: Mapping[str, torch.Tensor]) -> set[frozenset[str]]:
    """The groups of keys (two or more) of `state` that hold one tensor: tied weights."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in state.items():
        if tensor.numel():  # empty tensors may all report address 0
            groups.setdefault(_identity(tensor), []).append(key)
    return {frozenset(keys) for keys in groups.values() if len(keys) > 1}


def check_mergeable(theta_0: Mapping[str, torch.Tensor], theta_ft: Mapping[str, torch.Tensor]) -> None:
    """MergeError naming the first key (in theta_0's order, then theta_ft's) in only one state dict,
    else the first key whose shape or kind (floating point or not) differs, else the tied keys of one
    state dict that the other does not tie."""
    only = [k for k in theta_0 if k not in theta_ft] + [k for k in theta_ft if k not in theta_0]
    if only:
        side = "theta_0 (the base model)" if only[0] in theta_0 else "theta_ft (the fine-tuned model)"
        raise MergeError(f"the state dicts differ: key {only[0]!r} is only in {side} ({len(only)} keys in one only); "
                         "merge two checkpoints of one architecture")
    for key, a in theta_0.items():
        b = theta_ft[key]
        if a.shape != b.shape:
            raise MergeError(f"{key!r}: shape {tuple(a.shape)} in theta_0, {tuple(b.shape)} in theta_ft")
        if a.is_floating_point() != b.is_floating_point():
            raise MergeError(f"{key!r}: dtype {a.dtype} in theta_0, {b.dtype} in theta_ft (one is not floating point)")
    tied_0, tied_ft = ties(theta_0), ties(theta_ft)
    if tied_0 != tied_ft:
        group = sorted(tied_0 ^ tied_ft, key=sorted)[0]
        side = "theta_0" if group in tied_0 else "theta_ft"
        raise MergeError(f"keys {sorted(group)} are one tensor (tied) in {side} only")


def wise_ft(theta_0: Mapping[str, torch.Tensor], theta_ft: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The Wise-FT merge of two state dicts with the same keys and shapes (`check_mergeable`), in
    theta_ft's key order, new tensors on theta_ft's devices:
      - floating-point tensors: (1 - alpha) * theta_0[k] + alpha * theta_ft[k], computed in the wider
        of the two dtypes and stored in theta_ft's dtype (non-finite results are a MergeError);
      - other tensors (integer buffers such as step counters): theta_ft[k], copied;
      - keys tied in both (one tensor): one merged tensor under all of them.
    alpha = 0 and alpha = 1 return theta_0 and theta_ft exactly (x + 0 * y == x for finite y).

    The naive equivalent, for untied float state dicts of one dtype:
        {k: (1 - alpha) * theta_0[k] + alpha * theta_ft[k] for k in theta_ft}
    """
    alpha = check_alpha(alpha)
    check_mergeable(theta_0, theta_ft)
    merged: dict[str, torch.Tensor] = {}
    by_identity: dict[tuple, torch.Tensor] = {}
    for key, b in theta_ft.items():
        identity = _identity(b) if b.numel() else ("empty", key)
        if identity in by_identity:  # a tied key: the tensor merged under its first key
            merged[key] = by_identity[identity]
            continue
        if b.is_floating_point():
            a = theta_0[key]
            wide = torch.promote_types(a.dtype, b.dtype)
            value = ((1 - alpha) * a.to(device=b.device, dtype=wide) + alpha * b.to(wide)).to(b.dtype)
            if not bool(torch.isfinite(value).all()):
                raise MergeError(f"{key!r}: the merge has non-finite values (theta_0 or theta_ft holds inf or NaN)")
        else:
            value = b.detach().clone()
        merged[key] = by_identity[identity] = value
    return merged


def wise_ft_model(base: nn.Module, finetuned: nn.Module, alpha: float) -> nn.Module:
    """`finetuned` with its weights replaced, in place, by their Wise-FT merge with those of `base`
    (`wise_ft` of the two state dicts, loaded into the fine-tuned model as in the official code). Its
    tied weights stay tied: checked after loading."""
    theta_ft = finetuned.state_dict()
    tied = ties(theta_ft)
    merged = wise_ft(base.state_dict(), theta_ft, alpha)
    finetuned.load_state_dict(merged, strict=True)
    after = ties(finetuned.state_dict())
    if after != tied:
        raise MergeError(f"loading the merge changed the tied weights: {sorted(map(sorted, tied))} before, "
                         f"{sorted(map(sorted, after))} after")
    return finetuned
