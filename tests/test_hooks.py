"""One owner at a time for the package's hooks on a model (alphatoken.hooks): a second set installed
while one is active raises, naming both owners; leaving a `with` block (or an error inside it) frees
the modules for the next owner. Tiny float64 models built here."""

import pytest
import torch

from alphatoken.blocks import scored_linears
from alphatoken.fisher import FisherConfig, compute_fisher
from alphatoken.hooks import ATTRIBUTE, HookConflictError, owned
from alphatoken.models import build_tiny_model, byte_tokenizer
from alphatoken.policy_inputs import AttentionCapture
from alphatoken.valuation import TokenValuer, ValuationConfig


def claimed(model):
    return {type(m).__name__ for m in model.modules() if ATTRIBUTE in m.__dict__}


@pytest.fixture
def setup():
    model = build_tiny_model("llama", dtype=torch.float64)
    linears = scored_linears(model, 2)
    fisher = {n: torch.ones_like(l.weight) for n, l in linears.items()}
    reference = {n: l.weight.detach().clone() for n, l in linears.items()}
    valuer = TokenValuer(model, ValuationConfig(last_k=2, window=3), fisher=fisher, reference=reference)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    valuer.set_validation(batch)
    return model, valuer, batch


def test_a_second_set_of_hooks_while_one_is_active_raises(setup):
    model, valuer, batch = setup
    with valuer.capture(share_head=True):
        assert claimed(model)  # the scored blocks and the head carry the capture's hooks
        with pytest.raises(HookConflictError, match="the valuation's block capture.*the Fisher's capture"):
            compute_fisher(model, byte_tokenizer(), [[5, 6, 7]], FisherConfig(last_k=2, labels="empirical"),
                           responses=[[8, 9]], progress=False)
        with pytest.raises(HookConflictError, match="block capture"):
            with valuer.capture():
                pass
        with pytest.raises(HookConflictError, match="head cut"):
            with AttentionCapture(model, last_k=1), owned("a test", [model.lm_head]):
                pass
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not claimed(model)  # every claim released, the failed ones included


def test_released_after_use_and_after_an_error(setup):
    model, valuer, batch = setup
    valuer.score(batch)  # capture, then the re-run of the scored blocks: one after the other
    compute_fisher(model, byte_tokenizer(), [[5, 6, 7]], FisherConfig(last_k=2, labels="empirical"),
                   responses=[[8, 9]], progress=False)
    assert not claimed(model)
    with pytest.raises(RuntimeError, match="boom"):
        with valuer.capture():
            raise RuntimeError("boom")
    assert not claimed(model)
    with AttentionCapture(model, last_k=1):
        assert claimed(model)
    assert not claimed(model)
