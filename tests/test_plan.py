"""The memory planner: its arithmetic against bytes counted on a built tiny model, the train stage's refusal,
and the CLI on each paper config."""

from pathlib import Path

import pytest
import torch

from alphatoken.blocks import decoder_blocks, scored_linears
from alphatoken.models import build_tiny_model
from alphatoken.plan import (
    GIB, PAPER_SHAPES, PlanError, Run, check_train_config, estimate, main, shape_of_model,
)
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig
from alphatoken.valuation import ValuationConfig

ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = sorted((ROOT / "configs").glob("paper-*.yaml"))


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", dtype=torch.float32)


def _run(**kw):
    values = dict(rule="train", section="train", sequences=2, max_length=16, dtype="float32", bf16=False,
                  gradient_checkpointing=False, attn_implementation="sdpa", scores=True, last_k=2, window=4, gpus=4,
                  distributed="ddp")
    return Run(**{**values, **kw})


def test_parameter_counts_match_the_built_model(model):
    shape = shape_of_model(model)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    params = dict(model.named_parameters())
    for k in (1, 2, 4):
        assert shape.scored_params(k) == sum(params[n].numel() for n in scored_linears(model, k))


def test_bytes_against_hand_count(model):
    shape = shape_of_model(model)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # float32: 4 bytes each
    modules = dict(model.named_modules())
    scored = [modules[n.removesuffix('.weight')] for n in scored_linears(model, 2)]
    pk = sum(m.weight.numel() for m in scored)
    b, t, w, heads = 2, 16, 4, model.config.num_attention_heads
    bands = 2 * (2 * 4 * b * heads * t * w)  # 2 blocks: band + its gradient, fp32
    errors = 4 * b * t * sum(m.in_features + m.out_features for m in scored)
    ddp = estimate(shape, _run())
    assert ddp["weights"] == n_bytes and ddp["gradients"] == n_bytes and ddp["optimizer"] == 2 * n_bytes
    assert ddp["valuation"] == 16 * pk + bands + errors
    fsdp = estimate(shape, _run(), "fsdp")
    block = sum(p.numel() for p in decoder_blocks(model)[0].parameters())
    assert fsdp["weights"] == n_bytes // 4 + 2 * 2 * block and fsdp["optimizer"] == 2 * n_bytes // 4
    assert fsdp["valuation"] == ddp["valuation"] and fsdp["activations"] == ddp["activations"]
    none = estimate(shape, _run(), "none")
    assert none["gradients"] == 2 * n_bytes  # the flat copy of the hand-made all-reduce
    assert estimate(shape, _run(scores=False))["valuation"] == 0
    full = estimate(shape, _run(), checkpointing=False)["activations"]
    ckpt = estimate(shape, _run(), checkpointing=True)["activations"]
    logits = 12 * b * t * model.config.vocab_size
    assert logits < ckpt < full
    eager = estimate(shape, _run(attn_implementation="eager"))["activations"]
    assert eager - full == 4 * b * t * model.config.num_hidden_layers * 2 * heads * t  # scores + probabilities
    assert all(v["total"] == sum(x for k, x in v.items() if k != "total") for v in (ddp, fsdp, none))


def test_bad_distributed_is_refused(model):
    with pytest.raises(PlanError, match="train.distributed"):
        estimate(shape_of_model(model), _run(distributed="zero3"))


def test_train_stage_refusal_names_the_setting(model):
    config = TrainConfig(micro_batch_size=2, max_length=16, bf16=False, policy=PolicyConfig(name="alphatoken"),
                         valuation=ValuationConfig(last_k=2, window=4))
    need = estimate(shape_of_model(model), _run(distributed="none"))["total"]
    check_train_config(model, config, "train", "train", 4, "sdpa", int(need * 2))  # fits: no error
    with pytest.raises(PlanError, match=r"train: the memory planner estimates .* set train.gradient_checkpointing"):
        ckpt = estimate(shape_of_model(model), _run(distributed="none"), checkpointing=True)["total"]
        assert ckpt < need
        check_train_config(model, config, "train", "train", 4, "sdpa", int((ckpt + need) / 2 / 0.9))
    with pytest.raises(PlanError, match="micro_batch_size"):
        check_train_config(model, config, "train", "train", 4, "sdpa", 1000)


def test_paper_table_covers_the_paper_configs():
    import yaml

    names = {yaml.safe_load(p.read_text())["model"]["name_or_path"] for p in PAPER_CONFIGS}
    assert names and names <= set(PAPER_SHAPES)


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_cli_paper_config_fits(config, capsys):
    code = main(["--params", str(ROOT / "params.yaml"), "--configfile", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "every rule fits" in out and "does NOT fit" in out  # the unsharded variants are shown not to fit
    assert out.count("as configured: fits") == out.count("\n  as configured:")


def test_cli_gpu_budget_from_resources(tmp_path, capsys):
    overlay = tmp_path / "small.yaml"
    overlay.write_text("resources:\n  train: {gpu: 4, gpu_mem_gb: 1}\n")
    code = main(["--params", str(ROOT / "params.yaml"), "--configfile", str(PAPER_CONFIGS[-1]), "--configfile",
                 str(overlay)])
    out = capsys.readouterr().out
    assert code == 1 and "resources.train.gpu_mem_gb" in out and f"{GIB / GIB:.3g} GiB" in out


def test_train_stage_refuses_a_distributed_mode_it_does_not_train():
    from alphatoken.stages.common import ParamsError
    from alphatoken.stages.train import check_distributed

    check_distributed("train", "none")
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ParamsError, match=rf"train\.distributed: '{mode}'.*replicated only"):
            check_distributed("train", mode)
