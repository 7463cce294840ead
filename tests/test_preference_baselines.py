"""TI-DPO and SePO, each piece against a slow twin written out by hand on tiny float64 models: TI-DPO's
gradient importance (a per-position autograd loop on each unpadded row), its weights (Gaussian prior
and mixture by explicit loops), the per-position KL, the TDPO2 loss and the triplet term, the seeded
anchor sampler (a cache-free sampler with its own top-k / top-p), a whole TI-DPO training run (a
hand-written loop), and its resume; SePO's token rewards (log-softmax per sequence), their file
(byte-identical when written again, refused for other data), its selection (exact budget, ties), its
loss and a whole SePO run, the oracle subset, and where the pipeline and the stage refuse `sepo`."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import alphatoken.train.loop as loop
from alphatoken.checkpoint import read_checkpoint
from alphatoken.fisher import gumbel_noise, stop_token_ids
from alphatoken.losses import position_kl, selective_mean_losses, tdpo_pair_losses, triplet_losses
from alphatoken.models import build_tiny_model, weights_fingerprint
from alphatoken.policies import PolicyConfig, get_policy, sepo_masks, tidpo_weights
from alphatoken.policy_inputs import embedding_importance, sample_anchor
from alphatoken.stages import sepo as sepo_stage
from alphatoken.stages import train as train_stage
from alphatoken.stages.common import ParamsError
from alphatoken.train import TrainConfig, collate_pairs, encode_dataset, train_dpo
from alphatoken.train.batches import pad_token_id
from alphatoken.train.loop import _epoch_order, _policy_generator
from alphatoken.train.token_rewards import TokenRewardsMismatchError, load_token_rewards, save_token_rewards, token_rewards

from test_resume import kill_after_checkpoint  # noqa: E402  (a run killed right after a checkpoint)

from conftest import BATCHING_TOL

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6
BETA = 0.1


def pairs(n=8, offset=0):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "chosen": f"the sum is {2 * i + 1}.", "rejected": f"it is {i * 3 + 2}!"}
            for i in range(offset, offset + n)]


def config(tmp_path, policy: PolicyConfig, **kw):
    base = dict(output_dir=str(tmp_path), lr=1e-3, micro_batch_size=2, grad_accum_steps=2, max_steps=2, warmup_steps=1,
                weight_decay=0.1, max_grad_norm=1.0, adam_eps=1e-5, policy=policy, progress=False, max_length=64,
                dpo_beta=BETA)
    base.update(kw)
    return TrainConfig(**base)


def max_param_diff(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    with torch.no_grad():
        return max(float((pa[k] - pb[k]).abs().max() / pb[k].abs().max().clamp(min=1e-12)) for k in pa)


def response_positions(feature):
    """Loss positions p (predicting token p+1) of the response, in order."""
    labels = feature["labels"]
    return [p for p in range(len(labels) - 1) if labels[p + 1] != -100]


def row_logps(model, ids):
    """(T-1, V) next-token log-probabilities of one unpadded sequence."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], dim=-1)


# ---------------------------------------------------------------------------------------------
# TI-DPO: importance, weights, KL, losses, anchors


def importance_twin(model, ids):
    """Per position t: L1 norm of d(max logit at the last position)/d(embedding_t), one leaf per position."""
    model.eval()
    table = model.get_input_embeddings()(torch.tensor(ids)).detach()  # (T, d)
    leaves = [table[t].clone().requires_grad_(True) for t in range(len(ids))]
    logits = model(inputs_embeds=torch.stack(leaves)[None]).logits[0]  # (T, V)
    target = max(logits[-1], key=lambda v: float(v.detach()))  # the largest logit at the last position
    values = []
    for leaf in leaves:
        (g,) = torch.autograd.grad(target, leaf, retain_graph=True)
        values.append(float(g.abs().sum()))
    model.train()
    return values


def test_importance_is_the_gradient_of_the_last_max_logit_per_embedding(tokenizer):
    model = build_tiny_model("llama").train()
    features, _ = encode_dataset(tokenizer, pairs(2), 64, preference=True)
    batch = collate_pairs(features, pad_token_id(tokenizer))  # (4, T) right-padded, rows of different lengths
    importance = embedding_importance(model, batch["input_ids"], batch["attention_mask"])  # (4, T)
    assert all(p.grad is None for p in model.parameters()) and model.training  # no gradient left, mode restored
    rows = [f["chosen"] for f in features] + [f["rejected"] for f in features]
    assert len({len(r["input_ids"]) for r in rows}) > 1
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        twin = torch.tensor(importance_twin(model, row["input_ids"]), dtype=torch.float64)
        assert float((importance[b, :n] - twin).abs().max() / twin.abs().max()) < BATCHING_TOL, b
        assert float(importance[b, n:].abs().max() if n < importance.shape[1] else 0.0) == 0.0  # padding


def weights_twin(importance, valid, lam, sigma_div):
    """Explicit loops: importance normalised over the response, a Gaussian over its positions."""
    out = [[0.0] * len(row) for row in valid]
    for b, row in enumerate(valid):
        positions = [p for p, v in enumerate(row) if v]
        n = len(positions)
        if n <= 1:
            continue
        sigma = max(1.0, n / sigma_div)
        prior = [math.exp(-0.5 * ((i - (n - 1) / 2) / sigma) ** 2) for i in range(n)]
        prior = [g / math.fsum(prior) for g in prior]
        scores = [max(0.0, importance[b][p]) for p in positions]
        total = math.fsum(scores)
        mixed = prior if total == 0 else [lam * s / total + (1 - lam) * g for s, g in zip(scores, prior)]
        for i, p in enumerate(positions):
            out[b][p] = n * mixed[i] / math.fsum(mixed)
    return out


def test_tidpo_weights_mix_importance_and_a_gaussian_prior_with_mean_one():
    importance = [[0.0, 1.0, 3.0, 0.5, 2.0, 9.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                  [0.0, 2.0, 2.0, 2.0, 2.0, 2.0]]
    valid = [[False, True, True, True, True, False], [False, True, True, True, False, False],
             [True, False, False, False, False, False], [False, True, True, True, True, True]]
    # row 0 by hand: n = 4, sigma = max(1, 4/4) = 1, prior ~ exp(-(i - 1.5)^2 / 2)
    g = [math.exp(-0.5 * (i - 1.5) ** 2) for i in range(4)]
    g = [x / sum(g) for x in g]
    hand = [4 * (0.7 * s / 6.5 + 0.3 * x) for s, x in zip([1.0, 3.0, 0.5, 2.0], g)]
    for lam, div in ((0.7, 4.0), (0.0, 4.0), (1.0, 8.0), (0.3, 2.5)):
        w = tidpo_weights(torch.tensor(importance, dtype=torch.float64), torch.tensor(valid), lam, div)
        twin = torch.tensor(weights_twin(importance, valid, lam, div), dtype=torch.float64)
        assert float((w - twin).abs().max()) < 1e-12, (lam, div)
        for b, row in enumerate(valid):  # mean 1 over a response of >= 2 tokens, 0 elsewhere
            n = sum(row)
            assert abs(float(w[b].sum()) - (n if n > 1 else 0)) < 1e-12
    w = tidpo_weights(torch.tensor(importance, dtype=torch.float64), torch.tensor(valid), 0.7, 4.0)
    assert max(abs(float(w[0, p + 1]) - hand[p]) for p in range(4)) < 1e-12
    assert float(w[1, 1]) == float(w[1, 3]) and float(w[1, 2]) > float(w[1, 1])  # zero importance: the prior alone
    assert float(w[2].abs().sum()) == 0.0  # one token: weight 0, as the source
    ctx = loop.TokenContext(torch.tensor(valid), torch.zeros(4, 6, dtype=torch.float64), 0.5,
                            importance=torch.tensor(importance, dtype=torch.float64), branch=0)
    assert torch.equal(get_policy("tidpo").weights(ctx, PolicyConfig(name="tidpo")), w)
    with pytest.raises(ValueError, match="ctx.importance"):
        get_policy("tidpo").weights(loop.TokenContext(torch.tensor(valid), torch.zeros(4, 6), 0.5), PolicyConfig(name="tidpo"))


def test_position_kl_is_kl_of_the_reference_from_the_policy_by_hand():
    g = torch.Generator().manual_seed(3)
    logits, ref_logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, 3, 4, -100]])
    kl = position_kl(logits, ref_logits, labels)
    for b in range(2):
        for p in range(3):
            expected = 0.0
            if labels[b, p + 1] != -100:
                z, zr = logits[b, p].tolist(), ref_logits[b, p].tolist()
                lse, lser = math.log(sum(math.exp(v) for v in z)), math.log(sum(math.exp(v) for v in zr))
                expected = sum(math.exp(zr[v] - lser) * ((zr[v] - lser) - (z[v] - lse)) for v in range(5))
            assert abs(float(kl[b, p]) - expected) < 1e-12


def test_tdpo_loss_and_triplet_term_by_hand():
    g = torch.Generator().manual_seed(5)
    rc, rr = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_(True), torch.randn(2, 5, generator=g, dtype=torch.float64)
    wc, wr = torch.rand(2, 5, generator=g, dtype=torch.float64), torch.rand(2, 5, generator=g, dtype=torch.float64)
    kc = torch.rand(2, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    kr = torch.rand(2, 5, generator=g, dtype=torch.float64)
    losses = tdpo_pair_losses(rc, rr, wc, wr, kc, kr, 0.1, 0.5)
    for b in range(2):
        z = sum(float(wc[b, p] * rc[b, p].detach()) - float(wr[b, p] * rr[b, p]) for p in range(5))
        z -= 0.5 * (float(kr[b].sum()) - float(kc[b].sum().detach()))
        assert abs(float(losses[b]) - math.log1p(math.exp(-0.1 * z))) < 1e-12
    losses.sum().backward()
    assert kc.grad is None and float(rc.grad.abs().max()) > 0  # sg(KL of the chosen): no gradient reaches it
    kr.requires_grad_(True)
    tdpo_pair_losses(rc, rr, wc, wr, kc, kr, 0.1, 0.5).sum().backward()
    assert float(kr.grad.abs().min()) > 0  # the rejected KL does carry the gradient

    a = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    av = torch.tensor([[True, True, True, False], [True, False, False, False]])
    c = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 2.0, 3.0, 0.0, 0.0]], dtype=torch.float64)
    cv = torch.tensor([[False, True, True, False, False], [False, True, True, False, False]])
    r = torch.tensor([[9.0, 1.0, 1.0, 1.0, 1.0], [0.0, -1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    rv = torch.tensor([[False, True, True, True, True], [False, True, False, False, False]])
    t = triplet_losses(a, av, c, cv, r, rv, 1e-3)
    # row 0: a = (0.5, -1, 2), c = (0.1, 0.2), r = (1, 1, 1, 1): |a-c|^2 over 2, |a-r|^2 over 3
    d_c0 = (0.5 - 0.1) ** 2 + (-1 - 0.2) ** 2
    d_r0 = (0.5 - 1) ** 2 + (-1 - 1) ** 2 + (2 - 1) ** 2
    d_c1, d_r1 = (1 - 2) ** 2, (1 + 1) ** 2
    assert abs(float(t[0]) - max(0.0, d_c0 - d_r0 + 1e-3)) < 1e-12
    assert abs(float(t[1]) - max(0.0, d_c1 - d_r1 + 1e-3)) < 1e-12


def naive_sample(model, prompt, budget, generator, temperature, top_k, top_p, stop_ids):
    """Cache-free: a full forward per token, top-k then the nucleus by hand, one Gumbel-max draw."""
    model.eval()
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(budget):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # (V,)
            keep = sorted(range(logits.numel()), key=lambda v: -float(logits[v]))[:top_k or logits.numel()]
            scaled = {v: float(logits[v]) / temperature for v in keep}
            top = max(scaled.values())
            total = sum(math.exp(x - top) for x in scaled.values())
            probs = sorted(((math.exp(x - top) / total, v) for v, x in scaled.items()), reverse=True)
            nucleus, mass = [], 0.0
            for p, v in probs:  # the most probable first, until the mass reaches top_p
                nucleus.append((p, v))
                mass += p
                if mass >= top_p:
                    break
            z = sum(p for p, _ in nucleus)
            logq = torch.full((logits.numel(),), float("-inf"))
            for p, v in nucleus:
                logq[v] = math.log(p / z)
            token = int(torch.argmax(logq + gumbel_noise(logits.numel(), generator, "cpu")))
            out.append(token)
            ids.append(token)
            if token in stop_ids:
                break
    model.train()
    return out


def test_anchor_sampler_equals_a_cache_free_sampler_and_repeats_with_its_seed(tokenizer):
    model = build_tiny_model("qwen2")
    prompt = tokenizer.encode("q3: add 3 and 4")
    for top_k, top_p, temperature in ((50, 0.95, 0.8), (0, 1.0, 1.0), (5, 0.5, 1.3)):
        fast = sample_anchor(model, prompt, 12, torch.Generator().manual_seed(11), temperature, top_k, top_p, [])
        slow = naive_sample(model, prompt, 12, torch.Generator().manual_seed(11), temperature, top_k, top_p, [])
        assert fast == slow and len(fast) == 12
    again = sample_anchor(model, prompt, 12, torch.Generator().manual_seed(11), 0.8, 50, 0.95, [])
    other = sample_anchor(model, prompt, 12, torch.Generator().manual_seed(12), 0.8, 50, 0.95, [])
    assert again == sample_anchor(model, prompt, 12, torch.Generator().manual_seed(11), 0.8, 50, 0.95, []) and again != other
    stop = again[3]
    assert sample_anchor(model, prompt, 12, torch.Generator().manual_seed(11), 0.8, 50, 0.95, [stop]) == again[: again.index(stop) + 1]


# ---------------------------------------------------------------------------------------------
# TI-DPO: the training loop


TIDPO = PolicyConfig(name="tidpo", tidpo_anchor_max_new_tokens=4)


def tidpo_twin(tokenizer, n_pairs, steps, pcfg: PolicyConfig, lr, seed=0):
    """A hand-written TI-DPO loop: each sequence alone (no padding), the loss of every pair written out;
    no warm-up, then cosine to 0."""
    model = build_tiny_model("llama")
    reference = copy.deepcopy(model).eval()
    features, _ = encode_dataset(tokenizer, pairs(n_pairs), 64, preference=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = _epoch_order(len(features), seed, 0)
    stop = stop_token_ids(model, tokenizer)
    for step in range(steps):
        total = 0.0
        for micro in range(2):
            chunk = [features[i] for i in order[step * 4 + micro * 2 : step * 4 + micro * 2 + 2]]
            generator = _policy_generator(seed, step, micro, 2)
            for pair in chunk:
                parts = {}
                for branch in ("chosen", "rejected"):
                    seq = pair[branch]
                    positions = response_positions(seq)
                    imp = importance_twin(model, seq["input_ids"])
                    valid = [p in positions for p in range(len(seq["input_ids"]) - 1)]
                    w = weights_twin([[imp[p + 1] for p in range(len(valid))]], [valid], pcfg.tidpo_lambda, pcfg.tidpo_prior_sigma_div)[0]
                    logp = row_logps(model, seq["input_ids"])
                    with torch.no_grad():
                        ref = row_logps(reference, seq["input_ids"])
                    ratios = [logp[p, seq["input_ids"][p + 1]] - ref[p, seq["input_ids"][p + 1]] for p in positions]
                    kl = sum((ref[p].exp() * (ref[p] - logp[p])).sum() for p in positions)
                    parts[branch] = (sum(w[p] * r for p, r in zip(positions, ratios)), kl, ratios)
                (sc, kc, rc), (sr, kr, rr) = parts["chosen"], parts["rejected"]
                z = sc - sr - pcfg.tidpo_alpha * (kr - kc.detach())
                loss = -F.logsigmoid(BETA * z)
                # the anchor: sampled from the policy for the prompt, its per-token log-ratio
                labels = pair["chosen"]["labels"]
                prompt = pair["chosen"]["input_ids"][: next(t for t, y in enumerate(labels) if y != -100)]
                anchor = sample_anchor(model, prompt, min(pcfg.tidpo_anchor_max_new_tokens, 64 - len(prompt)), generator,
                                       0.8, 50, 0.95, stop)
                logp = row_logps(model, prompt + anchor)
                with torch.no_grad():
                    ref = row_logps(reference, prompt + anchor)
                ra = [logp[len(prompt) - 1 + i, y] - ref[len(prompt) - 1 + i, y] for i, y in enumerate(anchor)]
                to_c = sum((a - c) ** 2 for a, c in zip(ra, rc))
                to_r = sum((a - r) ** 2 for a, r in zip(ra, rr))
                loss = loss + pcfg.tidpo_gamma * torch.relu(to_c - to_r + pcfg.tidpo_triplet_margin)
                total = total + loss
        (total / 4).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    return model


def test_tidpo_run_equals_a_hand_written_loop(tmp_path, tokenizer):
    """Three steps without warm-up: at step 0 the policy is the reference, where the KL and the triplet
    term have zero gradient; the later steps test them. A large triplet margin keeps the hinge open
    (with the default 1e-3 it closes as soon as the anchor sits nearer the rejected response)."""
    pcfg = dataclasses.replace(TIDPO, tidpo_triplet_margin=5.0)
    kw = dict(lr=1e-2, warmup_steps=0, max_steps=3)
    result = train_dpo(build_tiny_model("llama"), tokenizer, pairs(12), None, config(tmp_path, pcfg, **kw))
    assert result.metrics["nonfinite_steps"] == 0 and result.metrics["steps"] == 3
    assert abs(result.metrics["mean_kept_fraction"] - 1.0) < 1e-9  # mean-1 weights
    twin = tidpo_twin(tokenizer, 12, 3, pcfg, lr=1e-2)
    assert weights_fingerprint(result.model) != weights_fingerprint(build_tiny_model("llama"))
    assert max_param_diff(result.model, twin) < TOL
    # without the triplet term (gamma 0) the run differs: the anchors do take part
    plain = train_dpo(build_tiny_model("llama"), tokenizer, pairs(12), None,
                      config(tmp_path / "g0", dataclasses.replace(pcfg, tidpo_gamma=0.0), **kw))
    assert max_param_diff(plain.model, result.model) > 1e-6


def test_tidpo_resume_is_bit_identical(tmp_path, tokenizer, monkeypatch):
    """The anchors are drawn from generators seeded by (seed, step, micro-batch): a run killed after
    its step-1 checkpoint and rerun ends with the weights of an uninterrupted run, bit for bit."""
    cfg = lambda out: config(out, TIDPO, max_steps=3, checkpoint_every=1)
    straight = train_dpo(build_tiny_model("llama"), tokenizer, pairs(12), None, cfg(tmp_path / "straight")).model.state_dict()
    with kill_after_checkpoint(monkeypatch, 1):
        train_dpo(build_tiny_model("llama"), tokenizer, pairs(12), None, cfg(tmp_path / "run"))
    assert read_checkpoint(tmp_path / "run" / "checkpoint")["step"] == 1
    resumed = train_dpo(build_tiny_model("llama"), tokenizer, pairs(12), None, cfg(tmp_path / "run"))
    assert resumed.start_step == 1
    state = resumed.model.state_dict()
    assert all(torch.equal(state[k], straight[k]) for k in straight)


def test_preference_policies_are_refused_by_the_sft_loop(tmp_path, tokenizer):
    from alphatoken.train import train_sft

    sft = [{"prompt": "q", "response": "an answer"}] * 4
    for name in ("tidpo", "sepo"):
        with pytest.raises(ValueError, match="preference-optimisation policy"):
            train_sft(build_tiny_model("llama"), tokenizer, sft, None, config(tmp_path / name, PolicyConfig(name=name)))


# ---------------------------------------------------------------------------------------------
# SePO: token rewards, selection, loss, run


def rewards_twin(oracle, reference, feature):
    out = {}
    for branch in ("chosen", "rejected"):
        ids = feature[branch]["input_ids"]
        with torch.no_grad():
            lo, lr = row_logps(oracle, ids), row_logps(reference, ids)
        row = torch.zeros(len(ids) - 1, dtype=torch.float64)
        for p in response_positions(feature[branch]):
            row[p] = lo[p, ids[p + 1]] - lr[p, ids[p + 1]]
        out[branch] = row
    return out


def test_token_rewards_and_their_file(tmp_path, tokenizer):
    oracle, reference = build_tiny_model("llama", seed=1), build_tiny_model("llama")
    features, _ = encode_dataset(tokenizer, pairs(5), 64, preference=True)
    rewards = token_rewards(oracle, reference, features, pad_token_id(tokenizer), "cpu", 2)
    for row, feature in zip(rewards, features):
        twin = rewards_twin(oracle, reference, feature)
        for b in ("chosen", "rejected"):
            assert row[b].shape == twin[b].shape
            assert float((row[b] - twin[b]).abs().max()) < BATCHING_TOL
    path = save_token_rewards(tmp_path / "r.safetensors", rewards, features, oracle, reference, 64, 2)
    first = path.read_bytes()
    again = token_rewards(oracle, reference, features, pad_token_id(tokenizer), "cpu", 2)  # a second computation
    save_token_rewards(tmp_path / "r.safetensors", again, features, oracle, reference, 64, 2)
    assert path.read_bytes() == first  # same bytes
    loaded = load_token_rewards(path, features)
    assert all(torch.equal(a[b], r[b]) for a, r in zip(loaded, rewards) for b in ("chosen", "rejected"))
    other, _ = encode_dataset(tokenizer, pairs(5, offset=1), 64, preference=True)
    with pytest.raises(TokenRewardsMismatchError, match="train_sha256"):
        load_token_rewards(path, other)


def masks_twin(rewards, valid, ratio, top, rounding):
    out = []
    for row_r, row_v in zip(rewards, valid):
        positions = [p for p, v in enumerate(row_v) if v]
        n = len(positions)
        k = math.ceil(round(ratio * n, 9)) if rounding == "ceil" else int(round(ratio * n, 9))
        ranked = sorted(positions, key=lambda p: (-row_r[p] if top else row_r[p], p))
        kept = set(ranked[:k])
        out.append([p in kept for p in range(len(row_v))])
    return out


def test_sepo_selection_keeps_ceil_k_n_per_response_top_chosen_bottom_rejected():
    rewards = [[0.0, 0.5, -1.0, 0.5, 2.0, 0.1, -3.0, 0.0], [9.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
               [0.0, 0.0, 0.0, 0.0, 0.0, 4.0, -4.0, 1.0]]
    valid = [[False, True, True, True, True, True, True, False], [False, True, True, True, False, False, False, False],
             [False, False, False, False, False, True, True, True]]
    for ratio in (0.3, 0.5, 1.0, 0.1):
        for rounding in ("ceil", "floor"):
            for top in (True, False):
                m = sepo_masks(torch.tensor(rewards), torch.tensor(valid), ratio, top, rounding)
                assert m.tolist() == masks_twin(rewards, valid, ratio, top, rounding), (ratio, rounding, top)
                for row, row_v in zip(m.tolist(), valid):
                    n = sum(row_v)
                    assert sum(row) == (math.ceil(round(ratio * n, 9)) if rounding == "ceil" else int(round(ratio * n, 9)))
    m = sepo_masks(torch.tensor(rewards), torch.tensor(valid), 0.3, True)
    assert m[0].nonzero().flatten().tolist() == [1, 4]  # ceil(0.3 * 6) = 2: 2.0, then 0.5 at the earlier position
    assert m[1].nonzero().flatten().tolist() == [1]  # ties: the earlier position; 9.0 is off the response
    bottom = sepo_masks(torch.tensor(rewards), torch.tensor(valid), 0.3, False)
    assert bottom[0].nonzero().flatten().tolist() == [2, 6]
    policy = get_policy("sepo")
    ctx = loop.TokenContext(torch.tensor(valid), torch.zeros(3, 8), 0.5, precomputed=torch.tensor(rewards), branch=1)
    assert torch.equal(policy.weights(ctx, PolicyConfig(name="sepo", sepo_ratio=None)).bool(),
                       sepo_masks(torch.tensor(rewards), torch.tensor(valid), 0.5, False))  # null: the matched rho
    with pytest.raises(ValueError, match="ctx.branch"):
        policy.weights(loop.TokenContext(torch.tensor(valid), torch.zeros(3, 8), 0.5, precomputed=torch.tensor(rewards)),
                       PolicyConfig(name="sepo"))


def test_sepo_loss_by_hand():
    lc = torch.tensor([[0.0, 1.0, 2.0, 0.5], [0.0, 0.3, 0.0, 0.0]], dtype=torch.float64)
    lr = torch.tensor([[0.0, 0.2, 0.4, 0.0], [0.0, 1.0, 3.0, 0.0]], dtype=torch.float64)
    mc = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.float64)
    mr = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    losses = selective_mean_losses(lc, lr, mc, mr)
    z0 = -(1.0 + 0.5) / 2 - (-(0.2 + 0.4) / 2)
    z1 = -0.3 - 0.0  # an empty selection: mean 0
    assert abs(float(losses[0]) - math.log1p(math.exp(-z0))) < 1e-12
    assert abs(float(losses[1]) - math.log1p(math.exp(-z1))) < 1e-12


def sepo_twin(tokenizer, features, rewards, steps, ratio, seed=0):
    model = build_tiny_model("llama")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, eps=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 1 if s < 1 else 0.5 * (1 + math.cos(math.pi * (s - 1) / (steps - 1))))
    order = _epoch_order(len(features), seed, 0)
    for step in range(steps):
        total = 0.0
        for i in order[step * 4 : (step + 1) * 4]:
            means = []
            for branch, top in (("chosen", True), ("rejected", False)):
                seq = pair_seq = features[i][branch]
                positions = response_positions(pair_seq)
                k = math.ceil(round(ratio * len(positions), 9))
                r = rewards[i][branch]
                kept = sorted(positions, key=lambda p: (-float(r[p]) if top else float(r[p]), p))[:k]
                logp = row_logps(model, seq["input_ids"])
                means.append(sum(logp[p, seq["input_ids"][p + 1]] for p in kept) / len(kept))
            total = total - F.logsigmoid(means[0] - means[1])
        (total / 4).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    return model


def test_sepo_run_equals_a_hand_written_loop(tmp_path, tokenizer):
    oracle, reference = build_tiny_model("llama", seed=1), build_tiny_model("llama")
    features, _ = encode_dataset(tokenizer, pairs(8), 64, preference=True)
    rewards = token_rewards(oracle, reference, features, pad_token_id(tokenizer), "cpu", 2)
    path = save_token_rewards(tmp_path / "rewards.safetensors", rewards, features, oracle, reference, 64, 2)
    result = train_dpo(build_tiny_model("llama"), tokenizer, pairs(8), None, config(tmp_path / "run", PolicyConfig(name="sepo")),
                       token_rewards=path)
    assert result.metrics["nonfinite_steps"] == 0 and 0.25 < result.metrics["mean_kept_fraction"] < 0.6
    twin = sepo_twin(tokenizer, features, rewards, 2, 0.3)
    assert max_param_diff(result.model, twin) < TOL
    with pytest.raises(ValueError, match="pass token_rewards"):
        train_dpo(build_tiny_model("llama"), tokenizer, pairs(8), None, config(tmp_path / "none", PolicyConfig(name="sepo")))
    with pytest.raises(ValueError, match="does not use per-token rewards"):
        train_dpo(build_tiny_model("llama"), tokenizer, pairs(8), None, config(tmp_path / "full", PolicyConfig(name="full")),
                  token_rewards=path)
    with pytest.raises(TokenRewardsMismatchError):
        train_dpo(build_tiny_model("llama"), tokenizer, pairs(8, offset=3), None,
                  config(tmp_path / "other", PolicyConfig(name="sepo")), token_rewards=path)


def test_oracle_subset_is_a_seeded_ceil_fraction_copied_line_for_line(tmp_path):
    lines = [f'{{"chosen": "c{i}", "id": "{i}", "prompt": [{{"content": "p{i}", "role": "user"}}], "rejected": "r{i}", '
             f'"source": "t"}}\n' for i in range(10)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(lines))
    indices = sepo_stage.subset_indices(10, 0.35, 4)
    assert len(indices) == 4 and indices == sorted(indices) and indices == sepo_stage.subset_indices(10, 0.35, 4)
    assert indices != sepo_stage.subset_indices(10, 0.35, 5) or indices != sepo_stage.subset_indices(10, 0.35, 6)
    assert sepo_stage.subset_indices(10, 1.0, 0) == list(range(10))
    kept, total = sepo_stage.write_subset(train, tmp_path / "sub.jsonl", 0.35, 4)
    assert (kept, total) == (4, 10)
    assert (tmp_path / "sub.jsonl").read_text() == "".join(lines[i] for i in indices)


def test_sepo_in_dpo_methods_is_refused_with_where_it_is_configured(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("dpo:\n  methods: [full, sepo]\n")
    with pytest.raises(ParamsError, match=r"o.yaml:2: dpo.methods: 'sepo' is not a run of the dpo matrix.*sepo.seeds"):
        train_stage.read_train_config([REPO / "params.yaml", overlay], "dpo", "valuation", "sepo", 0, "out")
    # the SePO rules' own run (not listed in dpo.methods) builds
    _, cfg = train_stage.read_train_config([REPO / "params.yaml"], "dpo", "valuation", "sepo", 0, "out")
    assert cfg.policy.name == "sepo" and cfg.policy.sepo_ratio == 0.3


# ---------------------------------------------------------------------------------------------
# The pipeline: SePO's rules in both front ends


def test_the_dpo_experiment_schedules_sepo_and_dvc_declares_its_stages(tmp_path):
    from test_pipeline_dag import copy_pipeline, snakemake

    dry = snakemake(REPO, "-n", "--configfile", "configs/experiments/dpo.yaml")
    output = dry.stdout + dry.stderr
    assert dry.returncode == 0, output[-3000:]
    for rule in ("sepo_subset", "sepo_oracle", "sepo_scores", "train_sepo", "evaluate_sepo"):
        assert re.search(rf"^{rule}\s+\d+$", output, re.M), rule
    assert re.search(r"^train_sepo\s+2$", output, re.M) and re.search(r"^train_dpo\s+12$", output, re.M)

    repo = copy_pipeline(tmp_path / "repo")
    # both routes: with `routes: [dpo]` alone the diagnostics rules (DVC stages too) would schedule one
    # SFT run only, which is not the train matrix
    overlay = repo / "configs" / "dpo_both_routes.yaml"
    overlay.write_text((REPO / "configs/experiments/dpo.yaml").read_text().replace("routes: [dpo]", "routes: [sft, dpo]"))
    made = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use", str(overlay),
                           "--root", str(repo)], capture_output=True, text=True, timeout=600, cwd=repo)
    assert made.returncode == 0, made.stdout + made.stderr
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert stages["train_sepo"]["matrix"] == {"sepo_seed": "${sepo.seeds}"}
    assert "--method sepo --seed ${item.sepo_seed}" in stages["train_sepo"]["cmd"]
    assert "--token-rewards results/dpo/sepo/token_rewards.safetensors" in stages["train_sepo"]["cmd"]
    assert stages["train_sepo"]["outs"] == [{"results/dpo/sepo/train/${item.sepo_seed}": {"persist": True}}]
    assert {"sepo.oracle_fraction", "sepo.oracle_seed"} == set(stages["sepo_subset"]["params"])
    assert "--train-data results/dpo/sepo/oracle_train.jsonl" in stages["sepo_oracle"]["cmd"]
    report = stages["report_dpo"]
    assert "--extra-run sepo 1 results/dpo/eval/sepo/1 results/dpo/sepo/train/1" in report["cmd"]
    assert {"results/dpo/eval/sepo", "results/dpo/sepo/train"} <= set(report["deps"])
    assert "tidpo" in yaml.safe_load((repo / "params.yaml").read_text())["dpo"]["methods"]

    overlay = tmp_path / "misplaced.yaml"
    overlay.write_text("routes: [dpo]\ndpo:\n  methods: [full, sepo]\n")
    refused = snakemake(REPO, "-n", "--configfile", str(overlay))
    assert refused.returncode != 0
    assert "dpo.methods: 'sepo' is not a run of the dpo matrix" in refused.stdout + refused.stderr
