"""Token policies: exact budgets, each rule against a by-hand version, the rho schedule."""

import math
from types import SimpleNamespace

import pytest
import torch

from alphatoken.losses import kept_count, top_rho_mask
from alphatoken.policies import POLICIES, PolicyConfig, TokenContext, get_policy

TOP_RHO = ["alphatoken", "alphatoken_lora", "adaptation_only", "stability_only", "direct_only", "causal_only", "no_fisher", "random", "bottom", "token_cleaning", "rho1"]


def _context(rho=0.5, seed=0, B=3, T=8):
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(B, T, generator=g) > 0.25
    valid[0, 0] = True
    token_loss = torch.rand(B, T, generator=g, dtype=torch.float64) * 4 * valid
    reference_loss = torch.rand(B, T, generator=g, dtype=torch.float64) * 4 * valid
    parts = {k: torch.randn(B, T, generator=g, dtype=torch.float64) for k in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau")}
    scores = SimpleNamespace(total=parts["tgt_dir"] + parts["tgt_cau"] + 1.5 * (parts["prx_dir"] + parts["prx_cau"]), **parts)
    return TokenContext(valid, token_loss, rho, scores, reference_loss, torch.Generator().manual_seed(seed + 1))


def _kept_set(weights):
    return set((weights > 0).view(-1).nonzero().view(-1).tolist())


def _top_by_hand(values, valid, k):
    items = sorted((-float(values.view(-1)[i]), i) for i in range(values.numel()) if valid.view(-1)[i])
    return {i for _, i in items[:k]}


@pytest.mark.parametrize("name", TOP_RHO + ["stm", "confpo"])
@pytest.mark.parametrize("rho", [0.1, 0.3, 0.5, 1.0])
def test_top_rho_policies_keep_exactly_ceil_rho_n(name, rho):
    config = PolicyConfig(name=name, rho=rho, confpo_selection="ratio")
    for seed in range(3):
        ctx = _context(rho, seed)
        weights = get_policy(name).weights(ctx, config)
        n = int(ctx.valid.sum())
        assert int((weights > 0).sum()) == math.ceil(round(rho * n, 9)) == kept_count(n, rho)
        assert not ((weights > 0) & ~ctx.valid).any()
        assert set(weights.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "name,signal",
    [
        ("alphatoken", lambda c: c.scores.total),
        ("bottom", lambda c: -c.scores.total),
        ("token_cleaning", lambda c: c.reference_loss - c.token_loss),
        ("rho1", lambda c: c.token_loss - c.reference_loss),
        ("stm", lambda c: -c.reference_loss),
    ],
)
def test_policies_select_the_tokens_their_rule_names(name, signal):
    ctx = _context(0.4, seed=7)
    weights = get_policy(name).weights(ctx, PolicyConfig(name=name, rho=0.4))
    assert _kept_set(weights) == _top_by_hand(signal(ctx), ctx.valid, kept_count(int(ctx.valid.sum()), 0.4))


def test_full_and_lora_keep_every_valid_token_and_soft_is_bounded():
    ctx = _context(0.5, seed=2)
    for name in ("full", "lora"):
        assert torch.equal(get_policy(name).weights(ctx, PolicyConfig(name=name)), ctx.valid.double())
    soft = get_policy("soft").weights(ctx, PolicyConfig(name="soft"))
    assert float(soft.min()) >= 0 and float(soft.max()) == 1.0 and float(soft[~ctx.valid].abs().sum()) == 0.0
    values = ctx.scores.total[ctx.valid]
    expected = (values - values.min()) / (values.max() - values.min())
    assert torch.allclose(soft[ctx.valid], expected)


def test_stm_threshold_and_confpo_mean_rules_by_hand():
    ctx = _context(0.5, seed=4)
    stm = get_policy("stm").weights(ctx, PolicyConfig(name="stm", stm_ppl_threshold=4.0))
    for b in range(ctx.valid.shape[0]):
        for p in range(ctx.valid.shape[1]):
            keep = bool(ctx.valid[b, p]) and math.exp(float(ctx.reference_loss[b, p])) <= 4.0
            assert bool(stm[b, p]) == keep
    confpo = get_policy("confpo").weights(ctx, PolicyConfig(name="confpo"))
    for b in range(ctx.valid.shape[0]):
        probs = [math.exp(-float(ctx.token_loss[b, p])) for p in range(ctx.valid.shape[1]) if ctx.valid[b, p]]
        mean = sum(probs) / len(probs)
        for p in range(ctx.valid.shape[1]):
            assert bool(confpo[b, p]) == (bool(ctx.valid[b, p]) and math.exp(-float(ctx.token_loss[b, p])) < mean)


def test_random_policy_is_seeded():
    a = get_policy("random").weights(_context(0.5, seed=3), PolicyConfig(name="random"))
    b = get_policy("random").weights(_context(0.5, seed=3), PolicyConfig(name="random"))
    other_seed = TokenContext(**{**vars(_context(0.5, seed=3)), "generator": torch.Generator().manual_seed(99)})
    c = get_policy("random").weights(other_seed, PolicyConfig(name="random"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rho_schedules():
    linear = PolicyConfig(rho=0.8, rho_end=0.4, rho_schedule="linear")
    cosine = PolicyConfig(rho=0.8, rho_end=0.4, rho_schedule="cosine")
    assert linear.rho_at(0.0) == 0.8 and abs(linear.rho_at(0.5) - 0.6) < 1e-12 and abs(linear.rho_at(1.0) - 0.4) < 1e-12
    assert abs(cosine.rho_at(0.0) - 0.8) < 1e-12 and abs(cosine.rho_at(0.5) - 0.6) < 1e-12 and abs(cosine.rho_at(1.0) - 0.4) < 1e-12
    assert abs(cosine.rho_at(0.25) - (0.4 + 0.4 * 0.5 * (1 + math.cos(math.pi / 4)))) < 1e-12
    assert PolicyConfig(rho=0.3).rho_at(0.7) == 0.3


def test_config_validation_and_registry():
    with pytest.raises(ValueError, match="not one of"):
        PolicyConfig(name="nope")
    with pytest.raises(ValueError, match="rho"):
        PolicyConfig(rho=0.0)
    with pytest.raises(ValueError, match="rho_end"):
        PolicyConfig(rho_schedule="linear")
    with pytest.raises(ValueError, match="needs token scores"):
        ctx = _context()
        ctx.scores = None
        get_policy("alphatoken").weights(ctx, PolicyConfig())
    expected = {"alphatoken", "adaptation_only", "stability_only", "direct_only", "causal_only", "no_fisher", "random", "bottom", "full", "soft", "stm", "token_cleaning", "rho1", "confpo", "lora", "alphatoken_lora",
                "xtf", "sstoken", "talr", "flow", "alphatoken_stratified", "tidpo", "sepo"}
    assert set(POLICIES) == expected
    for policy in POLICIES.values():
        assert policy.doc


def _stratified_twin(scores, key, valid, rho, strata):
    """Explicit loops: rank valid entries by (key, index), equal-count bins, largest-remainder quotas
    summing to ceil(rho N), the top scores (ties: lower index) inside each bin."""
    flat = [(i, float(key.reshape(-1)[i]), float(scores.reshape(-1)[i])) for i in range(valid.numel()) if valid.reshape(-1)[i]]
    n = len(flat)
    k = math.ceil(round(rho * n, 9))
    ranked = sorted(flat, key=lambda t: (t[1], t[0]))
    sizes = [n // strata + (1 if b < n % strata else 0) for b in range(min(strata, n))]
    quotas = [k * size // n for size in sizes]
    extra = sorted(range(len(sizes)), key=lambda b: (-(k * sizes[b] % n), b))[: k - sum(quotas)]
    kept, start = set(), 0
    for b, size in enumerate(sizes):
        members = ranked[start:start + size]
        start += size
        quota = quotas[b] + (1 if b in extra else 0)
        kept |= {i for i, _, _ in sorted(members, key=lambda t: (-t[2], t[0]))[:quota]}
    return torch.tensor([i in kept for i in range(valid.numel())]).view(valid.shape), k


@pytest.mark.parametrize("rho,strata", [(0.5, 4), (0.3, 3), (0.25, 1), (0.9, 7), (1.0, 2)])
def test_stratified_selection_equals_its_twin_with_the_exact_budget(rho, strata):
    from alphatoken.policies import stratified_top_mask

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 11, generator=g, dtype=torch.float64)
    key = torch.rand(3, 11, generator=g, dtype=torch.float64).round(decimals=1)  # ties in the key
    scores[0, :4] = 0.5  # ties in the score
    valid = torch.rand(3, 11, generator=g) > 0.25
    mask = stratified_top_mask(scores, key, valid, rho, strata)
    twin, k = _stratified_twin(scores, key, valid, rho, strata)
    assert torch.equal(mask, twin) and int(mask.sum()) == k and not (mask & ~valid).any()
    if strata == 1:  # one bin: plain top-rho
        assert torch.equal(mask, top_rho_mask(scores, valid, rho))


def test_stratified_policy_keeps_the_hardness_profile_of_all_tokens():
    """Scores that favour hard tokens: plain top-rho keeps the hardest half, the stratified policy
    keeps half of each quartile of the base loss."""
    ref = torch.arange(16, dtype=torch.float64).view(1, 16)  # base-model loss, rising
    valid = torch.ones(1, 16, dtype=torch.bool)
    ctx = TokenContext(valid, ref.clone(), 0.5, SimpleNamespace(total=ref.clone()), ref)
    plain = get_policy("alphatoken").weights(ctx, PolicyConfig(name="alphatoken"))
    stratified = get_policy("alphatoken_stratified").weights(ctx, PolicyConfig(name="alphatoken_stratified"))
    assert plain[0].nonzero().squeeze(1).tolist() == list(range(8, 16))
    assert stratified[0].nonzero().squeeze(1).tolist() == [2, 3, 6, 7, 10, 11, 14, 15]
