"""The score arithmetic: pure functions on activations and errors (METHOD.md, "The four scores").
Nothing here forms a per-token parameter-sized tensor."""

from __future__ import annotations

import torch

from alphatoken.losses import token_nll as shifted_nll


def contract_direction(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """y_p = D x_p for a parameter-space direction D (G or P) of a linear. x (B, T, d_in),
    D (d_out, d_in) -> (B, T, d_out). The direct score is then sum_o y_p * e_p."""
    return x @ direction.T  # (B, T, d_out)


def ghost_direction(x: torch.Tensor, val_x: torch.Tensor, val_e: torch.Tensor) -> torch.Tensor:
    """y_p = G x_p with G = sum_v e_v (x) x_v given by the validation activations (N, d_in) and errors
    (N, d_out): y_p = sum_v (x_p . x_v) e_v. x (B, T, d_in) -> (B, T, d_out)."""
    return (x @ val_x.T) @ val_e  # (B, T, N) @ (N, d_out)


def ghost_direct(x: torch.Tensor, e: torch.Tensor, val_x: torch.Tensor, val_e: torch.Tensor) -> torch.Tensor:
    """Direct target score in activation-activation (ghost) form, paper Eq. 8:
    e_p^T G x_p = sum_v (e_p . e_v) (x_p . x_v). x (B, T, d_in), e (B, T, d_out) -> (B, T);
    one example at a time so the (T, N) products stay small."""
    rows = [((e[b] @ val_e.T) * (x[b] @ val_x.T)).sum(-1) for b in range(x.shape[0])]  # each (T,)
    return torch.stack(rows)  # (B, T)


def direct_score(y: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """e_p^T D x_p = sum_o e_p[o] y_p[o]. y, e (B, T, d_out) -> (B, T)."""
    return (y * e).sum(-1)


def causal_band_score(band: torch.Tensor, ctx_err: torch.Tensor, value_dir: torch.Tensor, window: int) -> torch.Tensor:
    """Value-path score of Eq. 9:
    cau(p) = sum_h sum_{k=p+1}^{min(p+W, T-1)} A_h[k, p] c_{k,h} . (M_{g(h)} x_p),
    with value_dir[p, g] = M_g x_p the value-projection direction (rows of G_V or P_V of kv group g)
    applied to the input of W_V. band (B, H, T, W') with band[b, h, p, d-1] = A_h[p+d, p] and
    W' >= window (`attention.causal_band`), ctx_err (B, T, H, hd), value_dir (B, T, Hkv, hd) -> (B, T)."""
    B, H, T, width = band.shape
    if width < min(window, T - 1):
        raise ValueError(f"the attention band has width {width}, the window needs {min(window, T - 1)}")
    n_rep = H // value_dir.shape[2]
    y = value_dir.repeat_interleave(n_rep, dim=2)  # (B, T, H, hd), head h reads kv group h // n_rep
    out = torch.zeros(B, T, dtype=band.dtype, device=band.device)  # (B, T)
    for d in range(1, min(window, T - 1) + 1):
        a = band[:, :, : T - d, d - 1]  # (B, H, T-d): A_h[p+d, p]
        cy = (ctx_err[:, d:] * y[:, : T - d]).sum(-1)  # (B, T-d, H): c_{p+d,h} . y_{p,g(h)}
        out[:, : T - d] += (a.transpose(1, 2) * cy).sum(-1)
    return out


def align_with_labels(per_position: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Move scores from loss position p to label position t = p + 1; 0 where labels == -100.
    (B, T) -> (B, T)."""
    out = torch.zeros_like(per_position)  # (B, T)
    out[:, 1:] = per_position[:, :-1]
    return out.masked_fill(labels == -100, 0.0)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """l_p = -log pi(labels[p+1] | <= p), 0 where labels[p+1] == -100. logits (B, T, V) -> (B, T-1)."""
    return shifted_nll(logits, labels, dtype)
