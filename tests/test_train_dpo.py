"""DPO loop: `full` equals a textbook DPO loop, Alpha-DPO with every token kept equals plain DPO
(Eq. 14's surrogate has the DPO gradient), micro-batch invariance, and every preference policy
trains. Tiny float64 models built here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from alphatoken.blocks import scored_linears
from alphatoken.models import build_tiny_model, weights_fingerprint
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, collate_pairs, encode_dataset, train_dpo
from alphatoken.train.loop import _epoch_order
from alphatoken.valuation import ValuationConfig

TOL = 1e-6  # as in test_train.py: float64 runs that round differently agree to ~1e-7 relative
BETA = 0.1




def pairs(n=8, offset=0):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "chosen": f"the sum is {2 * i + 1}.", "rejected": f"it is {i * 3 + 2}!"}
            for i in range(offset, offset + n)]


def config(tmp_path, name="full", rho=0.5, **kw):
    base = dict(output_dir=str(tmp_path), lr=1e-3, micro_batch_size=2, grad_accum_steps=2, max_steps=3, warmup_steps=1,
                weight_decay=0.1, max_grad_norm=1.0, adam_eps=1e-5, policy=PolicyConfig(name=name, rho=rho), progress=False,
                max_length=64, dpo_beta=BETA, valuation=ValuationConfig(last_k=2, window=4))
    base.update(kw)
    return TrainConfig(**base)


def fisher_of(model):
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(l.weight.shape, generator=g, dtype=l.weight.dtype) for n, l in scored_linears(model, 2).items()}


def max_param_diff(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    with torch.no_grad():
        return max(float((pa[k] - pb[k]).abs().max() / pb[k].abs().max().clamp(min=1e-12)) for k in pa)


def sequence_logps(model, batch):
    """sum over response tokens of log pi(y_p | <p), per row. batch rows: [chosen..., rejected...]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(dim=1)


def test_full_policy_equals_textbook_dpo_loop(tmp_path, tokenizer):
    trained = train_dpo(build_tiny_model("llama"), tokenizer, pairs(12), None, config(tmp_path)).model

    # slow twin: Rafailov et al.'s loss on the same global batches, reference = the initial model
    model = build_tiny_model("llama")
    reference = copy.deepcopy(model).eval()
    features, _ = encode_dataset(tokenizer, pairs(12), 64, preference=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, eps=1e-5)
    total, warm = 3, 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    order = _epoch_order(len(features), 0, 0)
    for step in range(total):
        batch = collate_pairs([features[i] for i in order[step * 4 : (step + 1) * 4]], tokenizer.pad_token_id)
        logps = sequence_logps(model, batch)
        with torch.no_grad():
            ref = sequence_logps(reference, batch)
        logit = BETA * ((logps[:4] - ref[:4]) - (logps[4:] - ref[4:]))
        (-F.logsigmoid(logit).mean()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    assert max_param_diff(trained, model) < TOL
    assert weights_fingerprint(trained) != weights_fingerprint(build_tiny_model("llama"))


def test_alpha_dpo_keeping_every_token_equals_plain_dpo(tmp_path, tokenizer):
    """rho = 1: the valuer scores every micro-batch (with the per-example +-omega scale) but keeps
    all tokens; the Eq. 14 surrogate omega_sg (l+ - l-) then has exactly the DPO gradient."""
    model = build_tiny_model("qwen2")
    alpha = train_dpo(model, tokenizer, pairs(), pairs(2, offset=20), config(tmp_path / "a", "alphatoken", rho=1.0),
                      fisher=fisher_of(model))
    plain = train_dpo(build_tiny_model("qwen2"), tokenizer, pairs(), None, config(tmp_path / "b"))
    assert alpha.metrics["mean_kept_fraction"] == 1.0 and alpha.metrics["nonfinite_steps"] == 0
    assert max_param_diff(alpha.model, plain.model) < TOL
    assert weights_fingerprint(alpha.model) != weights_fingerprint(build_tiny_model("qwen2"))


def test_micro_batch_split_does_not_change_the_dpo_step(tmp_path, tokenizer):
    """Each split pads its micro-batches differently; Hugging Face RMSNorms compute in float32 even in
    float64 models, so splits agree to ~1e-7 relative per step (Gemma3's norm, which also adds its
    weight in float32, lands just above TOL after two DPO steps; Llama is used here)."""
    runs = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        model = build_tiny_model("llama")
        cfg = config(tmp_path / f"{micro}x{accum}", "alphatoken", micro_batch_size=micro, grad_accum_steps=accum,
                     max_steps=2, policy=PolicyConfig(name="alphatoken", rho=1.0))
        result = train_dpo(model, tokenizer, pairs(), pairs(2, offset=20), cfg, fisher=fisher_of(model))
        assert result.metrics["nonfinite_steps"] == 0 and result.metrics["mean_kept_fraction"] == 1.0
        runs[(micro, accum)] = result.model
    assert weights_fingerprint(runs[(4, 1)]) != weights_fingerprint(build_tiny_model("llama"))
    assert max_param_diff(runs[(2, 2)], runs[(4, 1)]) < TOL
    assert max_param_diff(runs[(1, 4)], runs[(4, 1)]) < TOL


DPO_POLICIES = ["full", "alphatoken", "adaptation_only", "stability_only", "no_fisher", "random", "bottom", "soft", "confpo"]


@pytest.mark.parametrize("name", DPO_POLICIES)
def test_dpo_policies_train(tmp_path, tokenizer, name):
    model = build_tiny_model("llama")
    before = weights_fingerprint(model)
    result = train_dpo(model, tokenizer, pairs(), pairs(2, offset=20), config(tmp_path, name, lr=1e-2, max_steps=2),
                       fisher=fisher_of(model))
    assert weights_fingerprint(result.model) != before
    assert result.metrics["steps"] == 2 and result.metrics["policy"] == name
    assert result.metrics["nonfinite_steps"] == 0 and result.metrics["all_masked_steps"] == 0
    kept = result.metrics["mean_kept_fraction"]
    if name == "full":
        assert kept == 1.0
    elif name in ("alphatoken", "adaptation_only", "stability_only", "no_fisher", "random", "bottom"):
        assert abs(kept - 0.5) < 0.1, kept  # ceil(rho N) per branch and micro-batch
    else:
        assert 0.0 < kept < 1.0, kept
