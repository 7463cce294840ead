"""The two exact identities of METHOD.md (`total` signal), checked on the quantities the valuation
engine captures (x, e of every scored linear; A and the per-head context errors c of every scored
block) against plain autograd of L = sum_p l_p, on tiny float64 models with padded batches:

1. sum over all positions of e_p (x) x_p equals grad_W L for every scored weight;
2. the value-path sum over all k >= p of A_h[k, p] c_{k,h} (x) x_p (heads mapped to their value
   head group) equals grad_{W_V} L.
On the Qwen-3.5 hybrid, (2) holds only if c includes the attention's sigmoid output gate."""

import pytest
import torch

from alphatoken.blocks import scored_linears
from alphatoken.models import build_tiny_model
from alphatoken.valuation import TokenValuer, ValuationConfig
from bruteforce import token_losses
from test_valuation import ARCHS, make_batch, rel_err

LAST_K = 2


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    model = build_tiny_model(request.param, dtype=torch.float64, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(5)
    batch = make_batch(g, 3, 13, prompt=4, left_pad=[2, 0, 0], right_pad=[0, 3, 0])
    valuer = TokenValuer(model, ValuationConfig(last_k=LAST_K, signal="total"))
    signals = valuer.signals(batch, full_attention=True)
    linears = scored_linears(model, LAST_K)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    total_loss = token_losses(out.logits, batch["labels"]).sum()  # L = sum_p l_p
    grads = dict(zip(linears, torch.autograd.grad(total_loss, [lin.weight for lin in linears.values()])))
    return request.param, model, valuer, signals, grads, batch


def test_per_position_outer_products_sum_to_the_gradient(case):
    arch, _, _, signals, grads, _ = case
    for name, grad in grads.items():
        summed = torch.einsum("bto,bti->oi", signals.e[name], signals.x[name])  # sum_p e_p (x) x_p
        err = rel_err(summed, grad)
        assert err <= 1e-6, f"{arch}: {name}: sum_p e_p x_p^T vs autograd, relative error {err:.2e}"


def test_value_path_sum_is_the_value_projection_gradient(case):
    arch, model, valuer, signals, grads, batch = case
    value_weights = {block: name for name, block in valuer.value_weight.items()}
    # one value projection per softmax-attention block: the hybrid's last 2 blocks are DeltaNet + attention
    assert len(value_weights) == (1 if arch == "qwen3_5" else LAST_K)
    assert sorted(signals.ctx_err) == sorted(value_weights) == sorted(signals.attn)
    for block, name in value_weights.items():
        probs = signals.attn[block]  # (B, H, T, T): A_h[k, p], query k, key p
        ctx_err = signals.ctx_err[block]  # (B, T, H, hd): c_{k,h}
        B, H, T, _ = probs.shape
        hd = ctx_err.shape[-1]
        n_kv = grads[name].shape[0] // hd
        per_head = torch.einsum("bhkp,bkhd->bphd", probs, ctx_err)  # sum_k A_h[k,p] c_{k,h}; A is 0 for k < p
        per_group = per_head.view(B, T, n_kv, H // n_kv, hd).sum(3).reshape(B, T, n_kv * hd)  # heads -> value group
        summed = torch.einsum("bpo,bpi->oi", per_group, signals.x[name])  # (d_out, d_in)
        err = rel_err(summed, grads[name])
        assert err <= 1e-6, f"{arch}: {name}: value-path sum vs autograd grad W_V, relative error {err:.2e}"
        # A is causal on real query rows: nothing flows from a key to an earlier query (a padding
        # query sees only masked keys and gets uniform weights, but no loss depends on it: c = 0 there)
        real_query = batch["attention_mask"].bool()[:, None, :, None]  # (B, 1, T, 1)
        assert float((probs * real_query).triu(1).abs().max()) == 0.0, f"{arch}: block {block}: attention is not causal"
        assert float(ctx_err[~batch["attention_mask"].bool()].abs().max()) == 0.0
