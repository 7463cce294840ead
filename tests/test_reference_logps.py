"""DPO reference log-probs computed once (`alphatoken.train.reference`, stage ref_logps): the stage's
file holds exactly the values the training loop computes itself, agrees with a one-sequence-at-a-time
float64 twin, a training run given the file ends bit-identical to one that computed them (also after a
preemption and resume), and a file for other weights, data or batching is refused with the field named.
Tiny models built here; nothing downloaded."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import alphatoken.train.loop as loop
from alphatoken.blocks import scored_linears
from alphatoken.data import PreferenceExample, Splits, write_splits
from alphatoken.models import ModelSpec, build_tiny_model, byte_tokenizer, load_model, save_pretrained, weights_fingerprint
from alphatoken.policies import PolicyConfig
from alphatoken.stages import ref_logps
from alphatoken.train import TrainConfig, encode_dataset, train_dpo
from alphatoken.train.batches import as_batch
from alphatoken.train.reference import (
    ReferenceMismatchError, compute_reference_logps, load_reference_logps, read_reference_metadata,
    save_reference_logps,
)
from alphatoken.valuation import ValuationConfig

MAX_LENGTH, MICRO = 128, 2


def pairs(n: int, start: int = 0) -> list[PreferenceExample]:
    """Preference pairs of different lengths (so micro-batches are padded)."""
    return [PreferenceExample(id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}: add {i} and {i + 1}" + "!" * (i % 3)}],
                              chosen=f"the sum is {2 * i + 1}.", rejected=f"the sum is {2 * i + 3}, I think" + "." * (i % 4),
                              source="test") for i in range(start, start + n)]


TRAIN = pairs(9) + [PreferenceExample(id="long", prompt=[{"role": "user", "content": "x" * 300}], chosen="a",
                                      rejected="b", source="test")]  # prompt_too_long: skipped, counted
VAL = pairs(3, start=50)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The warm-start checkpoint (tiny Llama, float32 as in the pipeline), the DPO splits, and the
    stage's reference file computed from them."""
    root = tmp_path_factory.mktemp("ref")
    model_dir = save_pretrained(build_tiny_model("llama", dtype=torch.float32, seed=0), byte_tokenizer(), root / "warmstart")
    split = write_splits(Splits(TRAIN, VAL, [], 0, {}), root / "data")
    params = root / "params.yaml"
    params.write_text(f"dpo:\n  methods: [alphatoken]\n  seeds: [0]\n  rho: 0.5\n  lr: 1.0e-3\n  max_length: {MAX_LENGTH}\n"
                      f"  micro_batch_size: {MICRO}\n  val_examples: 0\n  dtype: float32\n  attn_implementation: eager\n")
    out = root / "ref_logps.safetensors"
    ref_logps.main(["--params", str(params), "--section", "dpo", "--model", str(model_dir), "--train-data", str(split["train"]),
                    "--val-data", str(split["val"]), "--out", str(out)])
    return {"root": root, "model": model_dir, "params": params, "file": out}


def warmstart(setup):
    """The warm-start model as the train stage loads it."""
    return load_model(ModelSpec(source="hub", name_or_path=str(setup["model"]), dtype="float32", attn_implementation="eager"))


def config(out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), lr=1e-3, micro_batch_size=MICRO, grad_accum_steps=1, max_steps=2, warmup_steps=1,
                policy=PolicyConfig(name="alphatoken", rho=0.5), valuation=ValuationConfig(last_k=2, window=4),
                progress=False, max_length=MAX_LENGTH)
    base.update(kw)
    return TrainConfig(**base)


def fisher_of(model) -> dict:
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(l.weight.shape, generator=g, dtype=l.weight.dtype) for n, l in scored_linears(model, 2).items()}


def test_stage_file_equals_the_loops_own_computation(setup, tmp_path):
    """Bit for bit: the run without the file computes its reference losses (cached as
    reference_losses.pt) from the same warm-start; they equal the stage's file exactly."""
    model, tokenizer = warmstart(setup)
    train_dpo(model, tokenizer, TRAIN, VAL, config(tmp_path), fisher=fisher_of(model))
    own = torch.load(tmp_path / loop.REFERENCE_LOSSES, weights_only=False)
    model, _ = warmstart(setup)
    features, stats = encode_dataset(tokenizer, TRAIN, MAX_LENGTH, preference=True)
    staged = load_reference_logps(setup["file"], model, features, as_batch(tokenizer, VAL, MAX_LENGTH, True), MAX_LENGTH,
                                  MICRO)
    assert len(own["train"]) == len(staged.train) == 9
    for i, (a, b) in enumerate(zip(own["train"], staged.train)):
        for branch in ("chosen", "rejected"):
            assert a[branch].dtype == b[branch].dtype == torch.float32
            assert torch.equal(a[branch], b[branch]), f"pair {i} {branch}: max diff {(a[branch] - b[branch]).abs().max()}"
    assert own["val"].shape == (6,) and torch.equal(own["val"], staged.val)
    meta = read_reference_metadata(setup["file"])
    assert meta["train_count"] == "9" and '"prompt_too_long": 1' in meta["train_skipped"]
    assert meta["val_count"] == "3" and meta["max_length"] == str(MAX_LENGTH)
    assert meta["weights_fingerprint"] == weights_fingerprint(model)


def naive_token_losses(model, feature: dict) -> torch.Tensor:
    """One sequence, no padding: l[p] = -log softmax(logits[p])[ids[p+1]], 0 on the prompt."""
    ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor(feature["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)  # (T-1, V)
    target = labels[1:]  # (T-1,)
    losses = -logp.gather(-1, target.clamp(min=0)[:, None])[:, 0]  # (T-1,)
    return torch.where(target == -100, torch.zeros_like(losses), losses)


def test_batched_values_agree_with_the_one_sequence_twin(tokenizer):
    model = build_tiny_model("qwen2", dtype=torch.float64).eval()
    ref = compute_reference_logps(model, tokenizer, TRAIN, VAL, MAX_LENGTH, micro_batch_size=3)
    features, _ = encode_dataset(tokenizer, TRAIN, MAX_LENGTH, preference=True)
    worst = 0.0
    for feature, row in zip(features, ref.train):
        for branch in ("chosen", "rejected"):
            expected = naive_token_losses(model, feature[branch])
            assert row[branch].shape == expected.shape
            worst = max(worst, float((row[branch] - expected).abs().max()))
    assert worst < 1e-6, worst
    val_features, _ = encode_dataset(tokenizer, VAL, MAX_LENGTH, preference=True)
    expected_val = torch.tensor([-float(naive_token_losses(model, f[b]).sum()) for b in ("chosen", "rejected")
                                 for f in val_features], dtype=torch.float64)  # (2Bv,): chosen rows, then rejected
    assert torch.allclose(ref.val, expected_val, atol=1e-6, rtol=0)
    assert float(expected_val.abs().min()) > 1.0  # not vacuous: real log-probs


def test_training_with_the_file_is_bit_identical_and_does_not_recompute(setup, tmp_path, monkeypatch):
    model, tokenizer = warmstart(setup)
    computed = train_dpo(model, tokenizer, TRAIN, VAL, config(tmp_path / "computed"), fisher=fisher_of(model)).model

    def refuse(*args, **kwargs):
        raise AssertionError("the loop recomputed the reference losses although a file was given")

    monkeypatch.setattr(loop, "reference_token_losses", refuse)
    monkeypatch.setattr(loop, "reference_sequence_logps", refuse)
    model, _ = warmstart(setup)
    given = train_dpo(model, tokenizer, TRAIN, VAL, config(tmp_path / "given"), fisher=fisher_of(model),
                      reference_logps=setup["file"]).model
    assert not (tmp_path / "given" / loop.REFERENCE_LOSSES).exists()
    a, b = computed.state_dict(), given.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert weights_fingerprint(given) != weights_fingerprint(warmstart(setup)[0])  # the runs trained


def test_resume_with_the_file_is_bit_identical(setup, tmp_path, monkeypatch):
    """Preempted (SIGUSR1 after the step-1 checkpoint) and rerun with the same file: the same weights
    as an uninterrupted run with it."""
    model, tokenizer = warmstart(setup)
    straight = train_dpo(model, tokenizer, TRAIN, VAL, config(tmp_path / "straight", max_steps=3),
                         fisher=fisher_of(model), reference_logps=setup["file"]).model
    save_checkpoint = loop.save_checkpoint

    def save_then_signal(directory, model, optimizer, scheduler, step, extra=None):
        path = save_checkpoint(directory, model, optimizer, scheduler, step, extra)
        if step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_signal)
    cfg = config(tmp_path / "resumed", max_steps=3, checkpoint_every=1)
    model, _ = warmstart(setup)
    first = train_dpo(model, tokenizer, TRAIN, VAL, cfg, fisher=fisher_of(model), reference_logps=setup["file"])
    assert first.preempted and first.steps < 3
    monkeypatch.setattr(loop, "save_checkpoint", save_checkpoint)
    model, _ = warmstart(setup)
    resumed = train_dpo(model, tokenizer, TRAIN, VAL, cfg, fisher=fisher_of(model), reference_logps=setup["file"])
    assert not resumed.preempted
    a, b = straight.state_dict(), resumed.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_a_file_for_other_weights_data_or_batching_is_refused(setup, tmp_path, tokenizer):
    path = setup["file"]
    model, _ = warmstart(setup)
    features, _ = encode_dataset(tokenizer, TRAIN, MAX_LENGTH, preference=True)
    val_batch = as_batch(tokenizer, VAL, MAX_LENGTH, True)
    load_reference_logps(path, model, features, val_batch, MAX_LENGTH, MICRO)  # the matching case loads

    def refused(match: str, **changes):
        kwargs = dict(model=model, features=features, val_batch=val_batch, max_length=MAX_LENGTH, micro_batch_size=MICRO)
        kwargs.update(changes)
        with pytest.raises(ReferenceMismatchError, match=match) as err:
            load_reference_logps(path, **kwargs)
        assert str(err.value).startswith(f"{path}: ")

    other = build_tiny_model("llama", dtype=torch.float32, seed=1)
    refused(r"other weights.*field 'weights_fingerprint'", model=other)
    refused(r"other training data.*field 'train_count': expected '8', found '9'", features=features[1:])
    swapped = [{"chosen": f["rejected"], "rejected": f["chosen"]} for f in features]
    refused(r"field 'train_sha256'", features=swapped)
    refused(r"field 'max_length': expected '64', found '128'", max_length=64)
    refused(r"field 'micro_batch_size': expected '4', found '2'", micro_batch_size=4)
    refused(r"other validation pairs.*field 'val_count'", val_batch=as_batch(tokenizer, VAL[:2], MAX_LENGTH, True))
    no_val = compute_reference_logps(model, tokenizer, TRAIN, None, MAX_LENGTH, MICRO)
    save_reference_logps(tmp_path / "no_val.safetensors", no_val)
    with pytest.raises(ReferenceMismatchError, match="holds no validation log-probs"):
        load_reference_logps(tmp_path / "no_val.safetensors", model, features, val_batch, MAX_LENGTH, MICRO)
    assert load_reference_logps(tmp_path / "no_val.safetensors", model, features, None, MAX_LENGTH, MICRO).val is None
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ReferenceMismatchError, match="not a readable safetensors file"):
        load_reference_logps(tmp_path / "junk.safetensors", model, features, None, MAX_LENGTH, MICRO)
    # and through the loop: the run refuses before training
    with pytest.raises(ReferenceMismatchError, match="weights_fingerprint"):
        train_dpo(other, tokenizer, TRAIN, VAL, config(tmp_path / "run"), fisher=fisher_of(other), reference_logps=path)


def test_stage_parameter_errors_name_file_line_and_field(setup, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("dpo:\n  rho: 0.5\n  micro_batch_size: 0\n")
    with pytest.raises(SystemExit) as exit_info:
        ref_logps.main(["--params", str(params), "--section", "dpo", "--model", str(setup["model"]), "--train-data", "t",
                        "--val-data", "v", "--out", str(tmp_path / "r.safetensors")])
    assert exit_info.value.code == 2
    assert f"error: {params}:3: dpo.micro_batch_size: expected an integer >= 1, got 0" in capsys.readouterr().err
    params.write_text("dpo:\n  rho: 0.5\n")  # keys the values do not depend on are ignored; defaults as the train stage
    assert ref_logps.read_settings([params], "dpo") == {"max_length": TrainConfig.max_length, "micro_batch_size": 1,
                                                        "val_examples": 0, "dtype": "float32",
                                                        "attn_implementation": "eager"}
