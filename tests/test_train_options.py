"""Training options of the diagnosis experiments: SGD, training only the scored weights, the
value-realisation record (against a hand-computed twin), the step timing. Tiny float64 models."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from alphatoken.blocks import scored_linears
from alphatoken.data import ConfigError
from alphatoken.models import build_tiny_model
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, collate, encode_dataset, train_dpo, train_sft
from alphatoken.train.loop import TIMING, _epoch_order
from alphatoken.train.realisation import FIELDS
from alphatoken.valuation import ValuationConfig

from test_train import TOL, _valuation_setup, examples, max_param_diff  # TOL: why 1e-6 in float64

LR = 1e-2


def held_out(n=3):
    return [{"prompt": f"h{i}: add {i} and {2 * i}", "response": f"the sum is {3 * i}."} for i in range(n)]


def config(tmp_path, name="full", **kw):
    base = dict(output_dir=str(tmp_path), lr=LR, micro_batch_size=2, grad_accum_steps=2, max_steps=2, warmup_steps=0,
                lr_schedule="constant", max_grad_norm=None, policy=PolicyConfig(name=name, rho=0.5), progress=False,
                max_length=64, valuation=ValuationConfig(last_k=2, window=4))
    base.update(kw)
    return TrainConfig(**base)


def mean_ce(model, features, pad_id):
    batch = collate(features, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)


def live_rows(out, names):
    """{name: [values by step]} from a run's dvclive TSVs."""
    rows = {}
    for name in names:
        with open(out / "dvclive" / "plots" / "metrics" / "train" / f"{name}.tsv", newline="") as f:
            rows[name] = [float(r[name]) for r in csv.DictReader(f, delimiter="\t")]
    return rows


def test_sgd_equals_a_hand_written_sgd_loop(tmp_path, tokenizer):
    cfg = config(tmp_path, optimizer="sgd", sgd_momentum=0.9, weight_decay=0.1, max_steps=3)
    trained = train_sft(build_tiny_model("llama"), tokenizer, examples(12), None, cfg).model

    model = build_tiny_model("llama")
    features, _ = encode_dataset(tokenizer, examples(12), 64)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=LR, momentum=0.9)
    order = _epoch_order(len(features), 0, 0)
    for step in range(3):
        mean_ce(model, [features[i] for i in order[step * 4 : (step + 1) * 4]], tokenizer.pad_token_id).backward()
        opt.step()
        opt.zero_grad()
    assert max_param_diff(trained, model) < TOL


def test_scored_only_training_moves_only_the_scored_weights_like_a_frozen_twin(tmp_path, tokenizer):
    cfg = config(tmp_path, trainable="scored", max_steps=2, adam_eps=1e-5, lr=1e-3)
    trained = train_sft(build_tiny_model("qwen2"), tokenizer, examples(), None, cfg).model

    base = build_tiny_model("qwen2")
    scored = set(scored_linears(base, 2))
    model = build_tiny_model("qwen2")
    for name, p in model.named_parameters():
        p.requires_grad_(name in scored)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n in scored], lr=1e-3, weight_decay=0.0, eps=1e-5)
    features, _ = encode_dataset(tokenizer, examples(), 64)
    order = _epoch_order(len(features), 0, 0)
    for step in range(2):
        mean_ce(model, [features[i] for i in order[step * 4 : (step + 1) * 4]], tokenizer.pad_token_id).backward()
        opt.step()
        opt.zero_grad()
    assert max_param_diff(trained, model) < TOL
    before, after = dict(base.named_parameters()), dict(trained.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == scored


def test_realisation_record_equals_a_hand_computed_first_step(tmp_path, tokenizer):
    """Step 1 of `full` under clipped AdamW: every recorded quantity recomputed by hand from the
    textbook gradients (mean token cross-entropy of the step's batch and of each probe set)."""
    val = [{"prompt": "q20: add 20 and 21", "response": "the sum is 41."}, {"prompt": "q30: add 30 and 31", "response": "the sum is 61."}]
    cfg = config(tmp_path, max_steps=1, max_grad_norm=0.5, realisation_every=1)
    result = train_sft(build_tiny_model("llama"), tokenizer, examples(), val, cfg, realisation_data=held_out())

    model = build_tiny_model("llama")
    pad = tokenizer.pad_token_id
    params = [p for p in model.parameters()]
    scored = set(scored_linears(model, 2))
    keep = [n in scored for n, _ in model.named_parameters()]
    features, _ = encode_dataset(tokenizer, examples(), 64)
    step_grad = torch.autograd.grad(mean_ce(model, [features[i] for i in _epoch_order(len(features), 0, 0)[:4]], pad), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in step_grad))
    step_grad = [g * min(1.0, 0.5 / (float(norm) + 1e-6)) for g in step_grad]
    probes = {"val": encode_dataset(tokenizer, val, 64)[0], "heldout": encode_dataset(tokenizer, held_out(), 64)[0]}
    before = {k: mean_ce(model, f, pad) for k, f in probes.items()}
    grads = {k: torch.autograd.grad(loss, params) for k, loss in before.items()}
    final = dict(result.model.named_parameters())
    delta = [final[n].detach() - p.detach() for n, p in model.named_parameters()]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p += d
        after = {k: float(mean_ce(model, f, pad)) for k, f in probes.items()}

    def dot(a, b, mask=None):
        return float(sum((x * y).sum() for i, (x, y) in enumerate(zip(a, b)) if mask is None or mask[i]))

    rows = live_rows(tmp_path, [f"{k}_{f}" for k in probes for f in (*FIELDS, "loss")])
    for k in probes:
        g = grads[k]
        expected = {
            "loss": float(before[k]),
            "sgd_pred": -LR * dot(step_grad, g), "sgd_pred_scored": -LR * dot(step_grad, g, keep),
            "update_pred": dot(delta, g), "update_pred_scored": dot(delta, g, keep),
            "loss_change": after[k] - float(before[k]),
            "grad_cos": dot(step_grad, g) / math.sqrt(dot(step_grad, step_grad) * dot(g, g)),
            "update_cos": -dot(delta, g) / math.sqrt(dot(delta, delta) * dot(g, g)),
        }
        for field, value in expected.items():
            got = rows[f"{k}_{field}"][0]
            assert got == pytest.approx(value, rel=1e-6, abs=1e-12), (k, field)
    # an SGD step without momentum or clipping is the first-order step the gradient predicts
    sgd = train_sft(build_tiny_model("llama"), tokenizer, examples(), val, config(tmp_path / "sgd", optimizer="sgd", realisation_every=1),
                    realisation_data=held_out())
    assert sgd.steps == 2
    rows = live_rows(tmp_path / "sgd", ["heldout_sgd_pred", "heldout_update_pred", "val_sgd_pred", "val_update_pred"])
    for k in ("heldout", "val"):
        assert rows[f"{k}_update_pred"] == pytest.approx(rows[f"{k}_sgd_pred"], rel=1e-9)


def test_realisation_never_changes_the_run_and_scores_the_alphatoken_step(tmp_path, tokenizer):
    model = build_tiny_model("llama")
    fisher, val, vcfg = _valuation_setup(model)
    plain = train_sft(model, tokenizer, examples(), val, config(tmp_path / "a", "alphatoken", valuation=vcfg), fisher=fisher)
    recorded = train_sft(build_tiny_model("llama"), tokenizer, examples(), val,
                         config(tmp_path / "b", "alphatoken", valuation=vcfg, realisation_every=2), fisher=fisher,
                         realisation_data=held_out())
    assert max_param_diff(plain.model, recorded.model) == 0.0
    rows = live_rows(tmp_path / "b", ["heldout_grad_cos"])
    assert len(rows["heldout_grad_cos"]) == 1  # every 2nd of 2 steps: step 2 only
    timing = json.loads((tmp_path / "b" / TIMING).read_text())
    assert timing["steps_timed"] == 2 and timing["mean_step_seconds"] > 0
    assert len(timing["step_seconds"]) == len(timing["step_cpu_seconds"]) == 2
    assert min(timing["step_seconds"]) > 0 and min(timing["step_cpu_seconds"]) > 0
    assert timing["mean_step_seconds"] == pytest.approx(sum(timing["step_seconds"]) / 2, rel=1e-12)


def test_realisation_and_option_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="realisation_data"):
        train_sft(build_tiny_model("llama"), tokenizer, examples(), None, config(tmp_path, realisation_every=1))
    pairs = [{"prompt": "p", "chosen": "a b", "rejected": "c d"}] * 4
    with pytest.raises(ValueError, match="defined for SFT"):
        train_dpo(build_tiny_model("llama"), tokenizer, pairs, None, config(tmp_path, realisation_every=1))
    with pytest.raises(ValueError, match="LoRA"):
        train_sft(build_tiny_model("llama"), tokenizer, examples(), None, config(tmp_path, "lora", trainable="scored"))
    with pytest.raises(ConfigError, match="sgd_momentum"):
        config(tmp_path, sgd_momentum=0.9)
    with pytest.raises(ConfigError, match="optimizer"):
        config(tmp_path, optimizer="adam")
    with pytest.raises(ConfigError, match="trainable"):
        config(tmp_path, trainable="head")
