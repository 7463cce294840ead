"""The scored blocks' attention is kept as its causal band (B, H, T, W) only: the band equals the
diagonals of the full probability matrix (both signals, padded batches, float64), the scores are
unchanged, and the attention record holds exactly B*H*T*W elements per scored block and no
(B, H, T, T) tensor."""

import pytest
import torch

import alphatoken.valuation.signals as signals_module
from alphatoken.models import build_tiny_model
from alphatoken.valuation import TokenValuer, ValuationConfig
from alphatoken.valuation.attention import AttentionRecord
from test_valuation import ARCHS, make_batch

LAST_K, WINDOW = 2, 3


def make_case(arch, signal):
    model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(11)
    batch = make_batch(g, 3, 12, prompt=3, left_pad=[2, 0, 0], right_pad=[0, 3, 0])
    valuer = TokenValuer(model, ValuationConfig(last_k=LAST_K, window=WINDOW, signal=signal))
    return model, batch, valuer


@pytest.mark.parametrize("signal", ["total", "self"])
@pytest.mark.parametrize("arch", ARCHS)
def test_band_equals_the_full_matrix_diagonals(arch, signal):
    _, batch, valuer = make_case(arch, signal)
    banded = valuer.signals(batch)
    full = valuer.signals(batch, full_attention=True)
    attention_blocks = 1 if arch == "qwen3_5" else LAST_K  # the hybrid's last two: DeltaNet, attention
    assert set(banded.band) == set(full.attn) == set(banded.ctx_err) and len(banded.band) == attention_blocks
    for idx, probs in full.attn.items():
        B, H, T, _ = probs.shape
        expected = torch.zeros(B, H, T, WINDOW, dtype=probs.dtype)
        for b in range(B):
            for h in range(H):
                for p in range(T):
                    for d in range(1, WINDOW + 1):
                        if p + d < T:
                            expected[b, h, p, d - 1] = probs[b, h, p + d, p]  # query p+d, key p
        assert banded.band[idx].shape == (B, H, T, WINDOW)
        assert float((banded.band[idx] - expected).abs().max()) <= 1e-12
        assert float(expected.abs().max()) > 0.0
        torch.testing.assert_close(banded.ctx_err[idx], full.ctx_err[idx], rtol=0, atol=1e-12)
    for name in banded.e:
        torch.testing.assert_close(banded.e[name], full.e[name], rtol=0, atol=1e-12)


def test_captured_attention_is_the_band_only(monkeypatch):
    records = []

    class Recording(AttentionRecord):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            records.append(self)

    monkeypatch.setattr(signals_module, "AttentionRecord", Recording)
    model, batch, valuer = make_case("qwen2", "self")
    valuer.set_validation(batch)
    scores = valuer.score(batch)
    assert torch.isfinite(scores.total).all()
    score_records = [r for r in records if r.band == WINDOW]
    assert len(score_records) == 1, [r.band for r in records]
    record = score_records[0]
    assert record.probs == {}
    B, T = batch["input_ids"].shape
    H = model.config.num_attention_heads
    captured = sum(t.numel() * t.element_size() for t in record.bands.values())
    assert captured == LAST_K * B * H * T * WINDOW * 8
    for other in records:
        if other is not record:  # the validation re-run keeps no attention at all
            assert other.band == 0 and other.probs == {} and other.bands == {}
