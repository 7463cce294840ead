"""Token policies: which response tokens get gradient, selectable by name (`POLICIES[name]`).

A policy turns what is known about one micro-batch (or one DPO branch) into detached per-position
weights `[B, T-1]` (0/1 masks, or soft weights), through one small interface, :class:`TokenContext`:
- `valid [B, T-1]`: scored loss positions (`labels[p+1] != -100`);
- `token_loss [B, T-1]`: the current model's per-position NLL (detached);
- `scores`: the valuer's token values moved to loss positions (`total` and the four components);
- `reference_loss [B, T-1]`: the reference (base) model's per-position NLL, computed once per
  example before training and cached by the training loop;
- `rho`: the retained ratio for this step (after the rho schedule), and a seeded `generator`;
- for the baselines that need them (`alphatoken.policy_inputs`): `precomputed [B, T-1]`, the policy's
  own per-example values computed once before the first update from the reference model over the
  whole training set (`Policy.precompute`: FLOW's weights, XTF's masks); `attention [B, T, T]`, the
  last decoder block's head-mean attention probabilities of this forward (`Policy.needs_attention`:
  ssToken); `epoch_position [B]`, each row's position in the epoch's data order (ssToken's warm-up);
  `importance [B, T-1]`, the gradient attribution of the token at each loss position computed on
  this very step's weights (`Policy.needs_importance`: TI-DPO); `branch`, 0 for the chosen and 1 for
  the rejected rows of a DPO micro-batch (SePO keeps the top of one and the bottom of the other).

The step's normaliser K (the training loop divides the step's gradient by it) is the sum of the
weights unless a policy says otherwise (`Policy.normalizer_share`: FLOW and TALR divide by the
number of response tokens, as their sources do).

Top-rho selection is per micro-batch and per DPO branch (`alphatoken.losses.top_rho_mask`: exactly
`ceil(rho * N)` kept, ties broken by flat index).
"""

from __future__ import annotations

import keyword
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from alphatoken.data import ConfigError, check_choice, check_int, check_number
from alphatoken.losses import kept_count, soft_weights, top_rho_mask

SCHEDULES = ("constant", "linear", "cosine")
# The step's normaliser K: the sum of the weights (mean over kept tokens), the number of response
# tokens, or the number of sequences of the step.
NORMALIZERS = ("weights", "tokens", "sequences")


@dataclass(frozen=True)
class PolicyConfig:
    """Which tokens train, by name, and with what budget."""

    name: str = "alphatoken"  # a key of POLICIES
    rho: float = 0.5  # retained-token ratio (paper default 0.5); the start value under a schedule
    rho_end: float | None = None  # final ratio of a rho schedule (None: constant rho)
    rho_schedule: str = "constant"  # "constant", "linear" or "cosine" from rho to rho_end over training
    stm_ppl_threshold: float | None = None  # STM: mask tokens whose base-model perplexity exceeds this; None keeps the ceil(rho*N) lowest (matched budget)
    confpo_selection: str = "mean"  # ConfPO: "mean" (keep p < mean response p, as in the paper) or "ratio" (the ceil(rho*N) least confident)
    strata: int = 4  # alphatoken_stratified: equal-count bins of the base model's token loss, each keeping its share of the budget
    lora_rank: int = 16  # LoRA: adapter rank
    lora_alpha: float = 32.0  # LoRA: scaling numerator (scale = alpha / rank)
    lora_dropout: float = 0.0  # LoRA: dropout on the adapter input
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # LoRA: attention + MLP projections
    xtf_attention_layers: int | None = None  # XTF: reasoning importance from the attention of the last k blocks (None: every block)
    xtf_iqr_factor: float = 1.0  # XTF: a token's received attention below Q1 - factor * (Q3 - Q1) of its response is noise
    xtf_novelty_threshold: float = 0.95  # XTF: a token the base model predicts with probability above this is known (noise)
    xtf_distance: str = "cosine"  # XTF: task-relevance distance of a token's input embedding to the domain centroid ("cosine", "euclidean")
    xtf_domain_words: tuple[str, ...] = tuple(keyword.kwlist)  # XTF: words whose input embeddings make the domain centroid (code: Python's keywords)
    sstoken_gamma: float = 0.5  # ssToken: score = gamma * minmax(l_ref - l) + (1 - gamma) * attention to the prompt (1: Token Cleaning per example)
    sstoken_attention_only_examples: int = 10000  # ssToken: the first examples of each epoch are selected by attention alone (gamma = 0)
    talr_tau: float | None = None  # TALR: fixed temperature; None: the median over the micro-batch's sequences of their mean NLL
    talr_weight_floor: float = 0.01  # TALR: weights max(p^(1/tau), floor)
    talr_normalize: str = "tokens"  # TALR: sum w l divided by the response "tokens", the "sequences", or the "weights" (sum w)
    flow_temperature: float | None = None  # FLOW: fixed temperature; None: the median per-example reference loss of the training set
    tidpo_lambda: float = 0.7  # TI-DPO: w = lambda * normalised gradient importance + (1 - lambda) * Gaussian prior (paper Table B12)
    tidpo_prior_sigma_div: float = 4.0  # TI-DPO: the prior's sigma = max(1, n / div) over a response of n tokens (paper: n/4; repo config 8)
    tidpo_alpha: float = 0.5  # TI-DPO: weight of the TDPO2 sequential-KL term a (KL_r - sg(KL_c)) (paper Table B12)
    tidpo_gamma: float = 0.1  # TI-DPO: weight of the triplet term (paper Table B12; 0 skips the anchor sampling)
    tidpo_triplet_margin: float = 1e-3  # TI-DPO: margin of ReLU(||a - c||^2 - ||a - r||^2 + margin) (repo alpha_triplet)
    tidpo_anchor_max_new_tokens: int = 64  # TI-DPO: tokens sampled for the anchor response (capped by max_length - prompt)
    tidpo_anchor_temperature: float = 0.8  # TI-DPO: anchor sampling temperature (repo default)
    tidpo_anchor_top_k: int = 50  # TI-DPO: anchor top-k (0: no top-k cut; repo default 50)
    tidpo_anchor_top_p: float = 0.95  # TI-DPO: anchor nucleus mass (repo default)
    sepo_ratio: float | None = 0.3  # SePO: share k of each response's tokens kept (source 0.3); None: the matched budget rho
    sepo_rounding: str = "ceil"  # SePO: kept per response ceil(k N) (the project's budget rule) or "floor" (source int(k N))

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
        check_int(owner, "strata", self.strata, 1)
        check_int(owner, "lora_rank", self.lora_rank, 1)
        check_number(owner, "lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_number(owner, "lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if isinstance(self.lora_targets, str) or not isinstance(self.lora_targets, (list, tuple)) or not self.lora_targets \
                or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError("lora_targets", f"expected a non-empty list of module names, got {self.lora_targets!r}", owner)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        check_int(owner, "xtf_attention_layers", self.xtf_attention_layers, 1, optional=True)
        check_number(owner, "xtf_iqr_factor", self.xtf_iqr_factor, 0.0)
        check_number(owner, "xtf_novelty_threshold", self.xtf_novelty_threshold, 0.0, 1.0)
        check_choice(owner, "xtf_distance", self.xtf_distance, ("cosine", "euclidean"))
        if isinstance(self.xtf_domain_words, str) or not isinstance(self.xtf_domain_words, (list, tuple)) \
                or not self.xtf_domain_words or not all(isinstance(w, str) and w.strip() for w in self.xtf_domain_words):
            raise ConfigError("xtf_domain_words", f"expected a non-empty list of words, got {self.xtf_domain_words!r}", owner)
        object.__setattr__(self, "xtf_domain_words", tuple(self.xtf_domain_words))
        check_number(owner, "sstoken_gamma", self.sstoken_gamma, 0.0, 1.0)
        check_int(owner, "sstoken_attention_only_examples", self.sstoken_attention_only_examples, 0)
        check_number(owner, "talr_tau", self.talr_tau, 0.0, low_open=True, optional=True)
        check_number(owner, "talr_weight_floor", self.talr_weight_floor, 0.0, 1.0)
        check_choice(owner, "talr_normalize", self.talr_normalize, NORMALIZERS)
        check_number(owner, "flow_temperature", self.flow_temperature, 0.0, low_open=True, optional=True)
        check_number(owner, "tidpo_lambda", self.tidpo_lambda, 0.0, 1.0)
        check_number(owner, "tidpo_prior_sigma_div", self.tidpo_prior_sigma_div, 0.0, low_open=True)
        check_number(owner, "tidpo_alpha", self.tidpo_alpha, 0.0)
        check_number(owner, "tidpo_gamma", self.tidpo_gamma, 0.0)
        check_number(owner, "tidpo_triplet_margin", self.tidpo_triplet_margin, 0.0)
        check_int(owner, "tidpo_anchor_max_new_tokens", self.tidpo_anchor_max_new_tokens, 1)
        check_number(owner, "tidpo_anchor_temperature", self.tidpo_anchor_temperature, 0.0, low_open=True)
        check_int(owner, "tidpo_anchor_top_k", self.tidpo_anchor_top_k, 0)
        check_number(owner, "tidpo_anchor_top_p", self.tidpo_anchor_top_p, 0.0, 1.0, low_open=True)
        check_number(owner, "sepo_ratio", self.sepo_ratio, 0.0, 1.0, low_open=True, optional=True)
        check_choice(owner, "sepo_rounding", self.sepo_rounding, ("ceil", "floor"))
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
    precomputed: torch.Tensor | None = None  # (B, T-1) the policy's step-0 values of these examples (Policy.precompute), 0-padded
    attention: torch.Tensor | None = None  # (B, T, T) head-mean attention probabilities (query, key) of the last block, detached
    epoch_position: torch.Tensor | None = None  # (B,) int64 position of each row's example in this epoch's data order
    importance: torch.Tensor | None = None  # (B, T-1) gradient attribution of the token at each loss position (TI-DPO)
    branch: int | None = None  # DPO: 0 chosen rows, 1 rejected rows


@dataclass
class StepZeroInputs:
    """What `Policy.precompute` reads, once, before the first update (the training loop gives it and
    caches the result in the run directory like the reference losses)."""

    model: object  # the reference (base) model, before any update
    tokenizer: object
    features: list  # the encoded training examples in dataset order: {"input_ids", "labels"} lists
    reference_losses: list  # per example: (len-1,) the reference model's NLL per loss position (0 off the response)
    pad_id: int  # padding token id for batching
    device: object  # where the model runs
    micro_batch_size: int  # examples per forward


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
    precompute: object = None  # callable(StepZeroInputs, PolicyConfig) -> one (len-1,) tensor per example, or None
    needs_attention: bool = False  # needs ctx.attention, the last block's attention probabilities of the forward
    normalizer: object = None  # callable(PolicyConfig) -> one of NORMALIZERS; None: "weights"
    sft_only: bool = False  # an SFT method: refused by the DPO loop
    needs_importance: bool = False  # needs ctx.importance, the gradient attribution of this step's weights (TI-DPO)
    needs_token_rewards: bool = False  # DPO: needs per-token rewards of the training pairs given to the run (SePO), as ctx.precomputed

    def weights(self, ctx: TokenContext, config: PolicyConfig) -> torch.Tensor:
        if self.needs_scores and ctx.scores is None:
            raise ValueError(f"policy {self.name!r} needs token scores from the valuer")
        if self.needs_reference_loss and ctx.reference_loss is None:
            raise ValueError(f"policy {self.name!r} needs the reference model's per-token losses")
        if (self.precompute is not None or self.needs_token_rewards) and (ctx.precomputed is None or ctx.precomputed.shape != ctx.valid.shape):
            got = None if ctx.precomputed is None else tuple(ctx.precomputed.shape)
            what = "its step-0 values (Policy.precompute)" if self.precompute is not None else "the run's token rewards"
            raise ValueError(f"policy {self.name!r} needs {what} as ctx.precomputed of "
                             f"shape {tuple(ctx.valid.shape)}, got {got}")
        if self.needs_importance and (ctx.importance is None or ctx.importance.shape != ctx.valid.shape):
            got = None if ctx.importance is None else tuple(ctx.importance.shape)
            raise ValueError(f"policy {self.name!r} needs the gradient attribution of the tokens as ctx.importance of "
                             f"shape {tuple(ctx.valid.shape)}, got {got}")
        if self.needs_token_rewards and ctx.branch not in (0, 1):
            raise ValueError(f"policy {self.name!r} needs ctx.branch (0: chosen rows, 1: rejected rows), got {ctx.branch!r}")
        if self.needs_attention:
            expected = (ctx.valid.shape[0], ctx.valid.shape[1] + 1, ctx.valid.shape[1] + 1)
            if ctx.attention is None or tuple(ctx.attention.shape) != expected:
                got = None if ctx.attention is None else tuple(ctx.attention.shape)
                raise ValueError(f"policy {self.name!r} needs the last block's head-mean attention probabilities as "
                                 f"ctx.attention of shape {expected}, got {got}")
        weights = self.rule(ctx, config)
        return weights.detach().to(ctx.token_loss.dtype) * ctx.valid

    def normalizer_share(self, weights: torch.Tensor, valid: torch.Tensor, config: PolicyConfig) -> torch.Tensor:
        """This micro-batch's (or DPO branch's) share of the step's normaliser K: the sum of the
        weights (default), the number of response tokens, or the number of sequences (rows)."""
        kind = "weights" if self.normalizer is None else self.normalizer(config)
        if kind == "weights":
            return weights.sum()
        if kind == "tokens":
            return valid.sum().to(weights.dtype)
        if kind == "sequences":
            return torch.tensor(float(valid.shape[0]), dtype=weights.dtype, device=weights.device)
        raise ValueError(f"policy {self.name!r}: unknown normaliser {kind!r}; expected one of {list(NORMALIZERS)}")


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


def stratified_top_mask(scores: torch.Tensor, strata_key: torch.Tensor, valid: torch.Tensor, rho: float,
                        strata: int) -> torch.Tensor:
    """Top-rho by `scores` within strata of `strata_key`, with the exact budget `ceil(rho * N)`.

    The N valid entries, ranked by (key ascending, flat index ascending), are cut into `strata`
    contiguous bins of sizes as equal as possible (the first `N mod strata` one larger); bin b keeps
    `floor(K n_b / N)` entries plus one for the bins with the largest remainders `K n_b mod N` (ties:
    lower bin first) until K = ceil(rho N) are kept; inside a bin the largest scores are kept (ties:
    lower flat index). The kept set then has the key distribution of all tokens, as a random draw
    does, while the scores decide within each bin. Detached bool mask of `valid`'s shape."""
    valid = valid.bool()
    flat_valid = valid.reshape(-1)
    mask = torch.zeros_like(flat_valid)
    candidates = flat_valid.nonzero().squeeze(1)  # (N,) flat indices, ascending
    n = candidates.numel()
    if n == 0:
        return mask.view(valid.shape)
    keys = strata_key.detach().reshape(-1)[candidates].double()
    values = scores.detach().reshape(-1)[candidates].double()
    if torch.isnan(keys).any() or torch.isnan(values).any():
        raise ValueError("stratified_top_mask: NaN keys or scores among the valid tokens")
    k = kept_count(n, rho)
    by_key = torch.sort(keys, stable=True).indices  # (N,) positions into candidates
    sizes = [n // strata + (1 if b < n % strata else 0) for b in range(min(strata, n))]
    quota = [k * size // n for size in sizes]
    remainders = sorted(range(len(sizes)), key=lambda b: (-(k * sizes[b] % n), b))
    for b in remainders[: k - sum(quota)]:
        quota[b] += 1
    start = 0
    for size, q in zip(sizes, quota):
        members = by_key[start : start + size].sort().values  # positions of this bin, by flat index
        start += size
        order = torch.sort(-values[members], stable=True).indices  # largest score first, ties: lower flat index
        mask[candidates[members[order[:q]]]] = True
    return mask.view(valid.shape)


def _stratified_total(ctx, config):
    return stratified_top_mask(ctx.scores.total, ctx.reference_loss, ctx.valid, ctx.rho, config.strata)


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


def _xtf(ctx, config):
    return ctx.precomputed > 0  # the step-0 keep mask


def _xtf_precompute(inputs: StepZeroInputs, config: PolicyConfig) -> list:
    from alphatoken.policy_inputs import xtf_keep_masks

    return xtf_keep_masks(inputs.model, inputs.tokenizer, inputs.features, inputs.reference_losses, inputs.pad_id,
                          inputs.device, inputs.micro_batch_size, config.xtf_attention_layers, config.xtf_iqr_factor,
                          config.xtf_novelty_threshold, config.xtf_distance, config.xtf_domain_words)


def sstoken_scores(token_loss: torch.Tensor, reference_loss: torch.Tensor, attention: torch.Tensor, valid: torch.Tensor,
                   gamma: torch.Tensor) -> torch.Tensor:
    """ssToken's token score, per row b over its response positions:
    `gamma_b * (x - min x) / (max x - min x + 1e-8) + (1 - gamma_b) * a`, x = l_ref - l (the
    retrospective excess loss, min and max over the row's response), a = `prompt_attention_mass`.
    All `(B, T-1)` but attention `(B, T, T)` and gamma `(B,)`; 0 where not valid."""
    from alphatoken.policy_inputs import prompt_attention_mass

    valid = valid.bool()
    excess = (reference_loss - token_loss).to(torch.float64)  # (B, T-1)
    high = torch.where(valid, excess, torch.full_like(excess, -math.inf)).amax(dim=1, keepdim=True)  # (B, 1)
    low = torch.where(valid, excess, torch.full_like(excess, math.inf)).amin(dim=1, keepdim=True)  # (B, 1)
    normalised = torch.where(valid, (excess - low) / (high - low + 1e-8), torch.zeros_like(excess))  # (B, T-1)
    semantic = prompt_attention_mass(attention.to(torch.float64), valid)  # (B, T-1)
    g = gamma.to(torch.float64)[:, None]  # (B, 1)
    return (g * normalised + (1 - g) * semantic) * valid


def _sstoken(ctx, config):
    gamma = torch.full((ctx.valid.shape[0],), config.sstoken_gamma, dtype=torch.float64, device=ctx.valid.device)  # (B,)
    if config.sstoken_attention_only_examples > 0:
        if ctx.epoch_position is None:
            raise ValueError(f"policy 'sstoken' with sstoken_attention_only_examples={config.sstoken_attention_only_examples} "
                             "needs ctx.epoch_position (each row's position in the epoch's data order)")
        warm = ctx.epoch_position.to(gamma.device) < config.sstoken_attention_only_examples  # (B,)
        gamma = torch.where(warm, torch.zeros_like(gamma), gamma)
    scores = sstoken_scores(ctx.token_loss, ctx.reference_loss, ctx.attention, ctx.valid, gamma)  # (B, T-1)
    rows = [top_rho_mask(scores[b], ctx.valid[b], ctx.rho) for b in range(scores.shape[0])]  # ceil(rho * |response|) each
    return torch.stack(rows)


def talr_weights(token_loss: torch.Tensor, valid: torch.Tensor, tau: float | None = None, floor: float = 0.01) -> torch.Tensor:
    """TALR weights `w = max(max(p, 1e-6)^(1/tau), floor)`, `p = exp(-l)`, detached; tau None: the
    median (`torch.median`: the lower middle value for an even count) over the rows of their mean
    response NLL, at least 1e-6. token_loss, valid `(B, T-1)`; returns `(B, T-1)`, 0 where not valid."""
    loss = token_loss.detach()
    valid = valid.bool()
    if tau is None:
        per_row = (loss * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # (B,)
        tau = max(float(per_row.median()), 1e-6)
    probability = torch.exp(-loss).clamp(min=1e-6)  # (B, T-1)
    return probability.pow(1.0 / tau).clamp(min=floor) * valid


def _talr(ctx, config):
    return talr_weights(ctx.token_loss, ctx.valid, config.talr_tau, config.talr_weight_floor)


def _flow(ctx, config):
    return ctx.precomputed  # w_i on example i's response positions


def _flow_precompute(inputs: StepZeroInputs, config: PolicyConfig) -> list:
    from alphatoken.policy_inputs import flow_example_weights

    return flow_example_weights(inputs.features, inputs.reference_losses, config.flow_temperature)


def tidpo_weights(importance: torch.Tensor, valid: torch.Tensor, lam: float, sigma_div: float) -> torch.Tensor:
    """TI-DPO's token weights, per row b over its n response positions (in order, i = 0..n-1):
    `I = imp / sum imp` (the prior alone when sum imp = 0), `g_i = exp(-((i - (n-1)/2) / sigma)^2 / 2)`
    normalised to sum 1 with `sigma = max(1, n / sigma_div)`, `w = n * (lam I + (1 - lam) g)`, i.e. mean 1
    over the response; a row with n <= 1 gets weight 0 (as gracefulning/TIDPO trainers.py
    `_compute_token_importance_weights`). importance, valid `(B, T-1)` -> `(B, T-1)` float64, 0 off the
    response."""
    valid = valid.bool()
    weights = torch.zeros(valid.shape, dtype=torch.float64, device=valid.device)  # (B, T-1)
    for b in range(valid.shape[0]):
        positions = valid[b].nonzero().squeeze(1)  # (n,)
        n = positions.numel()
        if n <= 1:
            continue
        scores = importance[b, positions].detach().to(torch.float64).clamp(min=0)  # (n,)
        index = torch.arange(n, dtype=torch.float64, device=valid.device)  # (n,)
        sigma = max(1.0, n / sigma_div)
        prior = torch.exp(-0.5 * ((index - (n - 1) / 2) / sigma) ** 2)  # (n,)
        prior = prior / prior.sum()
        mixed = prior if float(scores.sum()) <= 0 else lam * scores / scores.sum() + (1 - lam) * prior
        weights[b, positions] = n * mixed / mixed.sum()
    return weights


def _tidpo(ctx, config):
    return tidpo_weights(ctx.importance, ctx.valid, config.tidpo_lambda, config.tidpo_prior_sigma_div)


def sepo_masks(rewards: torch.Tensor, valid: torch.Tensor, ratio: float, top: bool, rounding: str = "ceil") -> torch.Tensor:
    """SePO's selection, per row (one response) over its N response positions: the `ceil(ratio N)`
    (`rounding="floor"`: `int(ratio N)`, SteveKGYang/SePO token_score.py `get_topK`) positions with the
    largest rewards (`top`, the chosen response) or the smallest (the rejected response), ties to the
    earlier position (the source's repeated argmax / argmin). rewards, valid `(B, T-1)` -> bool `(B, T-1)`."""
    valid = valid.bool()
    mask = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        positions = valid[b].nonzero().squeeze(1)  # (N,)
        n = positions.numel()
        k = kept_count(n, ratio) if rounding == "ceil" else int(round(ratio * n, 9))
        if n == 0 or k == 0:
            continue
        values = rewards[b, positions].detach().to(torch.float64)  # (N,)
        order = torch.sort(-values if top else values, stable=True).indices  # best first, ties: earlier position
        mask[b, positions[order[:k]]] = True
    return mask


def _sepo(ctx, config):
    ratio = ctx.rho if config.sepo_ratio is None else config.sepo_ratio
    return sepo_masks(ctx.precomputed, ctx.valid, ratio, top=ctx.branch == 0, rounding=config.sepo_rounding)


_NO_PROXY = {"use_prx_dir": False, "use_prx_cau": False}
_NO_TARGET = {"use_tgt_dir": False, "use_tgt_cau": False}

POLICIES: dict[str, Policy] = {}  # runs that are not token policies (LESS, Wise-FT): alphatoken.runs


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
_register(Policy(
    "alphatoken_stratified", _stratified_total,
    "Diagnostic variant (not the paper's method): top-rho by total within `strata` equal-count bins of the base "
    "model's token loss, each bin keeping its share of the ceil(rho N) budget, so the kept tokens are as hard as "
    "a random draw's and only the values decide within a difficulty level.",
    needs_scores=True, needs_reference_loss=True,
))
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
_register(Policy(
    "xtf", _xtf,
    "XTF (Yang et al., 'Explainable token-level noise filtering for LLM fine-tuning datasets', ICLR 2026; arXiv "
    "2602.14536, no official code): a mask fixed before training from the base model; a response token is noise "
    "(masked) when its reasoning importance (mean attention received from the later tokens, heads of the last "
    "`xtf_attention_layers` blocks, all by default) is below Q1 - xtf_iqr_factor (Q3 - Q1) of its response, or "
    "its knowledge novelty is low (base probability > xtf_novelty_threshold), or its task relevance (1 - min-max "
    "normalised `xtf_distance` of its input embedding to the mean embedding of `xtf_domain_words`, Python's "
    "keywords by default) is in the second-lowest of three Multi-Otsu classes over the training set's response "
    "tokens. A rule, not a ratio: rho is not used. The reading of each unspecified choice: "
    "`alphatoken.policy_inputs.xtf_keep_masks`.",
    needs_reference_loss=True, precompute=_xtf_precompute, sft_only=True,
))
_register(Policy(
    "sstoken", _sstoken,
    "ssToken (Qin et al., 'ssToken: self-modulated and semantic-aware token selection for LLM fine-tuning', ICLR "
    "2026), as jianke0604/ssToken scripts/finetune.py (`filter_tokens_with_attention_loss` and its training loop) "
    "computes it: per example, score = g * minmax(l_ref - l) + (1 - g) * the last block's head-mean attention from "
    "the token's own position to the prompt, keep ceil(rho |response|) (the paper's matched rho instead of the "
    "source's data_prop 0.6); g = sstoken_gamma (source `ratio` 0.5), except g = 0 for the first "
    "sstoken_attention_only_examples (source `pre_index` 10000) examples of each epoch. The history model is the "
    "base model (source: `calculate_token_loss.py` on the base model).",
    needs_reference_loss=True, needs_attention=True, sft_only=True,
))
_register(Policy(
    "talr", _talr,
    "TALR, token-adaptive loss reweighting (Lin et al., 2026), as shankarp8/distillation-retains-capabilities "
    "src/disc/objectives.py (`talr_loss`, `compute_dynamic_tau`) computes it: w = stopgrad(max(max(p, 1e-6)^(1/tau), "
    "talr_weight_floor)), tau = the median over the micro-batch's sequences of their mean NLL (or talr_tau); loss "
    "= sum w l / the response tokens (source normalize='mean'; talr_normalize: 'sequences' is the source's 'sum', "
    "'weights' normalises w over the step).",
    normalizer=lambda config: config.talr_normalize, sft_only=True,
))
_register(Policy(
    "flow", _flow,
    "FLOW (Sanyal et al., 'Upweighting easy samples in fine-tuning mitigates forgetting', 2025), as "
    "sanyalsunny111/FLOW_finetuning language/get_dataset_temperature.py, create_weighted_dataset.py (loss type "
    "'sequence') and utils/trainer_utils.py (`WeightedLossTrainer.compute_loss`) compute it: fixed sample weights "
    "w_i = exp(-L_i / tau), L_i the base model's mean response NLL of example i, tau the median of L_i over the "
    "training set (or flow_temperature), not normalised; loss = sum_i w_i sum_t l_it / the step's response tokens.",
    needs_reference_loss=True, precompute=_flow_precompute, normalizer=lambda config: "tokens", sft_only=True,
))
_register(Policy(
    "tidpo", _tidpo,
    "TI-DPO (Yang et al., 'Token-importance guided direct preference optimization', ICLR 2026), as "
    "gracefulning/TIDPO trainers.py computes it: importance of a response token = L1 norm of the gradient of the "
    "max logit at the sequence's last position with respect to that token's input embedding, on the current "
    "weights each step; w = n (tidpo_lambda I / sum I + (1 - tidpo_lambda) Gaussian prior over the response "
    "positions, mu = (n-1)/2, sigma = n / tidpo_prior_sigma_div), mean 1 over the response; base loss TDPO2 "
    "-log sigmoid(dpo_beta (sum w logratio_c - sum w logratio_r - tidpo_alpha (KL_r - sg(KL_c)))), KL the summed "
    "per-position KL(pi_ref || pi) over the response, plus tidpo_gamma ReLU(||a - c||^2 - ||a - r||^2 + "
    "tidpo_triplet_margin) over the per-token log-ratio vectors of a policy-sampled anchor response a and the "
    "chosen c and rejected r responses, aligned by response position (seeded sampling, "
    "`alphatoken.policy_inputs.sample_anchor`). Needs the reference model in memory for the KL.",
    dpo_form="tdpo", needs_importance=True,
))
_register(Policy(
    "sepo", _sepo,
    "SePO (Yang et al., 'Selective preference optimization via token-level reward function estimation', "
    "EMNLP 2025), as SteveKGYang/SePO token_score.py (`get_topK`) and utils_selective.py (`SelectiveRRHFLoss`) "
    "compute it: token rewards r_t = log pi_oracle(y_t) - log pi_ref(y_t) of an oracle DPO-trained against the "
    "reference on a random subset (computed once before training: the pipeline's sepo_scores rule, "
    "`alphatoken.train.token_rewards`); keep the top sepo_ratio of each chosen response's tokens by r and the "
    "bottom sepo_ratio of each rejected response's (sepo_ratio null: rho); reference-free loss "
    "-log sigmoid(mean_{S+} log pi(y+_t) - mean_{S-} log pi(y-_t)) (no beta: the source's loss has none).",
    dpo_form="selective_mean", needs_token_rewards=True,
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
