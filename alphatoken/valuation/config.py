"""Configuration and result types of the token valuation (METHOD.md: "The four scores")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIGNALS = ("self", "total")
TARGET_FORMS = ("auto", "contract", "ghost")


@dataclass(frozen=True)
class ValuationConfig:
    last_k: int = 3  # number of final decoder blocks whose nn.Linear weights are scored (paper K)
    window: int = 32  # causal band: positions k in (p, min(p + window, T - 1)] feed token p's value path (paper W)
    lam: float = 1.5  # weight of the retention proxy in the total score (paper lambda)
    signal: str = "self"  # "self": e_p = d l_p / d z_p; "total": e_p = d L / d z_p with L = sum_p l_p
    use_tgt_dir: bool = True  # compute the direct target alignment e_p^T G x_p
    use_tgt_cau: bool = True  # compute the value-path causal target alignment
    use_prx_dir: bool = True  # compute the direct proxy alignment e_p^T P x_p
    use_prx_cau: bool = True  # compute the value-path causal proxy alignment
    target_form: str = "auto"  # "contract" (X G^T), "ghost" (E E_v^T * X X_v^T) or "auto" (cheaper per layer)
    val_chunk_size: int = 4  # validation sequences per forward in set_validation (G summed over chunks; bounds memory)

    def __post_init__(self):
        if not isinstance(self.last_k, int) or self.last_k < 1:
            raise ValueError(f"ValuationConfig.last_k must be a positive int, got {self.last_k!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"ValuationConfig.window must be a non-negative int, got {self.window!r}")
        if not isinstance(self.lam, (int, float)):
            raise ValueError(f"ValuationConfig.lam must be a number, got {self.lam!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"ValuationConfig.signal must be one of {SIGNALS}, got {self.signal!r}")
        if not isinstance(self.val_chunk_size, int) or isinstance(self.val_chunk_size, bool) or self.val_chunk_size < 1:
            raise ValueError(f"ValuationConfig.val_chunk_size must be a positive int, got {self.val_chunk_size!r}")
        if self.target_form not in TARGET_FORMS:
            raise ValueError(f"ValuationConfig.target_form must be one of {TARGET_FORMS}, got {self.target_form!r}")


@dataclass(frozen=True)
class TokenScores:
    """Per-token values aligned with `labels`: `x[b, t]` values label token t (computed at loss position
    t - 1) and is 0 wherever `labels == -100`. Switched-off components are zeros; all four components
    are None when only the total was asked for (`score(..., components=False)`)."""

    tgt_dir: torch.Tensor | None  # (B, T) direct alignment with the target gradient G
    tgt_cau: torch.Tensor | None  # (B, T) value-path alignment with G
    prx_dir: torch.Tensor | None  # (B, T) direct alignment with the proxy P = F * (W - W_ref)
    prx_cau: torch.Tensor | None  # (B, T) value-path alignment with P
    total: torch.Tensor  # (B, T) tgt_dir + tgt_cau + lam * (prx_dir + prx_cau)
