"""Losses and masks against slow, obviously-correct loops (float64, tiny models built here)."""

import math

import pytest
import torch
import torch.nn.functional as F

from alphatoken.losses import (
    alpha_dpo_loss,
    dpo_logit,
    dpo_loss,
    dpo_weight,
    kept_count,
    loss_positions,
    masked_dpo_loss,
    masked_sft_loss,
    soft_weights,
    token_nll,
    top_rho_mask,
)
from alphatoken.models import build_tiny_model


def _batch(B=2, T=7, vocab=260, seed=0, prompt=2):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[-1, -2:] = -100  # padding on the last row
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_token_nll_matches_loop():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 4, -100, 1], [-100, -100, 7, 8, 9]])
    got = token_nll(logits, labels)
    assert got.shape == (2, 4)
    for b in range(2):
        for p in range(4):
            target = int(labels[b, p + 1])
            expected = 0.0 if target == -100 else -float(torch.log_softmax(logits[b, p], -1)[target])
            assert abs(float(got[b, p]) - expected) < 1e-12, (b, p)
    assert torch.equal(loss_positions(labels), labels[:, 1:] != -100)


def test_token_nll_gradient_is_cross_entropys():
    """The fused backward (softmax - onehot, one [B, T, V] tensor) against autograd through
    cross-entropy on the shifted logits, float64, ignored positions included; and torch's gradcheck."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, -2:] = -100
    weights = torch.randn(3, 6, dtype=torch.float64, generator=g)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100,
                                reduction="none").view(3, 6)
    got = token_nll(logits, labels)
    assert (got - reference).abs().max() < 1e-12
    (expected,) = torch.autograd.grad((reference * weights).sum(), logits)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    assert (grad - expected).abs().max() < 1e-12 and expected.abs().max() > 0.1
    assert torch.count_nonzero(grad[:, -1]) == 0 and torch.count_nonzero(grad[0, :2]) == 0  # nothing read there
    assert torch.autograd.gradcheck(lambda z: token_nll(z, labels), (logits,))


def test_token_nll_upcasts_half_precision_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 13, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 13, (2, 5), generator=g)
    got = token_nll(logits, labels)
    assert got.dtype == torch.float32
    reference = F.cross_entropy(logits[:, :-1].float().reshape(-1, 13), labels[:, 1:].reshape(-1), reduction="none")
    assert torch.allclose(got.reshape(-1), reference, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert grad.dtype == torch.bfloat16


@pytest.mark.parametrize("n,rho,k", [(10, 0.3, 3), (10, 0.5, 5), (7, 0.5, 4), (3, 0.1, 1), (5, 1.0, 5), (1, 0.01, 1), (100, 0.07, 7)])
def test_kept_count_is_ceil(n, rho, k):
    assert kept_count(n, rho) == k


def test_top_rho_mask_exact_count_and_order():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        scores = torch.randn(3, 9, generator=g, dtype=torch.float64)
        valid = torch.rand(3, 9, generator=g) > 0.3
        rho = [0.1, 0.25, 0.5, 0.9, 1.0][trial % 5]
        mask = top_rho_mask(scores, valid, rho)
        n = int(valid.sum())
        assert int(mask.sum()) == math.ceil(round(rho * n, 9))
        assert not (mask & ~valid).any()
        # slow twin: sort (score desc, flat index asc) by hand
        items = sorted(((-float(scores.view(-1)[i]), i) for i in range(27) if valid.view(-1)[i]))
        chosen = {i for _, i in items[: int(mask.sum())]}
        assert chosen == set(mask.view(-1).nonzero().view(-1).tolist())


def test_top_rho_mask_ties_break_by_index_and_nan_raises():
    scores = torch.zeros(2, 4)
    valid = torch.tensor([[False, True, True, True], [True, True, False, True]])
    mask = top_rho_mask(scores, valid, 0.5)  # N = 6 -> keep 3: flat indices 1, 2, 3
    assert mask.view(-1).nonzero().view(-1).tolist() == [1, 2, 3]
    assert not top_rho_mask(scores, torch.zeros(2, 4, dtype=torch.bool), 0.5).any()
    with pytest.raises(ValueError, match="NaN"):
        top_rho_mask(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="rho"):
        top_rho_mask(scores, valid, 0.0)


def test_soft_weights_range():
    scores = torch.tensor([[1.0, 3.0, 2.0, 9.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False]])
    w = soft_weights(scores, valid)
    assert torch.allclose(w, torch.tensor([[0.0, 1.0, 0.5, 0.0]], dtype=torch.float64))
    assert torch.equal(soft_weights(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)), torch.ones(1, 3))


def test_sft_loss_all_ones_is_plain_mean_and_zero_mask_zero_grad():
    model = build_tiny_model("llama", dtype=torch.float64)
    batch = _batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = token_nll(logits, batch["labels"])
    valid = loss_positions(batch["labels"]).double()
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(masked_sft_loss(nll, valid).detach()) - float(plain.detach())) < 1e-12
    zero = masked_sft_loss(nll, torch.zeros_like(valid))
    grads = torch.autograd.grad(zero, [p for p in model.parameters()], allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def _per_token_grads(model, batch):
    """Slow twin: the gradient of every single token loss l_p, one backward each."""
    params = [p for p in model.parameters()]
    out = {}
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        for p in range(labels.shape[1] - 1):
            if labels[b, p + 1] == -100:
                continue
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = -torch.log_softmax(logits[b, p], -1)[labels[b, p + 1]]
            out[(b, p)] = (float(loss.detach()), torch.autograd.grad(loss, params, allow_unused=True))
    return out


def test_alpha_dpo_gradient_equals_hand_masked_dpo_gradient():
    torch.manual_seed(0)
    model = build_tiny_model("qwen2", dtype=torch.float64, seed=3)
    params = list(model.parameters())
    chosen, rejected = _batch(B=2, T=6, seed=1), _batch(B=2, T=6, seed=2)
    beta = 0.5
    ref_c, ref_r = torch.tensor([-30.0, -31.0], dtype=torch.float64), torch.tensor([-29.0, -33.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    m_c = (torch.rand(2, 5, generator=g) > 0.5).double() * loss_positions(chosen["labels"])
    m_r = (torch.rand(2, 5, generator=g) > 0.5).double() * loss_positions(rejected["labels"])

    nll_c = token_nll(model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits, chosen["labels"])
    nll_r = token_nll(model(input_ids=rejected["input_ids"], attention_mask=rejected["attention_mask"]).logits, rejected["labels"])
    s = dpo_logit(-nll_c.sum(1), -nll_r.sum(1), ref_c, ref_r, beta)
    omega = dpo_weight(s, beta)
    loss = alpha_dpo_loss(nll_c, nll_r, m_c, m_r, omega)
    fast = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    # by hand: per-token gradients, omega from the unmasked sequence log-probs
    tok_c, tok_r = _per_token_grads(model, chosen), _per_token_grads(model, rejected)
    for b in range(2):
        logp_c = -sum(v[0] for (bb, _), v in tok_c.items() if bb == b)
        logp_r = -sum(v[0] for (bb, _), v in tok_r.items() if bb == b)
        s_hand = beta * ((logp_c - float(ref_c[b])) - (logp_r - float(ref_r[b])))
        assert abs(float(omega[b]) - beta / (1 + math.exp(s_hand))) < 1e-12
    for i, param in enumerate(params):
        slow = torch.zeros_like(param)
        for (b, p), (_, grads) in tok_c.items():
            if m_c[b, p] and grads[i] is not None:
                slow += float(omega[b]) * grads[i] / 2
        for (b, p), (_, grads) in tok_r.items():
            if m_r[b, p] and grads[i] is not None:
                slow -= float(omega[b]) * grads[i] / 2
        got = fast[i] if fast[i] is not None else torch.zeros_like(param)
        # tolerance 1e-6: HF RMSNorm computes in float32 even in a float64 model
        rel = float((got - slow).norm() / slow.norm().clamp(min=1e-30))
        assert rel < 1e-6, f"parameter {i}: relative error {rel:.2e}"

    # all-ones masks: same gradient as plain DPO
    ones_c, ones_r = loss_positions(chosen["labels"]).double(), loss_positions(rejected["labels"]).double()
    surrogate = torch.autograd.grad(alpha_dpo_loss(nll_c, nll_r, ones_c, ones_r, omega), params, retain_graph=True, allow_unused=True)
    plain = torch.autograd.grad(dpo_loss(s), params, retain_graph=True, allow_unused=True)
    masked_logit = torch.autograd.grad(masked_dpo_loss(nll_c, nll_r, -ref_c[:, None] * ones_c / ones_c.sum(1, keepdim=True), -ref_r[:, None] * ones_r / ones_r.sum(1, keepdim=True), ones_c, ones_r, beta), params, allow_unused=True)
    for a, b_, c in zip(surrogate, plain, masked_logit):
        if a is None:
            assert b_ is None
            continue
        assert torch.allclose(a, b_, atol=1e-12)
        assert torch.allclose(c, b_, atol=1e-12)
