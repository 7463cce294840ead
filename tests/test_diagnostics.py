"""The App. D diagnostics against slow twins: D.1's oracle and proxy scores against per-token autograd
gradients dotted with brute-force directions (tests/bruteforce.py), its statistics against scipy and
hand-computed values, the oracle set's disjointness from what the evaluation really reads; D.2's
(alpha, d) pairs against an explicit loop over an ordinary eager forward. Tiny float64 models."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import scipy.stats
import torch

from alphatoken.blocks import scored_linears
from alphatoken.data import ChatExample, collate
from alphatoken.eval import attention_deviation as ad
from alphatoken.eval import proxy_oracle as po
from alphatoken.eval.diagnostics import DiagnosticsConfig, draw_training_examples
from alphatoken.eval.likelihood import encode_continuation
from alphatoken.models import build_tiny_model, byte_tokenizer
from alphatoken.valuation import ValuationConfig
from bruteforce import bruteforce_scores, proxy_direction, validation_gradient

LAST_K, WINDOW = 2, 3


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def training_batch() -> dict:
    """Two examples of different lengths (the shorter right-padded), prompts unlabelled."""
    features = [{"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "labels": [-100] * 4 + [9, 10, 11, 12, 13, 14]},
                {"input_ids": [20, 21, 22, 23, 24, 25, 26], "labels": [-100] * 3 + [23, 24, 25, 26]}]
    return collate(features, 0)


def oracle_batch(tokenizer) -> dict:
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("The sky is", " blue today"), ("A. x\nB. y\nAnswer:", " B")]
    return collate([encode_continuation(tokenizer, c, x, 64)[0] for c, x in pairs], 0)


def drifted(arch: str):
    """(model W, reference scored weights, Fisher): W = W_ref + noise, so P = F (.) (W - W_ref) != 0."""
    reference = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")
    model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")  # as tests/test_valuation.py
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    linears = scored_linears(model, LAST_K)
    ref_params = dict(reference.named_parameters())
    fisher = {n: torch.rand(lin.weight.shape, generator=gen, dtype=torch.float64) for n, lin in linears.items()}
    return model, {n: ref_params[n].detach() for n in linears}, fisher


# ---------------------------------------------------------------------------------------------
# D.1: the two scores


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("signal", ["self", "total"])
def test_proxy_and_oracle_scores_match_per_token_autograd(arch, signal):
    """oracle(t) = <g_t, grad J_ret> and proxy(t) = <g_t, F (.) (W - W_ref)> with g_t token t's
    direct + value-path gradient, J_ret the oracle batch's mean token NLL: every token to 1e-6."""
    tokenizer = byte_tokenizer()
    model, reference, fisher = drifted(arch)
    val, batch = oracle_batch(tokenizer), training_batch()
    cfg = ValuationConfig(last_k=LAST_K, window=WINDOW, lam=1.5, signal=signal, use_prx_cau=False)  # switches ignored
    pairs = po.proxy_oracle_scores(model, cfg, fisher, reference, val, [{k: v[:1] for k, v in batch.items()},
                                                                        {k: v[1:] for k, v in batch.items()}])
    brute = bruteforce_scores(model, batch, last_k=LAST_K, window=WINDOW, lam=1.5, signal=signal,
                              target=validation_gradient(model, LAST_K, val),
                              proxy=proxy_direction(model, LAST_K, fisher, reference))
    expected = batch["labels"][:, 1:] != -100
    assert len(pairs.proxy) == int(expected.sum()) == 10  # every response token, nothing else
    # the second batch's example 0 is example 1 of the draw, at its own positions
    at = (torch.as_tensor(pairs.example), torch.as_tensor(pairs.position))
    assert np.array_equal(pairs.token, batch["input_ids"][at].numpy())
    oracle = (brute["tgt_dir"] + brute["tgt_cau"])[at].numpy()
    proxy = (brute["prx_dir"] + brute["prx_cau"])[at].numpy()
    assert brute["prx_cau"].abs().max() > 0 and brute["tgt_cau"].abs().max() > 0  # the causal path counts
    assert rel_err(pairs.oracle, oracle) <= 1e-6
    assert rel_err(pairs.proxy, proxy) <= 1e-6


def test_proxy_is_zero_on_the_reference_and_the_summary_says_why():
    tokenizer = byte_tokenizer()
    model = build_tiny_model("llama", dtype=torch.float64)
    linears = scored_linears(model, LAST_K)
    params = dict(model.named_parameters())
    reference = {n: params[n].detach().clone() for n in linears}
    fisher = {n: torch.ones_like(lin.weight) for n, lin in linears.items()}
    pairs = po.proxy_oracle_scores(model, ValuationConfig(last_k=LAST_K, window=WINDOW), fisher, reference,
                                   oracle_batch(tokenizer), [training_batch()])
    assert np.all(pairs.proxy == 0) and np.abs(pairs.oracle).max() > 0
    with pytest.raises(ValueError, match="checkpoint equals the reference"):
        po.compare_scores(pairs, 0.5, DiagnosticsConfig(n_boot=100, random_draws=5))


def test_mean_token_nll_is_the_validation_objective():
    model = build_tiny_model("qwen2", dtype=torch.float64)
    val = oracle_batch(byte_tokenizer())
    with torch.no_grad():
        logits = model(input_ids=val["input_ids"], attention_mask=val["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), val["labels"][:, 1:].flatten())
    assert abs(po.mean_token_nll(model, val, chunk=2) - float(expected)) < 1e-10


# ---------------------------------------------------------------------------------------------
# D.1: statistics


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50).round(1)  # rounded: many ties
    y = 0.5 * x + rng.normal(size=50).round(1)
    assert abs(po.pearson(x, y) - scipy.stats.pearsonr(x, y).statistic) < 1e-12
    assert abs(po.spearman(x, y) - scipy.stats.spearmanr(x, y).statistic) < 1e-12
    assert np.array_equal(po.average_ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert math.isnan(po.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_top_overlap_by_hand():
    a = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert po.top_overlap(a, a[::-1].copy(), 0.5) == 0.0  # tops {0,1,2} and {3,4,5}
    assert po.top_overlap(a, np.array([5.0, 3.0, 4.0, 0.0, 1.0, 2.0]), 0.5) == 1.0
    assert po.top_overlap(a, np.array([0.0, 5.0, 4.0, 3.0, 2.0, 1.0]), 0.5) == pytest.approx(2 / 3)  # {1,2,3}
    assert list(po.top_k(np.array([1.0, 1.0, 1.0, 0.0]), 2)) == [0, 1]  # ties: the earlier token first
    assert po.top_overlap(np.arange(5.0), np.arange(5.0), 0.3) == 1.0  # k = ceil(0.3 * 5) = 2
    assert list(po.top_k(np.arange(5.0), math.ceil(0.3 * 5))) == [4, 3]


def test_random_overlaps_replay_and_expectation():
    reference = np.arange(10.0)  # top 3 (rho 0.3): tokens 9, 8, 7
    draws = po.random_overlaps(reference, 0.3, 4, np.random.default_rng(7))
    replay = np.random.default_rng(7)
    expected = [len({7, 8, 9} & set(replay.choice(10, 3, replace=False).tolist())) / 3 for _ in range(4)]
    assert np.array_equal(draws, expected)
    many = po.random_overlaps(np.arange(40.0), 0.25, 4000, np.random.default_rng(0))
    assert abs(many.mean() - 10 / 40) < 0.01  # E = k / N


def test_bootstrap_resamples_examples_and_pools_their_tokens():
    example = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    x = np.array([1.0, 2.0, 3.0, 1.0, 0.0, 5.0, 4.0, 6.0])
    y = np.array([1.5, 1.0, 3.5, 0.0, 1.0, 6.0, 3.0, 5.0])
    got = po.bootstrap_correlations(example, x, y, 50, np.random.default_rng(3))
    replay = np.random.default_rng(3)
    for r in range(50):
        pick = np.concatenate([np.flatnonzero(example == e) for e in replay.integers(0, 3, 3)])
        p = scipy.stats.pearsonr(x[pick], y[pick]).statistic if np.ptp(x[pick]) and np.ptp(y[pick]) else math.nan
        assert (math.isnan(p) and math.isnan(got["pearson"][r])) or abs(got["pearson"][r] - p) < 1e-12
        if not math.isnan(p):
            assert abs(got["spearman"][r] - scipy.stats.spearmanr(x[pick], y[pick]).statistic) < 1e-12


def test_compare_scores_summary():
    rng = np.random.default_rng(0)
    example = np.repeat(np.arange(10), 8)
    oracle = rng.normal(size=80)
    pairs = po.TokenPairs(example=example, position=np.tile(np.arange(8), 10), token=np.zeros(80, int),
                          proxy=oracle + 0.3 * rng.normal(size=80), oracle=oracle)
    cfg = DiagnosticsConfig(n_boot=300, random_draws=50)
    s = po.compare_scores(pairs, 0.5, cfg)
    assert s["tokens"] == 80 and s["examples"] == 10 and s["k"] == 40
    assert s["pearson"]["value"] == pytest.approx(scipy.stats.pearsonr(pairs.proxy, oracle).statistic, abs=1e-12)
    lo, hi = s["pearson"]["ci"]
    assert lo < s["pearson"]["value"] < hi and 0.8 < lo
    assert s["top_overlap"]["random_expected"] == 0.5
    assert s["top_overlap"]["proxy_vs_oracle"] == po.top_overlap(pairs.proxy, oracle, 0.5) > 0.7
    assert [c["rho"] for c in s["overlap_curve"]] == list(po.RHO_GRID)
    assert po.compare_scores(pairs, 0.5, cfg) == s  # seeded
    json.dumps(s)


# ---------------------------------------------------------------------------------------------
# D.1: the oracle set


def test_evaluation_ids_are_the_documents_the_evaluation_reads(tmp_path):
    """The exclusion is what `build_real_tasks` writes and `retention_docs` scores, exactly; the oracle
    set avoids it, and comes from validation splits where the evaluation reads test."""
    from alphatoken.eval.benchmarks import load_benchmark
    from alphatoken.eval.harness import build_real_tasks
    from alphatoken.eval.suite import retention_docs

    limits = {"arc_challenge": 2, "hellaswag": 5, "mmlu": 2, "gsm8k": 3}
    out = build_real_tasks(tmp_path / "tasks", max_docs=limits)

    def ids(name):
        return {json.loads(line)["id"] for line in (out / name).read_text().splitlines() if line.strip()}

    settings = {"suite": "real", "limit": 6, "task_limits": {"hellaswag": 5, "gsm8k": 3}, "drift_docs": 4}
    read = {name: po.evaluation_document_ids(name, load_benchmark(name), "real", 6, settings["task_limits"], 4)
            for name in ("hellaswag", "gsm8k")}
    drift = {d["id"] for d in retention_docs(["hellaswag", "gsm8k"], 4)}
    assert read["hellaswag"] == ids("hellaswag.jsonl") | {i for i in drift if i.startswith("hellaswag/")}
    assert read["gsm8k"] == ids("gsm8k.jsonl") | ids("gsm8k_fewshot.jsonl") | {i for i in drift if i.startswith("gsm8k/")}
    assert len(read["gsm8k"]) == 50 + 3 + 4
    oracle = po.oracle_documents(byte_tokenizer(), 8, 0, 4096, settings)
    assert len(oracle.ids) == len(set(oracle.ids)) == 32
    assert not set(oracle.ids) & (read["hellaswag"] | read["gsm8k"])
    assert {i.split("/")[1] for i in oracle.ids if i.startswith(("arc_challenge/", "mmlu/"))} == {"validation"}
    assert oracle.benchmarks["gsm8k"]["excluded_as_evaluated"] == 57
    for feature in oracle.features:  # labels on the gold continuation only
        labelled = [t for t in feature["labels"] if t != -100]
        assert labelled and feature["input_ids"][-len(labelled):] == labelled
    assert po.oracle_documents(byte_tokenizer(), 8, 0, 4096, settings).ids == oracle.ids  # seeded
    assert po.oracle_documents(byte_tokenizer(), 8, 1, 4096, settings).ids != oracle.ids


def test_oracle_set_refuses_an_evaluation_reading_a_whole_split():
    with pytest.raises(ValueError, match=r"hellaswag validation has 0 usable documents.*eval.limit"):
        po.oracle_documents(byte_tokenizer(), 8, 0, 4096, {"suite": "real", "limit": None, "drift_docs": 0},
                            benchmarks=("hellaswag",))


def test_training_draw_is_seeded_counts_truncations_and_needs_enough_examples():
    tokenizer = byte_tokenizer()
    examples = [ChatExample(f"e{i}", [{"role": "user", "content": "q" * (5 + i)},
                                      {"role": "assistant", "content": "a" * (3 + 20 * (i % 2))}], "test")
                for i in range(6)]
    draw = draw_training_examples(examples, tokenizer, 4, 48, seed=0)
    order = list(range(6))
    random.Random(0).shuffle(order)
    assert draw.ids == [f"e{i}" for i in order[:4]]
    assert draw.counts.get("truncated", 0) == sum(order[j] % 2 for j in range(4))
    assert all(len(f["input_ids"]) <= 48 for f in draw.features)
    with pytest.raises(ValueError, match="only 6 of the 6 .* 7 needed"):
        draw_training_examples(examples, tokenizer, 7, 48, seed=0)


# ---------------------------------------------------------------------------------------------
# D.2


def bruteforce_pairs(model, batch: dict, last_k: int, window: int) -> dict:
    """{(block, example, head, t, k): (alpha, d)} by an explicit loop over an ordinary eager forward."""
    from alphatoken.blocks import scored_blocks
    from alphatoken.valuation.signals import attention_module

    blocks = scored_blocks(model, last_k)
    values, contexts, handles = {}, {}, []
    for idx, block in blocks:
        attn = attention_module(block)
        handles.append(attn.v_proj.register_forward_hook(lambda m, a, out, idx=idx: values.setdefault(idx, out.detach())))
        handles.append(attn.o_proj.register_forward_pre_hook(lambda m, a, idx=idx: contexts.setdefault(idx, a[0].detach())))
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    labels, mask = batch["labels"], batch["attention_mask"]
    B, T = labels.shape
    found = {}
    for idx, _ in blocks:
        probs = out.attentions[idx]  # (B, H, T, T)
        H = probs.shape[1]
        hd = contexts[idx].shape[-1] // H
        n_kv = values[idx].shape[-1] // hd
        for b in range(B):
            for h in range(H):
                g = h // (H // n_kv)
                for t in range(T - 1):
                    if labels[b, t + 1] == -100:
                        continue
                    for k in range(t + 1, min(t + window, T - 1) + 1):
                        if mask[b, k] == 0:
                            continue
                        v = values[idx][b, t, g * hd:(g + 1) * hd]
                        o = contexts[idx][b, k, h * hd:(h + 1) * hd]
                        found[(idx, b, h, t, k)] = (float(probs[b, h, k, t]), float(torch.linalg.norm(v - o)) / math.sqrt(hd))
    return found


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_attention_pairs_match_an_explicit_loop(arch):
    """Every pair, its alpha and its d, against the loop (grouped-query: 4 heads on 2 kv heads;
    Gemma3: sliding-window layers), on a padded batch."""
    model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="eager")
    batch = training_batch()
    brute = bruteforce_pairs(model, batch, LAST_K, WINDOW)
    fast = ad.attention_pairs(model, batch, LAST_K, WINDOW)
    keys = list(zip(fast.block.tolist(), fast.example.tolist(), fast.head.tolist(), fast.key.tolist(), fast.query.tolist()))
    assert len(keys) == len(set(keys)) and set(keys) == set(brute)
    alpha = np.array([brute[k][0] for k in keys])
    dev = np.array([brute[k][1] for k in keys])
    assert rel_err(fast.alpha, alpha) <= 1e-6 and rel_err(fast.deviation, dev) <= 1e-6
    assert fast.alpha.min() >= 0 and fast.alpha.max() <= 1 and fast.deviation.min() > 0
    sdpa = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")  # the model's own kernel is restored
    again = ad.attention_pairs(sdpa, batch, LAST_K, WINDOW)
    assert rel_err(again.alpha, fast.alpha) <= 1e-6 and sdpa.config._attn_implementation == "sdpa"


def test_pair_summary_by_hand():
    pairs = ad.AttentionPairs(alpha=np.array([0.1, 0.5, 0.9, 0.2]), deviation=np.array([0.5, 0.1, 1.0, 0.2]),
                              block=np.array([2, 2, 3, 3]), example=np.zeros(4, int), head=np.zeros(4, int),
                              key=np.zeros(4, int), query=np.ones(4, int))
    s = ad.summarize_pairs(pairs, (0.05, 0.1))
    assert s["pairs"] == 4 and s["pairs_per_block"] == {"2": 2, "3": 2}
    assert s["fraction_below"] == {"0.05": 0.25, "0.1": 0.75}  # alpha*d = 0.05, 0.05, 0.9, 0.04
    assert s["alpha_times_d"]["max"] == pytest.approx(0.9) and s["alpha"]["q50"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="no causal-window pair"):
        ad.summarize_pairs(ad.concat_pairs([ad.AttentionPairs(*[np.zeros(0)] * 7)]), (0.1,))
