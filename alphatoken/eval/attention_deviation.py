"""App. D.2: how much the value-propagation path leaves out, pair by pair.

The causal term of a token (METHOD.md, Eq. 9) propagates its value through attention only: it
keeps d o_k / d v_t = alpha_{t->k} and drops the attention-score path, whose size for a pair is
governed by alpha_{t->k} (v_t - o_k) (the derivative of o_k = sum_j alpha_{j->k} v_j through the
softmax). For every scored block (the last K), head h and causal-window pair of a batch this module
collects

    alpha = A_h[k, t]                           (the valuation's attention probabilities)
    d     = || v_{t, g(h)} - o_{k, h} ||_2 / sqrt(d_h)

with v_{t,g} the value vector of token position t in key/value group g(h) of head h (the output of
`v_proj`; grouped-query attention: head h reads group h // (H / H_kv)), o_{k,h} head h's attention
output at position k (the input of `o_proj`, per head) and d_h the head dimension. The pairs are
exactly the terms of Eq. 9 for the batch's scored tokens: t a loss position (labels[t + 1] != -100,
"token t" in the paper's indexing), k = t + 1 .. min(t + W, T - 1) a non-padding position, W the
valuation's window.

Naive equivalent (what the test compares against, on an ordinary eager forward with
`output_attentions=True` and hooks on v_proj / o_proj):

    for block, b, h, t, k in pairs:
        alpha = attentions[block][b, h, k, t]
        d = norm(v[block][b, t, h // n_rep] - o[block][b, k, h]) / sqrt(hd)

Outputs (`run_attention_deviation`): summary.json (counts, quantiles of alpha, d and alpha * d, the
fraction of pairs with alpha * d below each risk level) and attention.png (2-D density of (alpha, d)
on a log colour scale, marginal densities on top and right, dashed curves alpha * d = level).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alphatoken.hooks import claim, release
from alphatoken.blocks import scored_blocks
from alphatoken.eval.diagnostics import DiagnosticsConfig, batches, device, draw_training_examples
from alphatoken.models import ModelSpec, load_model
from alphatoken.train.batches import pad_token_id
from alphatoken.valuation.attention import ATTENTION_NAME, AttentionRecord, active_record, register_attention
from alphatoken.valuation.signals import attention_module

QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class AttentionPairs:
    """One row per (scored block, example, head, pair): the pair's attention weight and deviation."""

    alpha: np.ndarray  # (N,) A_h[k, t]
    deviation: np.ndarray  # (N,) ||v_t - o_k|| / sqrt(d_h)
    block: np.ndarray  # (N,) decoder block index
    example: np.ndarray  # (N,) example index (over all batches)
    head: np.ndarray  # (N,) query head h
    key: np.ndarray  # (N,) t, the valued position
    query: np.ndarray  # (N,) k, the attending position (t < k <= t + W)


def attention_pairs(model, batch: dict, last_k: int, window: int, example_offset: int = 0) -> AttentionPairs:
    """alpha and d of every causal-window pair of `batch` in the last `last_k` blocks (module
    docstring), from one forward of the model with the valuation's own attention (which records the
    probabilities it applies; forward values are those of eager attention)."""
    register_attention()
    blocks = scored_blocks(model, last_k)
    modules = {idx: attention_module(block) for idx, block in blocks}
    values, contexts, handles = {}, {}, []
    claimed = claim("the attention-deviation diagnostic", [p for m in modules.values() for p in (m.v_proj, m.o_proj)])
    for idx, module in modules.items():
        handles.append(module.v_proj.register_forward_hook(
            lambda m, args, out, idx=idx: values.setdefault(idx, out.detach())))  # (B, T, Hkv*hd)
        handles.append(module.o_proj.register_forward_pre_hook(
            lambda m, args, idx=idx: contexts.setdefault(idx, args[0].detach())))  # (B, T, H*hd)
    configs = {id(c): c for c in [model.config, *(m.config for m in modules.values())]}
    saved = {key: c.__dict__.get("_attn_implementation_internal") for key, c in configs.items()}
    record = AttentionRecord(stop_cross_position_grad=False)
    try:
        for c in configs.values():
            c._attn_implementation_internal = ATTENTION_NAME  # masks and attention of this forward
        with torch.no_grad(), active_record(record):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        release(claimed)
        for key, c in configs.items():
            c._attn_implementation_internal = saved[key]
    labels, mask = batch["labels"], batch["attention_mask"].bool()
    B, T = labels.shape
    loss_position = torch.zeros(B, T, dtype=torch.bool, device=labels.device)  # (B, T): labels[t + 1] != -100
    loss_position[:, :-1] = labels[:, 1:] != -100
    cols = {k: [] for k in ("alpha", "deviation", "block", "example", "head", "key", "query")}
    for idx, module in modules.items():
        probs = record.probs[id(module)].double()  # (B, H, T, T) [query k, key t]
        H = probs.shape[1]
        o = contexts[idx].double().view(B, T, H, -1)  # (B, T, H, hd)
        hd = o.shape[-1]
        v = values[idx].double().view(B, T, -1, hd)  # (B, T, Hkv, hd)
        v = v.repeat_interleave(H // v.shape[2], dim=2)  # (B, T, H, hd): head h reads group h // n_rep
        for d in range(1, min(window, T - 1) + 1):
            alpha = probs.diagonal(offset=-d, dim1=-2, dim2=-1).transpose(1, 2)  # (B, T-d, H): A_h[t+d, t]
            dev = (v[:, : T - d] - o[:, d:]).norm(dim=-1) / math.sqrt(hd)  # (B, T-d, H)
            valid = loss_position[:, : T - d] & mask[:, d:]  # (B, T-d)
            b, t = valid.nonzero(as_tuple=True)  # (n,), (n,)
            n = b.numel()
            cols["alpha"].append(alpha[b, t].flatten().cpu().numpy())  # (n*H,) row-major over (pair, head)
            cols["deviation"].append(dev[b, t].flatten().cpu().numpy())
            cols["block"].append(np.full(n * H, idx))
            cols["example"].append((b + example_offset).repeat_interleave(H).cpu().numpy())
            cols["head"].append(np.tile(np.arange(H), n))
            cols["key"].append(t.repeat_interleave(H).cpu().numpy())
            cols["query"].append((t + d).repeat_interleave(H).cpu().numpy())
    empty = {"alpha": np.float64, "deviation": np.float64}
    return AttentionPairs(**{k: np.concatenate(v) if v else np.zeros(0, empty.get(k, np.int64)) for k, v in cols.items()})


def concat_pairs(parts: list[AttentionPairs]) -> AttentionPairs:
    return AttentionPairs(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in AttentionPairs.__dataclass_fields__})


def summarize_pairs(pairs: AttentionPairs, risk_levels: tuple) -> dict:
    """Counts, quantiles (QUANTILES, plus mean and max) of alpha, d and alpha * d, and the fraction
    of pairs with alpha * d < level for every risk level."""
    n = len(pairs.alpha)
    if n == 0:
        raise ValueError("no causal-window pair: the batch has no scored token with a position after it")
    risk = pairs.alpha * pairs.deviation

    def describe(x):
        return {"mean": float(x.mean()), "max": float(x.max()),
                **{f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(x, QUANTILES))}}

    return {"pairs": n, "blocks": sorted(int(b) for b in np.unique(pairs.block)),
            "pairs_per_block": {str(int(b)): int((pairs.block == b).sum()) for b in np.unique(pairs.block)},
            "alpha": describe(pairs.alpha), "deviation": describe(pairs.deviation), "alpha_times_d": describe(risk),
            "fraction_below": {f"{level:g}": float((risk < level).mean()) for level in risk_levels}}


def attention_figure(pairs: AttentionPairs, summary: dict, risk_levels: tuple, bins: int, path: str | Path,
                     title: str = "") -> Path:
    """2-D histogram of (alpha, d) with marginal densities and dashed alpha * d = level curves."""
    from matplotlib.colors import LogNorm

    from alphatoken.eval.figures import _figure, _save

    fig = _figure((6.4, 6.0))
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4))
    main = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=main)
    side = fig.add_subplot(grid[1, 1], sharey=main)
    # axes up to the 99.9% quantiles: the few largest pairs would squeeze the bulk into one bin
    a_max = min(1.0, float(np.quantile(pairs.alpha, 0.999)) * 1.05) or 1.0
    d_max = float(np.quantile(pairs.deviation, 0.999)) * 1.05 or 1.0
    x_edges, y_edges = np.linspace(0.0, a_max, bins + 1), np.linspace(0.0, d_max, bins + 1)
    counts, _, _ = np.histogram2d(pairs.alpha, pairs.deviation, bins=(x_edges, y_edges))
    shown = np.where(counts > 0, counts, np.nan).T
    image = main.pcolormesh(x_edges, y_edges, shown, norm=LogNorm(vmin=1, vmax=max(counts.max(), 1)), cmap="viridis")
    fig.colorbar(image, ax=side, label="pairs per bin", fraction=0.5)
    alphas = np.linspace(a_max / 400, a_max, 400)
    for level in risk_levels:
        d_curve = level / alphas
        keep = d_curve <= d_max
        main.plot(alphas[keep], d_curve[keep], "--", color="white", lw=1.0)
        main.plot(alphas[keep], d_curve[keep], "--", color="black", lw=0.6)
        if keep.any():
            i = np.flatnonzero(keep)[-1]
            main.annotate(f"{level:g}", (alphas[i], d_curve[i]), fontsize=7, color="black",
                          xytext=(2, 2), textcoords="offset points")
    main.set_xlim(0.0, a_max)
    main.set_ylim(0.0, d_max)
    main.set_xlabel("attention weight alpha_{t->k}")
    main.set_ylabel("value-output deviation d = ||v_t - o_k|| / sqrt(d_h)")
    top.hist(pairs.alpha, bins=x_edges, density=True, histtype="step", color="tab:blue")
    top.set_ylabel("density")
    top.tick_params(labelbottom=False)
    side.hist(pairs.deviation, bins=y_edges, density=True, histtype="step", color="tab:blue", orientation="horizontal")
    side.set_xlabel("density")
    side.tick_params(labelleft=False)
    below = ", ".join(f"{100 * v:.1f}% < {k}" for k, v in summary["fraction_below"].items())
    clipped = int(((pairs.alpha > a_max) | (pairs.deviation > d_max)).sum())
    top.set_title((title + "\n" if title else "") + f"{summary['pairs']} pairs ({clipped} beyond the axes); "
                  f"alpha*d: {below}", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path, "png")


def run_attention_deviation(model_dir: str | Path, train_examples: list, last_k: int, window: int,
                            cfg: DiagnosticsConfig, out_dir: str | Path, name: str | None = None) -> dict:
    """D.2 on the checkpoint in `model_dir` for a seeded draw of `train_examples`. Writes
    summary.json and attention.png to `out_dir`; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = device()
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=str(model_dir), dtype=cfg.dtype), dev)
    model.eval()
    draw = draw_training_examples(train_examples, tokenizer, cfg.n_examples, cfg.max_length, cfg.seed)
    parts, offset = [], 0
    for batch in batches(draw.features, cfg.batch_size, pad_token_id(tokenizer), dev):
        parts.append(attention_pairs(model, batch, last_k, window, example_offset=offset))
        offset += batch["labels"].shape[0]
    pairs = concat_pairs(parts)
    summary = summarize_pairs(pairs, cfg.risk_levels)
    summary.update({"model": str(model_dir), "last_k": last_k, "window": window, "training_examples": draw.ids,
                    "training_counts": draw.counts})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    attention_figure(pairs, summary, cfg.risk_levels, cfg.bins, out / "attention.png",
                     title=f"value-propagation diagnostics: {name or Path(model_dir).name}")
    return summary
