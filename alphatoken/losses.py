"""Per-token losses, top-rho masks and the masked SFT / DPO objectives (paper Eq. 13 and Eq. 14).

Alignment conventions (as in the method page):
- `labels [B, T]` holds -100 on prompt and padding. Loss position `p` predicts `input_ids[p+1]`, so
  per-position quantities (`token_nll`, weights passed to the losses) are `[B, T-1]`.
- Token values and masks returned by policies are aligned with `labels` (`[B, T]`, entry `t` is the
  token `input_ids[t]`, read at `p = t-1`); `to_loss_positions` drops column 0 to move them to `[B, T-1]`.

Normalisation. The losses return *sums* (`sum_p w_p l_p`, or `sum_pairs omega * (...)`) and take an
explicit `normalizer`; the training loop passes the number of kept tokens (SFT) or of pairs (DPO) of
the whole optimizer step (all micro-batches, all ranks), so the step's gradient is the same whatever
the micro-batch split. Called without a normalizer they are the per-micro-batch means of Eq. 13/14.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alphatoken.data import IGNORE_INDEX


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """`[B, T] -> [B, T-1]` bool: position p is scored when `labels[p+1] != -100`."""
    return labels[:, 1:] != IGNORE_INDEX  # (B, T-1)


def to_loss_positions(token_values: torch.Tensor) -> torch.Tensor:
    """A label-aligned `[B, T]` tensor (value of token t) -> loss-position `[B, T-1]` (read at p = t-1)."""
    return token_values[:, 1:]  # (B, T-1)


class _ShiftedNLL(torch.autograd.Function):
    """l[b, p] = logsumexp(z[b, p]) - z[b, p, y[b, p]] (0 where y = -100), from the logits z [B, T, V]
    themselves: no shifted copy of the logits and no stored log-softmax. Backward forms one [B, T, V]
    tensor, g (softmax - onehot), where autograd's cross-entropy forms three (the scatter target, the
    log-softmax gradient, the gradient of the shifted slice)."""

    @staticmethod
    def forward(ctx, logits, targets, dtype):
        z = logits.to(dtype)  # (B, T, V); no copy when already in dtype
        lse = torch.logsumexp(z, dim=-1)  # (B, T)
        valid = targets != IGNORE_INDEX  # (B, T)
        safe = targets.clamp_min(0).unsqueeze(-1)  # (B, T, 1)
        nll = (lse - z.gather(-1, safe).squeeze(-1)) * valid  # (B, T)
        ctx.save_for_backward(logits, lse, safe, valid)
        ctx.dtype = dtype
        return nll

    @staticmethod
    def backward(ctx, grad):
        logits, lse, safe, valid = ctx.saved_tensors
        g = (grad * valid).unsqueeze(-1)  # (B, T, 1), 0 where ignored
        out = torch.sub(logits.to(ctx.dtype), lse.unsqueeze(-1)).exp_()  # (B, T, V) softmax, the one new tensor
        out.scatter_add_(-1, safe, torch.full_like(g, -1.0))  # softmax - onehot
        out.mul_(g)
        return out.to(logits.dtype), None, None


def token_nll(logits: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-position negative log-likelihood `l_p = -log pi(labels[p+1] | input_ids[<=p])`.

    logits: `[B, T, V]`, labels: `[B, T]` (-100 ignored). Returns `[B, T-1]`, 0 where ignored, in
    `dtype` (default: at least float32; bf16/fp16 logits are upcast). Equal to cross-entropy on the
    shifted logits (tested), computed without copying them (`_ShiftedNLL`)."""
    if dtype is None:
        dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the last position predicts nothing
    return _ShiftedNLL.apply(logits, targets, dtype)[:, :-1]  # (B, T-1)


def kept_count(n_valid: int, rho: float) -> int:
    """`ceil(rho * N)`, computed on `rho` rounded to 9 decimals so that e.g. 0.3 * 10 keeps 3, not 4."""
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho} must be in (0, 1]")
    return min(n_valid, math.ceil(round(rho * n_valid, 9)))


def top_rho_mask(scores: torch.Tensor, valid: torch.Tensor, rho: float) -> torch.Tensor:
    """Keep exactly `ceil(rho * N)` of the `N` valid entries with the largest scores.

    `m = 1[score >= tau_rho]` with ties broken deterministically: entries are ranked by
    (score descending, flat index ascending), i.e. a stable sort. Any shape; returns a detached bool
    mask of the same shape, False where `valid` is False. Raises on NaN scores at valid entries."""
    valid = valid.bool()
    flat_scores = scores.detach().reshape(-1)  # (N_all,)
    flat_valid = valid.reshape(-1)  # (N_all,)
    n_valid = int(flat_valid.sum())
    mask = torch.zeros_like(flat_valid)
    if n_valid == 0:
        return mask.view(valid.shape)
    candidates = flat_valid.nonzero().squeeze(1)  # (N,) flat indices, ascending
    values = flat_scores[candidates]
    if torch.isnan(values).any():
        raise ValueError(f"top_rho_mask: {int(torch.isnan(values).sum())} NaN scores among {n_valid} valid tokens")
    k = kept_count(n_valid, rho)
    order = torch.sort(-values.float() if values.dtype in (torch.float16, torch.bfloat16) else -values, stable=True).indices
    mask[candidates[order[:k]]] = True
    return mask.view(valid.shape)


def soft_weights(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft weighting instead of a hard mask: values min-max normalised to [0, 1] over the valid
    entries, `w = (s - min s) / (max s - min s)`; all ones when every valid value is equal. Detached,
    0 where not valid."""
    valid = valid.bool()
    weights = torch.zeros(scores.shape, dtype=torch.float64 if scores.dtype == torch.float64 else torch.float32, device=scores.device)
    if not valid.any():
        return weights
    values = scores.detach()[valid].to(weights.dtype)
    if torch.isnan(values).any():
        raise ValueError("soft_weights: NaN scores among valid tokens")
    low, high = values.min(), values.max()
    weights[valid] = torch.ones_like(values) if high <= low else (values - low) / (high - low)
    return weights


def masked_sft_loss(token_loss: torch.Tensor, weights: torch.Tensor, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Alpha-SFT (Eq. 13) with the mean over kept tokens: `sum_p w_p l_p / normalizer`.

    token_loss, weights: `[B, T-1]` (weights detached; a 0/1 mask or soft weights, 0 where ignored).
    normalizer defaults to `sum_p w_p` (the kept tokens of this batch); a zero normalizer gives a zero
    loss that still carries the graph (so backward yields zero gradients)."""
    weights = weights.detach().to(token_loss.dtype)
    total = (weights * token_loss).sum()
    if normalizer is None:
        normalizer = weights.sum()
    if float(normalizer) == 0.0:
        return total * 0.0
    return total / normalizer


def sequence_logps(token_loss: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """`log pi(y | x) = -sum_p w_p l_p` per example: `[B, T-1] -> [B]` (weights default to all ones;
    ignored positions already hold l_p = 0)."""
    if weights is None:
        return -token_loss.sum(dim=1)  # (B,)
    return -(weights.detach().to(token_loss.dtype) * token_loss).sum(dim=1)  # (B,)


def dpo_logit(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> torch.Tensor:
    """DPO preference logit `s = beta * ((log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-)))`, `[B]`."""
    return beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))  # (B,)


def dpo_weight(logit: torch.Tensor, beta: float) -> torch.Tensor:
    """`omega = beta * sigmoid(-s)`, detached: the sequence-level DPO coefficient (Rafailov et al., 2023)."""
    return (beta * torch.sigmoid(-logit)).detach()  # (B,)


def dpo_loss(logit: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """Plain DPO: `sum_pairs -log sigmoid(s) / normalizer` (mean over pairs by default)."""
    total = -F.logsigmoid(logit).sum()
    return total / (logit.numel() if normalizer is None else normalizer)


def alpha_dpo_loss(
    chosen_loss: torch.Tensor,
    rejected_loss: torch.Tensor,
    chosen_weights: torch.Tensor,
    rejected_weights: torch.Tensor,
    omega: torch.Tensor,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Alpha-DPO (Eq. 14): `sum_pairs omega_sg * (sum_p m+_p l+_p - sum_p m-_p l-_p) / normalizer`.

    chosen_loss / rejected_loss: `[B, T-1]` per-position NLL of y+ / y-; the weights (masks) are
    detached `[B, T-1]`; omega `[B]` is `beta * sigmoid(-s)` from the *unmasked* logit, detached.
    With all-ones masks its gradient equals the gradient of plain DPO; normalizer defaults to B."""
    omega = omega.detach().to(chosen_loss.dtype)
    chosen = (chosen_weights.detach().to(chosen_loss.dtype) * chosen_loss).sum(dim=1)  # (B,)
    rejected = (rejected_weights.detach().to(rejected_loss.dtype) * rejected_loss).sum(dim=1)  # (B,)
    total = (omega * (chosen - rejected)).sum()
    return total / (omega.numel() if normalizer is None else normalizer)


def masked_dpo_loss(
    chosen_loss: torch.Tensor,
    rejected_loss: torch.Tensor,
    ref_chosen_loss: torch.Tensor,
    ref_rejected_loss: torch.Tensor,
    chosen_weights: torch.Tensor,
    rejected_weights: torch.Tensor,
    beta: float,
    normalizer: float | None = None,
) -> torch.Tensor:
    """DPO whose log-ratios sum over selected tokens only (ConfPO, Yoon et al., ICML 2025):
    `-log sigmoid(beta * (sum_p m+_p (log pi - log pi_ref)(y+_p) - sum_p m-_p (log pi - log pi_ref)(y-_p)))`,
    summed over pairs and divided by `normalizer` (default: number of pairs). All inputs `[B, T-1]`."""
    chosen_ratio = sequence_logps(chosen_loss, chosen_weights) - sequence_logps(ref_chosen_loss, chosen_weights)  # (B,)
    rejected_ratio = sequence_logps(rejected_loss, rejected_weights) - sequence_logps(ref_rejected_loss, rejected_weights)  # (B,)
    return dpo_loss(beta * (chosen_ratio - rejected_ratio), normalizer)


def position_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position `KL(pi_ref || pi) = sum_v pi_ref(v) (log pi_ref(v) - log pi(v))` of the next-token
    distributions at the loss positions (TDPO's sequential KL, Zeng et al. ICML 2024). logits,
    ref_logits `[B, T, V]` (ref detached), labels `[B, T]` -> `[B, T-1]`, 0 where ignored."""
    dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    logp = torch.log_softmax(logits[:, :-1].to(dtype), dim=-1)  # (B, T-1, V)
    ref_logp = torch.log_softmax(ref_logits[:, :-1].detach().to(dtype), dim=-1)  # (B, T-1, V)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)  # (B, T-1)
    return kl * loss_positions(labels)


def tdpo_pair_losses(chosen_ratio, rejected_ratio, chosen_weights, rejected_weights, chosen_kl, rejected_kl,
                     beta: float, alpha: float) -> torch.Tensor:
    """TI-DPO's base loss per pair, TDPO2 with token weights (gracefulning/TIDPO trainers.py `tdpo_loss`
    on `_weighted_tdpo_get_batch_logps`):
    `-log sigmoid(beta * (sum_p w+_p r+_p - sum_p w-_p r-_p - alpha * (KL- - sg(KL+))))`,
    r = log pi - log pi_ref per position, KL = sum_p KL_p (unweighted). Inputs `[B, T-1]` (0 off the
    response; weights detached) -> `[B]`."""
    chosen = (chosen_weights.detach().to(chosen_ratio.dtype) * chosen_ratio).sum(dim=1)  # (B,)
    rejected = (rejected_weights.detach().to(rejected_ratio.dtype) * rejected_ratio).sum(dim=1)  # (B,)
    z = chosen - rejected - alpha * (rejected_kl.sum(dim=1) - chosen_kl.sum(dim=1).detach())  # (B,)
    return -F.logsigmoid(beta * z)


def triplet_losses(anchor_ratio, anchor_valid, chosen_ratio, chosen_valid, rejected_ratio, rejected_valid,
                   margin: float) -> torch.Tensor:
    """TI-DPO's triplet term per pair (gracefulning/TIDPO trainers.py `_compute_triplet_loss`):
    `ReLU(||a - c||^2 - ||a - r||^2 + margin)` over the per-token log-ratio vectors of the anchor a,
    the chosen c and the rejected r response, each packed to its response tokens in order; a squared
    distance sums over the positions both responses have (the first min(n_a, n_c) tokens). Each
    ratio/valid pair `[B, T_x]` (any widths) -> `[B]`."""
    rows = []
    for b in range(anchor_ratio.shape[0]):
        a = anchor_ratio[b][anchor_valid[b].bool()]  # (n_a,)
        c = chosen_ratio[b][chosen_valid[b].bool()]  # (n_c,)
        r = rejected_ratio[b][rejected_valid[b].bool()]  # (n_r,)
        n_c, n_r = min(a.numel(), c.numel()), min(a.numel(), r.numel())
        to_chosen = ((a[:n_c] - c[:n_c]) ** 2).sum()
        to_rejected = ((a[:n_r] - r[:n_r]) ** 2).sum()
        rows.append(F.relu(to_chosen - to_rejected + margin))
    return torch.stack(rows)  # (B,)


def selective_mean_losses(chosen_loss, rejected_loss, chosen_weights, rejected_weights) -> torch.Tensor:
    """SePO's reference-free loss per pair (SteveKGYang/SePO utils_selective.py `SelectiveRRHFLoss`):
    `-log sigmoid(mean_{S+} log pi(y+_p) - mean_{S-} log pi(y-_p))`, S the selected positions (weights
    0/1, detached; an empty selection contributes a mean of 0). Inputs `[B, T-1]` -> `[B]`."""
    def selected_mean(token_loss, weights):
        weights = weights.detach().to(token_loss.dtype)
        return -(weights * token_loss).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # (B,)

    return -F.logsigmoid(selected_mean(chosen_loss, chosen_weights) - selected_mean(rejected_loss, rejected_weights))
