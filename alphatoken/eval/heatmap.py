"""Token heatmaps of the score components (paper Fig. 4/9): scoring a few training examples of a
trained run with `TokenValuer` (`score_heatmap`), and the self-contained HTML page they are drawn on.

One block per example, one row per component (e.g. tgt_dir, tgt_cau, prx_dir, prx_cau, total); each
token is a span coloured on a diverging scale: red for positive, blue for negative, intensity
|score| / max |score| of that component in that example (white when the row is all zeros). The exact
value is in the span's `title` tooltip. All text is HTML-escaped; the page loads nothing external.
"""

from __future__ import annotations

import html
import logging
import math
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alphatoken.blocks import scored_linears
from alphatoken.data import ChatExample, ExampleDropped, collate, encode_chat
from alphatoken.fisher import load_fisher
from alphatoken.models import ModelSpec, load_model
from alphatoken.valuation import TokenValuer, ValuationConfig

COMPONENTS = ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau", "total")

log = logging.getLogger(__name__)

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
.example { margin-bottom: 2em; }
.row { margin: 0.3em 0; line-height: 1.9; }
.label { display: inline-block; width: 7em; font-weight: bold; font-family: monospace; }
.tok { font-family: monospace; white-space: pre; padding: 0.1em 0; border-radius: 2px; }
"""


def _colour(score: float, scale: float) -> str:
    """rgb() of a score on the red (positive) / blue (negative) scale, white at zero."""
    strength = 0.0 if scale == 0 else min(abs(score) / scale, 1.0)
    fade = round(255 * (1 - strength))
    return f"rgb(255,{fade},{fade})" if score >= 0 else f"rgb({fade},{fade},255)"


def render_example(tokens: list[str], scores: dict[str, list[float]], title: str = "") -> str:
    """HTML fragment for one example; every score list must have one value per token."""
    for component, values in scores.items():
        if len(values) != len(tokens):
            raise ValueError(f"component {component!r} has {len(values)} scores for {len(tokens)} tokens")
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"component {component!r} has non-finite scores")
    parts = ['<div class="example">']
    if title:
        parts.append(f"<h3>{html.escape(title)}</h3>")
    for component, values in scores.items():
        scale = max((abs(float(v)) for v in values), default=0.0)
        spans = "".join(
            f'<span class="tok" style="background:{_colour(float(v), scale)}" '
            f'title="{html.escape(component)}={float(v):.4g}">{html.escape(token)}</span>'
            for token, v in zip(tokens, values)
        )
        parts.append(f'<div class="row"><span class="label">{html.escape(component)}</span>{spans}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def write_heatmap_page(examples: list[tuple[list[str], dict[str, list[float]], str]], path: str | Path,
                       title: str = "AlphaToken token scores") -> Path:
    """Write one page with several examples [(tokens, scores, example title)]."""
    body = "\n".join(render_example(tokens, scores, name) for tokens, scores, name in examples)
    page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def token_heatmap_html(tokens: list[str], scores: dict[str, list[float]], path: str | Path,
                       title: str = "AlphaToken token scores") -> Path:
    """Write a self-contained HTML heatmap of one example's token scores (one row per component)."""
    return write_heatmap_page([(tokens, scores, "")], path, title)


def score_heatmap(model_dir: str | Path, fisher_path: str | Path, reference_dir: str | Path,
                  val_examples: list[ChatExample], examples: list[ChatExample], valuation_cfg: ValuationConfig,
                  path: str | Path, max_length: int = 512, n: int = 4, dtype: str = "float32",
                  name: str | None = None) -> Path:
    """HTML heatmap of the token values of the first `n` `examples` that fit `max_length` tokens.

    The valuer scores the model in `model_dir` against the validation batch built from `val_examples`,
    with the proxy P = F * (W - W_ref) (a Kronecker Fisher: S (W - W_ref) A): F = the Fisher at
    `fisher_path` (checked against the reference model) and W_ref = the reference model's scored weights. The validation examples are encoded as
    the training loop encodes its validation batch: a response longer than `max_length` is truncated,
    an example whose prompt leaves no room for a response token is dropped. Training examples that do
    not fit whole (or cannot train) are skipped. Every truncation, drop and skip is counted by reason
    in the page title and the log. `dtype`: the weights dtype both models are loaded in; `name`: the
    run named in the title (default: the name of `model_dir`). Returns `path`.
    """
    if n < 1:
        raise ValueError(f"score_heatmap: n must be >= 1, got {n!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the model's own (sdpa) attention: the valuer re-runs the scored blocks with its own attention
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=str(model_dir), dtype=dtype), device)
    reference, _ = load_model(ModelSpec(source="hub", name_or_path=str(reference_dir), dtype=dtype), device)
    fisher = {k: v.to(device) for k, v in load_fisher(fisher_path, reference).items()}
    ref_params = dict(reference.named_parameters())
    ref_weights = {p: ref_params[p].detach() for p in scored_linears(reference, valuation_cfg.last_k)}
    valuer = TokenValuer(model, valuation_cfg, fisher=fisher, reference=ref_weights)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(items: list[ChatExample], what: str, truncate: bool, limit: int | None):
        """(features, kept examples, Counter of reason -> count) for the first `limit` usable items."""
        features, kept, counts = [], [], Counter()
        for example in items:
            try:
                feature = encode_chat(example, tokenizer, max_length)  # overlong: ExampleDropped("too_long")
            except ExampleDropped as drop:
                if not (truncate and drop.reason == "too_long"):
                    counts[drop.reason] += 1
                    continue
                feature = encode_chat(example, tokenizer, max_length, overlong="truncate")
                counts["truncated"] += 1
            features.append(feature)
            kept.append(example)
            if limit is not None and len(kept) == limit:
                break
        if not features:
            raise ValueError(f"score_heatmap: none of the {len(items)} {what} fits {max_length} tokens "
                             f"({dict(counts)})")
        return features, kept, counts

    val_features, _, val_counts = encode(val_examples, "val_examples", truncate=True, limit=None)
    valuer.set_validation({k: v.to(device) for k, v in collate(val_features, pad).items()})
    features, kept, skipped = encode(examples, "examples", truncate=False, limit=n)
    batch = {k: v.to(device) for k, v in collate(features, pad).items()}
    scores = valuer.score(batch)  # TokenScores, each (B, T), aligned with labels
    pages = []
    for row, example in enumerate(tqdm(kept, desc="heatmap")):
        positions = (batch["labels"][row] != -100).nonzero().flatten().tolist()  # response tokens
        tokens = [tokenizer.decode([int(batch["input_ids"][row, t])]) for t in positions]
        values = {c: [float(getattr(scores, c)[row, t]) for t in positions] for c in COMPONENTS}
        pages.append((tokens, values, f"{example.id} (lam={valuation_cfg.lam})"))
    title = f"AlphaToken token values: {name or Path(model_dir).name}"
    notes = []
    if skipped:
        notes.append(f"{sum(skipped.values())} training examples skipped: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if val_counts:
        notes.append(f"validation examples ({len(val_features)} used): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(val_counts.items())))
    if notes:
        title += " (" + "; ".join(notes) + ")"
    log.info("heatmap of %d examples, max_length %d: %s", len(kept), max_length, "; ".join(notes) or "nothing skipped")
    return write_heatmap_page(pages, path, title=title)
