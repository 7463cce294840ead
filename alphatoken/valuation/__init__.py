"""Token valuation: each response token's value is the alignment of its weight gradient with a
validation-target gradient (direct + value-path causal terms) plus lam times the alignment with a
Fisher-weighted drift proxy, computed from activations and errors of the last K blocks only.
See docs/METHOD.md."""

from alphatoken.valuation.config import TokenScores, ValuationConfig
from alphatoken.valuation.valuer import TokenValuer

__all__ = ["TokenScores", "TokenValuer", "ValuationConfig"]
