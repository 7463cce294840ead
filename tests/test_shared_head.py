"""`capture(share_head=True)` + `TokenValuer.backward`: the training backward that reuses the head
gradient of scoring gives the same parameter gradients as `loss.backward()` on an ordinary forward,
for masked SFT sums and a non-linear (DPO-like) loss, with and without gradient checkpointing, tied
and untied heads, a frozen head; scores are unchanged; a plain `loss.backward()` is refused."""

import pytest
import torch
import torch.nn.functional as F

from alphatoken.blocks import scored_linears
from alphatoken.losses import top_rho_mask
from alphatoken.models import build_tiny_model
from alphatoken.valuation import TokenValuer, ValuationConfig
from bruteforce import token_losses
from test_valuation import make_batch, rel_err

ARCHS = ("llama", "qwen2", "gemma3")


def build(arch):
    model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(3)
    batch = make_batch(g, 4, 14, prompt=5, left_pad=[3, 0, 0, 1], right_pad=[0, 2, 0, 0])
    val_batch = make_batch(g, 2, 12, prompt=4, left_pad=[0, 2], right_pad=[1, 0])
    linears = scored_linears(model, 2)
    reference = {n: lin.weight.detach() - 0.05 * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64)
                 for n, lin in linears.items()}
    fisher = {n: torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) for n, lin in linears.items()}
    return model, batch, val_batch, reference, fisher


def sft_loss(token_loss, scores, labels):
    valid = labels[:, 1:] != -100  # (B, T-1)
    w = top_rho_mask(scores.total[:, 1:], valid, 0.5).to(token_loss.dtype)  # (B, T-1) detached
    return (w * token_loss).sum()


def dpo_like_loss(token_loss, scores, labels):
    """-log sigmoid(beta (masked logp of rows 0, 1 - masked logp of rows 2, 3)): not linear in token_loss."""
    valid = labels[:, 1:] != -100
    w = top_rho_mask(scores.total[:, 1:], valid, 0.7).to(token_loss.dtype)
    logp = -(w * token_loss).sum(dim=1)  # (B,)
    return -F.logsigmoid(0.3 * (logp[:2] - logp[2:])).sum()


def step_grads(model, valuer, batch, loss_fn, share_head):
    model.zero_grad(set_to_none=True)
    with valuer.capture(share_head=share_head):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    token_loss = token_losses(out.logits, batch["labels"])  # (B, T-1)
    scores = valuer.score_captured(batch, token_loss)
    loss = loss_fn(token_loss, scores, batch["labels"])
    if share_head:
        valuer.backward(loss, token_loss)
    else:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return scores, grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("signal", ["self", "total"])
@pytest.mark.parametrize("loss_fn", [sft_loss, dpo_like_loss], ids=["sft", "dpo"])
def test_shared_head_backward_equals_plain_backward(arch, signal, loss_fn):
    model, batch, val_batch, reference, fisher = build(arch)
    model.train()
    valuer = TokenValuer(model, ValuationConfig(last_k=2, window=3, signal=signal), fisher=fisher, reference=reference)
    valuer.set_validation(val_batch)
    plain_scores, plain = step_grads(model, valuer, batch, loss_fn, share_head=False)
    shared_scores, shared = step_grads(model, valuer, batch, loss_fn, share_head=True)
    assert rel_err(shared_scores.total, plain_scores.total) <= 1e-12
    assert plain.keys() == shared.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        assert plain[name].abs().max() > 0, name  # every parameter is reached (the check below can fail)
        assert rel_err(shared[name], plain[name]) <= 1e-10, name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_shared_head_backward_under_gradient_checkpointing(use_reentrant):
    model, batch, val_batch, reference, fisher = build("llama")
    valuer = TokenValuer(model, ValuationConfig(last_k=2, window=3), fisher=fisher, reference=reference)
    valuer.set_validation(val_batch)
    model.train()
    _, plain = step_grads(model, valuer, batch, sft_loss, share_head=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    try:
        _, shared = step_grads(model, valuer, batch, sft_loss, share_head=True)
    finally:
        model.gradient_checkpointing_disable()
    for name in plain:
        assert rel_err(shared[name], plain[name]) <= 1e-10, name


def test_frozen_head_and_backward_without_scoring():
    """Only the blocks train (the tied embedding/head frozen), and `backward` computes the head
    gradient itself when the forward was not scored."""
    model, batch, val_batch, reference, fisher = build("gemma3")  # ties the head to the embedding
    model.get_output_embeddings().weight.requires_grad_(False)
    valuer = TokenValuer(model, ValuationConfig(last_k=2, window=3), fisher=fisher, reference=reference)
    w = (batch["labels"][:, 1:] != -100).double() * torch.linspace(0.5, 1.5, batch["labels"].shape[1] - 1)  # (B, T-1)

    def grads(share_head):
        with valuer.capture(share_head=share_head):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        token_loss = token_losses(out.logits, batch["labels"])
        loss = (w * token_loss).sum()
        valuer.backward(loss, token_loss) if share_head else loss.backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return got

    plain, shared = grads(False), grads(True)
    assert plain.keys() == shared.keys() and "lm_head.weight" not in plain
    for name in plain:
        assert rel_err(shared[name], plain[name]) <= 1e-10, name
    assert model.get_output_embeddings().weight.grad is None


def test_plain_backward_after_a_shared_head_forward_is_refused():
    model, batch, val_batch, reference, fisher = build("llama")
    valuer = TokenValuer(model, ValuationConfig(last_k=2, window=3), fisher=fisher, reference=reference)
    handles_before = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    with valuer.capture(share_head=True):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == handles_before
    token_loss = token_losses(out.logits, batch["labels"])
    with pytest.raises(RuntimeError, match=r"valuer\.backward\(loss, token_loss\)"):
        token_loss.sum().backward()
    model.zero_grad(set_to_none=True)
    with valuer.capture(share_head=True):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    token_loss = token_losses(out.logits, batch["labels"])
    valuer.backward(token_loss.sum(), token_loss)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(RuntimeError, match="share_head=True"):
        valuer.backward(token_loss.sum(), token_loss)  # consumed: a second call has nothing to back-propagate
