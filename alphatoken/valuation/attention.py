"""Eager attention that keeps its probabilities, used only while the valuation re-runs the scored
blocks. Registered once in transformers' `AttentionInterface` under `ATTENTION_NAME`; the model's
config points at it only for the duration of a re-run (see `signals.rerun_scored_blocks`), so the
ordinary forward keeps the model's own (e.g. sdpa) attention.

With `stop_cross_position_grad` the forward values are unchanged but the gradient that the output
at query position p sends into keys and values flows only into position p itself (the other
positions' keys and values are detached); the query keeps its gradient. One backward of
sum_p l_p then yields every e_p = d l_p / d z_p (METHOD.md, `self` signal).

What the record keeps (memory at the paper's sizes): with `band=W` only the causal band
band[b, h, p, d-1] = A_h[p+d, p], d = 1..W, is copied out of the probabilities: B*H*T*W elements per
block (4 x 4,096 tokens, 32 heads, W = 32: 16.8M elements, 67 MB in fp32, against 2.1G elements,
8.6 GB, for the full (B, H, T, T) matrix). `band=0` keeps nothing (validation re-runs) and
`band=None` the full matrix (inspection and tests). Beyond the record, the re-run holds (B, H, T, T)
scores and probabilities only as eager attention's own saved tensors, which its backward releases."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import torch

ATTENTION_NAME = "alphatoken_valuation"


@dataclass
class AttentionRecord:
    stop_cross_position_grad: bool  # forward-identical attention with gradient kept on the own position only
    probs: dict = field(default_factory=dict)  # id(attention module) -> (B, H, T, T) probabilities (band=None)
    keep: bool = True  # record the probabilities (False: plain eager attention outside a re-run)
    band: int | None = None  # W: record only the causal band (B, H, T, W); 0: record nothing; None: full matrix
    bands: dict = field(default_factory=dict)  # id(attention module) -> (B, H, T, W) band, detached
    # id(attention module) -> (B, T, H, hd) attention output, in the re-run graph: its gradient is the
    # context error c (taken before any output gate and o_proj the module applies afterwards)
    outputs: dict = field(default_factory=dict)


def causal_band(probs: torch.Tensor, window: int) -> torch.Tensor:
    """band[b, h, p, d-1] = probs[b, h, p+d, p] for d = 1..window (0 where p + d >= T).
    probs (B, H, T, T) [query k, key p] -> (B, H, T, window), a copy (the full matrix is not referenced)."""
    B, H, T, _ = probs.shape
    band = probs.new_zeros(B, H, T, window)  # (B, H, T, W)
    for d in range(1, min(window, T - 1) + 1):
        band[:, :, : T - d, d - 1] = probs.diagonal(offset=-d, dim1=-2, dim2=-1)  # (B, H, T-d): A_h[p+d, p]
    return band


_ACTIVE: contextvars.ContextVar[AttentionRecord | None] = contextvars.ContextVar("alphatoken_attention", default=None)


def additive_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, dtype, device) -> torch.Tensor:
    """The mask that transformers built for the original implementation, as an additive float mask
    (0 = attend, finfo.min = masked), like `masking_utils.eager_mask`. `None` (sdpa's "plain causal")
    becomes the causal lower triangle."""
    if attention_mask is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)  # (Tq, Tk)
        attention_mask = allowed[None, None]  # (1, 1, Tq, Tk)
    attention_mask = attention_mask[:, :, :, :kv_len]
    if attention_mask.dtype == torch.bool:
        zero = torch.tensor(0.0, dtype=dtype, device=device)
        return torch.where(attention_mask, zero, torch.finfo(dtype).min)
    return attention_mask.to(dtype)


def capturing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Same signature and result as transformers' `eager_attention_forward`:
    softmax(q k^T * scaling (softcapped) + mask) v, with grouped-query heads; dropout is not applied
    (valuation is deterministic). query (B, H, Tq, hd), key/value (B, Hkv, Tk, hd)."""
    record = _ACTIVE.get() or AttentionRecord(stop_cross_position_grad=False, keep=False)
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)  # (B, H, Tk, hd), kv head g serves heads g*n_rep .. g*n_rep+n_rep-1
    value = value.repeat_interleave(n_rep, dim=1)  # (B, H, Tk, hd)
    if scaling is None:
        scaling = module.head_dim**-0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    if record.stop_cross_position_grad:
        if q_len != kv_len:
            raise ValueError("the self-signal attention needs the full sequence (no KV cache)")
        key_d, value_d = key.detach(), value.detach()
        own = (query * (key - key_d)).sum(-1)  # (B, H, T) exactly zero, carries the own-key gradient
        scores = query @ key_d.transpose(2, 3)  # (B, H, T, T); matmul saves its inputs, not this output
        scores.diagonal(dim1=-2, dim2=-1).add_(own)  # own-key term on the diagonal, no dense (T, T) copy
    else:
        scores = query @ key.transpose(2, 3)  # (B, H, Tq, Tk)
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + additive_mask(attention_mask, q_len, kv_len, scores.dtype, scores.device)
    # float32 softmax as in transformers' eager attention; float64 stays float64 (an all-masked padding
    # row then stays finite instead of turning into NaN through a float32 -inf)
    softmax_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)  # (B, H, Tq, Tk)
    if record.stop_cross_position_grad:
        own_prob = probs.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (B, H, T, 1)
        out = probs @ value_d + own_prob * (value - value_d)  # (B, H, T, hd), value-identical to probs @ value
    else:
        out = probs @ value  # (B, H, Tq, hd)
    if record.keep and record.band is None:
        record.probs.setdefault(id(module), probs.detach())
    elif record.keep and record.band > 0 and id(module) not in record.bands:
        record.bands[id(module)] = causal_band(probs.detach(), record.band)
    out = out.transpose(1, 2).contiguous()  # (B, Tq, H, hd)
    if record.keep:
        record.outputs.setdefault(id(module), out)
    return out, probs


def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, capturing_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


class active_record:
    """Context manager making `record` the destination of `capturing_attention`."""

    def __init__(self, record: AttentionRecord):
        self.record = record

    def __enter__(self):
        self.token = _ACTIVE.set(self.record)
        return self.record

    def __exit__(self, *exc):
        _ACTIVE.reset(self.token)
        return False
