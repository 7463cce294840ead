"""Self-contained HTML token heatmaps of the score components (paper Fig. 4/9).

One block per example, one row per component (e.g. tgt_dir, tgt_cau, prx_dir, prx_cau, total); each
token is a span coloured on a diverging scale: red for positive, blue for negative, intensity
|score| / max |score| of that component in that example (white when the row is all zeros). The exact
value is in the span's `title` tooltip. All text is HTML-escaped; the page loads nothing external.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

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
