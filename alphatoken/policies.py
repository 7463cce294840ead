"""Token policies: which response tokens get gradient, selectable by name (`POLICIES[name]`).

A policy turns what is known about one micro-batch (or one DPO branch) into detached per-position
weights `[B, T-1]` (0/1 masks, or soft weights), through one small interface, :class:`TokenContext`:
- `valid [B, T-1]`: scored loss positions (`labels[p+1] != -100`);
- `token_loss [B, T-1]`: the current model's per-position NLL (detached);
- `scores`: the valuer's token values moved to loss positions (`total` and the four components);
- `reference_loss [B, T-1]`: the reference (base) model's per-position NLL, computed once per
  example before training and cached by the training loop;
- `rho`: the retained ratio for this step (after the rho schedule), and a seeded `generator`.

Top-rho selection is per micro-batch and per DPO branch (`alphatoken.losses.top_rho_mask`: exactly
`ceil(rho * N)` kept, ties broken by flat index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from alphatoken.data import ConfigError, check_choice, check_int, check_number
from alphatoken.losses import kept_count, soft_weights, top_rho_mask

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class PolicyConfig:
    """Which tokens train, by name, and with what budget."""

    name: str = "alphatoken"  # a key of POLICIES
    rho: float = 0.5  # retained-token ratio (paper default 0.5); the start value under a schedule
    rho_end: float | None = None  # final ratio of a rho schedule (None: constant rho)
    rho_schedule: str = "constant"  # "constant", "linear" or "cosine" from rho to rho_end over training
    stm_ppl_threshold: float | None = None  # STM: mask tokens whose base-model perplexity exceeds this; None keeps the ceil(rho*N) lowest (matched budget)
    confpo_selection: str = "mean"  # ConfPO: "mean" (keep p < mean response p, as in the paper) or "ratio" (the ceil(rho*N) least confident)
    lora_rank: int = 16  # LoRA: adapter rank
    lora_alpha: float = 32.0  # LoRA: scaling numerator (scale = alpha / rank)
    lora_dropout: float = 0.0  # LoRA: dropout on the adapter input
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # LoRA: attention + MLP projections

    def __post_init__(self):
        owner = "PolicyConfig"
        if self.name not in POLICIES:
            raise ConfigError("name", f"{self.name!r} is not one of {sorted(POLICIES)}", owner)
        check_number(owner, "rho", self.rho, 0.0, 1.0, low_open=True)
        check_number(owner, "rho_end", self.rho_end, 0.0, 1.0, low_open=True, optional=True)
        check_choice(owner, "rho_schedule", self.rho_schedule, SCHEDULES)
        if self.rho_schedule != "constant" and self.rho_end is None:
            raise ConfigError("rho_end", f"rho_schedule={self.rho_schedule!r} needs the final ratio rho_end", owner)
        if self.rho_schedule == "constant" and self.rho_end is not None:  # it would be ignored
            raise ConfigError("rho_end", f"{self.rho_end} is not used by rho_schedule='constant': set rho_schedule "
                              "to 'linear' or 'cosine', or leave rho_end unset (null)", owner)
        check_number(owner, "stm_ppl_threshold", self.stm_ppl_threshold, 1.0, optional=True)  # a perplexity
        check_choice(owner, "confpo_selection", self.confpo_selection, ("mean", "ratio"))
        check_int(owner, "lora_rank", self.lora_rank, 1)
        check_number(owner, "lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_number(owner, "lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if isinstance(self.lora_targets, str) or not isinstance(self.lora_targets, (list, tuple)) or not self.lora_targets \
                or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError("lora_targets", f"expected a non-empty list of module names, got {self.lora_targets!r}", owner)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        policy = POLICIES[self.name]
        if policy.adapter == "lora" and policy.needs_scores and self.lora_dropout != 0:
            raise ConfigError("lora_dropout", f"{self.lora_dropout}: policy {self.name!r} scores the LoRA factors, "
                              "which needs lora_dropout = 0 (the valuation cannot reproduce a dropout mask)", owner)

    def rho_at(self, progress: float) -> float:
        """Retained ratio at training progress in [0, 1]: constant, or linear / cosine from rho to rho_end
        (`rho_end + (rho - rho_end) * (1 + cos(pi * progress)) / 2` for cosine)."""
        progress = min(max(progress, 0.0), 1.0)
        if self.rho_schedule == "constant" or self.rho_end is None:
            return self.rho
        if self.rho_schedule == "linear":
            return self.rho + (self.rho_end - self.rho) * progress
        return self.rho_end + (self.rho - self.rho_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TokenContext:
    """Everything a policy may use for one micro-batch or DPO branch; per-position tensors `[B, T-1]`."""

    valid: torch.Tensor  # (B, T-1) bool, scored loss positions
    token_loss: torch.Tensor  # (B, T-1) current per-position NLL, detached
    rho: float  # retained ratio for this step
    scores: object | None = None  # TokenScores moved to loss positions (see `scores_to_loss_positions`)
    reference_loss: torch.Tensor | None = None  # (B, T-1) reference-model NLL, cached
    generator: torch.Generator | None = None  # seeded per (seed, step, micro-batch, branch)


@dataclass(frozen=True)
class Policy:
    """A named token-selection rule; `weights(ctx, config)` returns detached `[B, T-1]` weights."""

    name: str
    rule: object  # callable(ctx, config) -> (B, T-1) weights
    doc: str
    needs_scores: bool = False  # needs the valuer's token values
    needs_reference_loss: bool = False  # needs the cached reference-model per-token losses
    valuation_overrides: dict = field(default_factory=dict)  # fields of ValuationConfig this policy fixes
    dpo_form: str = "alpha"  # "alpha": Eq. 14 surrogate; "masked_logit": masks inside the DPO logit (ConfPO)
    adapter: str | None = None  # "lora": train LoRA adapters instead of the full weights
    random: bool = False  # draws from ctx.generator

    def weights(self, ctx: TokenContext, config: PolicyConfig) -> torch.Tensor:
        if self.needs_scores and ctx.scores is None:
            raise ValueError(f"policy {self.name!r} needs token scores from the valuer")
        if self.needs_reference_loss and ctx.reference_loss is None:
            raise ValueError(f"policy {self.name!r} needs the reference model's per-token losses")
        weights = self.rule(ctx, config)
        return weights.detach().to(ctx.token_loss.dtype) * ctx.valid


SCORE_FIELDS = ("total", "tgt_dir", "tgt_cau", "prx_dir", "prx_cau")


def scores_to_loss_positions(scores, rows: slice = slice(None)) -> SimpleNamespace:
    """A TokenScores-like object (label-aligned `[B, T]` fields) -> a namespace of `[B', T-1]` fields
    (the value of token t read at loss position p = t-1), optionally for a slice of rows."""
    return SimpleNamespace(**{f: getattr(scores, f)[rows, 1:] for f in SCORE_FIELDS if getattr(scores, f, None) is not None})


def _keep_all(ctx, config):
    return ctx.valid.to(ctx.token_loss.dtype)


def _top_total(ctx, config):
    return top_rho_mask(ctx.scores.total, ctx.valid, ctx.rho)


def _bottom_total(ctx, config):
    return top_rho_mask(-ctx.scores.total, ctx.valid, ctx.rho)


def _random(ctx, config):
    noise = torch.rand(ctx.valid.shape, generator=ctx.generator, dtype=torch.float64)  # (B, T-1), on CPU for reproducibility
    return top_rho_mask(noise.to(ctx.valid.device), ctx.valid, ctx.rho)


def _soft(ctx, config):
    return soft_weights(ctx.scores.total, ctx.valid)


def _stm(ctx, config):
    if config.stm_ppl_threshold is None:  # matched budget: the ceil(rho*N) lowest-perplexity tokens
        return top_rho_mask(-ctx.reference_loss, ctx.valid, ctx.rho)
    return ctx.valid & (ctx.reference_loss <= math.log(config.stm_ppl_threshold))


def _token_cleaning(ctx, config):
    return top_rho_mask(ctx.reference_loss - ctx.token_loss, ctx.valid, ctx.rho)


def _rho1(ctx, config):
    return top_rho_mask(ctx.token_loss - ctx.reference_loss, ctx.valid, ctx.rho)


def _confpo(ctx, config):
    if config.confpo_selection == "ratio":  # the ceil(rho*N) least confident tokens
        return top_rho_mask(ctx.token_loss, ctx.valid, ctx.rho)
    confidence = torch.exp(-ctx.token_loss) * ctx.valid  # (B, T-1) pi(y_p | ...), 0 off-response
    n = ctx.valid.sum(dim=1, keepdim=True).clamp(min=1)  # (B, 1)
    threshold = confidence.sum(dim=1, keepdim=True) / n  # (B, 1) mean confidence of each response
    return ctx.valid & (confidence < threshold)


_NO_PROXY = {"use_prx_dir": False, "use_prx_cau": False}
_NO_TARGET = {"use_tgt_dir": False, "use_tgt_cau": False}

POLICIES: dict[str, Policy] = {}


def _register(policy: Policy) -> None:
    POLICIES[policy.name] = policy


_register(Policy("alphatoken", _top_total, "AlphaToken: top-rho by total = tgt_dir + tgt_cau + lam (prx_dir + prx_cau) (Eq. 12-14).", needs_scores=True))
_register(Policy("adaptation_only", _top_total, "Ablation: top-rho by the target terms only (tgt_dir + tgt_cau).", needs_scores=True, valuation_overrides=_NO_PROXY))
_register(Policy("stability_only", _top_total, "Ablation: top-rho by the retention-proxy terms only (prx_dir + prx_cau).", needs_scores=True, valuation_overrides=_NO_TARGET))
_register(Policy("direct_only", _top_total, "Ablation: top-rho by the direct paths only (tgt_dir + lam prx_dir).", needs_scores=True, valuation_overrides={"use_tgt_cau": False, "use_prx_cau": False}))
_register(Policy("causal_only", _top_total, "Ablation: top-rho by the causal value paths only (tgt_cau + lam prx_cau).", needs_scores=True, valuation_overrides={"use_tgt_dir": False, "use_prx_dir": False}))
_register(Policy("no_fisher", _top_total, "Ablation: lam = 0, no Fisher-drift retention proxy.", needs_scores=True, valuation_overrides={"lam": 0.0, **_NO_PROXY}))
_register(Policy("random", _random, "Control: ceil(rho N) tokens drawn uniformly at random (seeded per step and micro-batch).", random=True))
_register(Policy("bottom", _bottom_total, "Control: the ceil(rho N) *lowest*-valued tokens by total.", needs_scores=True))
_register(Policy("full", _keep_all, "No mask: standard SFT, or plain DPO (Rafailov et al., NeurIPS 2023) for preference data."))
_register(Policy("soft", _soft, "Soft weighting: weights = total min-max normalised to [0, 1] over the micro-batch instead of a hard mask.", needs_scores=True))
_register(Policy(
    "stm", _stm,
    "STM, selective token masking (Wu et al., 'Mitigating forgetting in LLM fine-tuning via low-perplexity "
    "token learning', NeurIPS 2025): mask response tokens whose perplexity exp(l_ref) under the base model "
    "is high; with `stm_ppl_threshold` the rule is exp(l_ref) <= threshold, otherwise the ceil(rho N) "
    "lowest-perplexity tokens (matched budget, App. C.4).",
    needs_reference_loss=True,
))
_register(Policy(
    "token_cleaning", _token_cleaning,
    "Token Cleaning (Pang et al., 'Token cleaning: fine-grained data selection for LLM supervised fine-tuning', "
    "ICML 2025), self-evolving form: influence = l_ref - l_current (loss drop of the current model against the "
    "base/reference model); keep the top-rho tokens by influence.",
    needs_reference_loss=True,
))
_register(Policy(
    "rho1", _rho1,
    "Rho-1 selective language modeling (Lin et al., 'Not all tokens are what you need for pretraining', "
    "NeurIPS 2024): excess loss l_current - l_ref; keep the top-rho tokens.",
    needs_reference_loss=True,
))
_register(Policy(
    "confpo", _confpo,
    "ConfPO (Yoon et al., 'ConfPO: exploiting policy model confidence for critical token selection in "
    "preference optimization', ICML 2025): keep low-confidence tokens (policy probability below the mean "
    "probability of the response, or the ceil(rho N) least confident) and compute the DPO logit over them.",
    dpo_form="masked_logit",
))
_register(Policy("lora", _keep_all, "LoRA (Hu et al., ICLR 2022): full-token training of low-rank adapters on the attention and MLP projections; the backbone is frozen.", adapter="lora"))
_register(Policy(
    "alphatoken_lora", _top_total,
    "AlphaToken with LoRA (App. B.2.3): top-rho by total while training low-rank adapters; the scored "
    "parameters, the target G, the Fisher F and the reference are those of the factors lora_A, lora_B.",
    needs_scores=True, adapter="lora",
))


def get_policy(name: str) -> Policy:
    """The registered policy called `name`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]

