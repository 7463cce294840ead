"""Configuration and result types of the token valuation (METHOD.md: "The four scores")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alphatoken.data import check_bool, check_choice, check_int, check_number

SIGNALS = ("self", "total")
TARGET_FORMS = ("auto", "contract", "ghost")


@dataclass(frozen=True)
class ValuationConfig:
    # number of final decoder blocks whose nn.Linear weights are scored (paper K). On a hybrid decoder
    # (Qwen-3.5) these are the last K blocks whatever their token mixer: a Gated-DeltaNet block gives
    # direct terms only, a softmax-attention block direct and value-path terms (alphatoken.blocks)
    last_k: int = 3
    window: int = 32  # causal band: positions k in (p, min(p + window, T - 1)] feed token p's value path (paper W)
    # weight of the retention proxy in the total score (paper lambda); >= 0: the proxy aligns a token's
    # gradient with the Fisher-weighted drift F * (W - W_ref), so a negative lambda would reward the
    # tokens that move the weights further from the reference, i.e. reward forgetting
    lam: float = 1.5
    signal: str = "self"  # "self": e_p = d l_p / d z_p; "total": e_p = d L / d z_p with L = sum_p l_p
    use_tgt_dir: bool = True  # compute the direct target alignment e_p^T G x_p
    use_tgt_cau: bool = True  # compute the value-path causal target alignment
    use_prx_dir: bool = True  # compute the direct proxy alignment e_p^T P x_p
    use_prx_cau: bool = True  # compute the value-path causal proxy alignment
    target_form: str = "auto"  # "contract" (X G^T), "ghost" (E E_v^T * X X_v^T) or "auto" (cheaper per layer)
    val_chunk_size: int = 4  # validation sequences per forward in set_validation (G summed over chunks; bounds memory)

    def __post_init__(self):
        owner = "ValuationConfig"
        check_int(owner, "last_k", self.last_k, 1)
        check_int(owner, "window", self.window, 0)
        check_number(owner, "lam", self.lam, 0.0)
        check_choice(owner, "signal", self.signal, SIGNALS)
        for name in ("use_tgt_dir", "use_tgt_cau", "use_prx_dir", "use_prx_cau"):
            check_bool(owner, name, getattr(self, name))
        check_choice(owner, "target_form", self.target_form, TARGET_FORMS)
        check_int(owner, "val_chunk_size", self.val_chunk_size, 1)


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
