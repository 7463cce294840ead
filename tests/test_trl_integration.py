"""TRL integration (`alphatoken.integrations.trl`): optimizer steps of `AlphaTokenSFTTrainer` /
`AlphaTokenDPOTrainer` equal those of `alphatoken.train.train_sft` / `train_dpo` with the same data order,
policy and settings (tiny float64 models built here, SGD so that the update is -lr times the gradient and
any difference in the masks, the values or the normaliser shows); gradient accumulation, gradient
checkpointing and PEFT inside TRL; the refusals; the core package does not import TRL."""

import copy
import subprocess
import sys

import pytest
import torch

from alphatoken.blocks import scored_linears
from alphatoken.data import ConfigError
from alphatoken.losses import loss_positions, token_nll
from alphatoken.integrations.trl import (
    AlphaTokenDPOConfig, AlphaTokenDPOTrainer, AlphaTokenSFTConfig, AlphaTokenSFTTrainer, preference_dataset, sft_dataset,
)
from alphatoken.models import build_tiny_model
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, train_dpo, train_sft
from alphatoken.train.batches import as_batch
from alphatoken.valuation import ValuationConfig

from conftest import BATCHING_TOL

LR, STEPS, MAX_LENGTH = 0.5, 2, 64
VALUATION = dict(last_k=2, window=4, lam=1.5, signal="self")


def sft_examples(n=8):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(n)]


def val_examples():
    return [{"prompt": "q: add 3 and 5", "response": "the sum is 8."}, {"prompt": "q: add 1 and 1", "response": "it is 2"}]


def pairs(n=8):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "chosen": f"the sum is {2 * i + 1}.", "rejected": f"maybe {i}{i}?"}
            for i in range(n)]


def val_pairs():
    return [{"prompt": "q: add 3 and 5", "chosen": "the sum is 8.", "rejected": "no idea"},
            {"prompt": "q: add 1 and 1", "chosen": "it is 2", "rejected": "it is 11"}]


def fisher_of(model):
    """A fixed positive Fisher of the scored weights (the proxy is active from the second step on)."""
    gen = torch.Generator().manual_seed(7)
    return {name: torch.rand(lin.weight.shape, generator=gen, dtype=torch.float64) * 50
            for name, lin in scored_linears(model, VALUATION["last_k"]).items()}


def library_config(tmp_path, name, micro, accum, **kw):
    return TrainConfig(output_dir=str(tmp_path / "library"), optimizer="sgd", lr=LR, lr_schedule="constant", warmup_steps=0,
                       max_grad_norm=None, micro_batch_size=micro, grad_accum_steps=accum, max_steps=STEPS, seed=0,
                       policy=PolicyConfig(name=name, rho=0.5), valuation=ValuationConfig(**VALUATION), progress=False,
                       max_length=MAX_LENGTH, **kw)


def trl_fields(tmp_path, name, micro, accum, **kw):
    base = dict(output_dir=str(tmp_path / "trl"), optim="sgd", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                max_grad_norm=0.0, weight_decay=0.0, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                max_steps=STEPS, seed=0, report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1,
                disable_tqdm=True, gradient_checkpointing=False, max_length=MAX_LENGTH, policy=name, rho=0.5, **VALUATION)
    base.update(kw)
    return base


def max_param_diff(a, b):
    """Largest norm-relative difference over the parameter tensors of two models (same names)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    with torch.no_grad():
        return max(float((pa[k] - pb[k]).abs().max() / pb[k].abs().max().clamp(min=1e-12)) for k in pb)


def run_sft_library(tmp_path, tokenizer, name, micro=2, accum=2, arch="llama"):
    model = build_tiny_model(arch)
    fisher = fisher_of(model) if name != "full" and name != "random" else None
    val = val_examples() if fisher is not None else None
    return train_sft(model, tokenizer, sft_examples(), val, library_config(tmp_path, name, micro, accum), fisher=fisher).model


def run_sft_trl(tmp_path, tokenizer, name, micro=2, accum=2, arch="llama", peft_config=None, **kw):
    model = build_tiny_model(arch)
    scores = name not in ("full", "random")
    fisher = fisher_of(model) if scores and peft_config is None else None
    train, _ = sft_dataset(tokenizer, sft_examples(), MAX_LENGTH)
    trainer = AlphaTokenSFTTrainer(model=model, args=AlphaTokenSFTConfig(**trl_fields(tmp_path, name, micro, accum, **kw)),
                                   train_dataset=train, processing_class=tokenizer, peft_config=peft_config,
                                   val_dataset=val_examples() if scores else None, fisher=fisher)
    trainer.train()
    return trainer


@pytest.mark.parametrize("name", ["alphatoken", "full", "random"])
def test_sft_steps_equal_train_sft(tmp_path, tokenizer, name):
    trainer = run_sft_trl(tmp_path, tokenizer, name)
    library = run_sft_library(tmp_path, tokenizer, name)
    assert trainer.state.global_step == STEPS
    assert max_param_diff(trainer.model, library) < BATCHING_TOL
    assert max_param_diff(library, build_tiny_model("llama")) > 1e-3  # the steps moved the weights


def test_the_comparison_sees_the_mask(tmp_path, tokenizer):
    """The same TRL run with another policy differs from the library's alphatoken run by far more than the tolerance."""
    trl_random = run_sft_trl(tmp_path / "random", tokenizer, "random").model
    library = run_sft_library(tmp_path / "library", tokenizer, "alphatoken")
    assert max_param_diff(trl_random, library) > 100 * BATCHING_TOL


@pytest.mark.parametrize("micro,accum", [(1, 4), (4, 1)])
def test_sft_gradient_accumulation_inside_trl(tmp_path, tokenizer, micro, accum):
    """TRL's gradient accumulation gives the library's step: top-rho per micro-batch, K over the whole step."""
    trainer = run_sft_trl(tmp_path, tokenizer, "alphatoken", micro=micro, accum=accum)
    library = run_sft_library(tmp_path, tokenizer, "alphatoken", micro=micro, accum=accum)
    assert max_param_diff(trainer.model, library) < BATCHING_TOL


def test_sft_full_does_not_depend_on_the_split(tmp_path, tokenizer):
    one = run_sft_trl(tmp_path / "a", tokenizer, "full", micro=4, accum=1).model
    four = run_sft_trl(tmp_path / "b", tokenizer, "full", micro=1, accum=4).model
    assert max_param_diff(four, one) < BATCHING_TOL


def test_sft_gradient_checkpointing_gives_the_same_step(tmp_path, tokenizer):
    trainer = run_sft_trl(tmp_path, tokenizer, "alphatoken", gradient_checkpointing=True)
    library = run_sft_library(tmp_path, tokenizer, "alphatoken")
    assert max_param_diff(trainer.model, library) < BATCHING_TOL


def test_sft_with_peft_lora_scores_the_factors_and_equals_the_library(tmp_path, tokenizer):
    """`peft_config` + policy alphatoken inside TRL is the library's alphatoken_lora (same seeded adapters)."""
    from peft import LoraConfig

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, bias="none")
    trainer = run_sft_trl(tmp_path, tokenizer, "alphatoken", peft_config=lora)
    assert all("lora_" in name for name in trainer.valuer.linears)
    merged = trainer.model.merge_and_unload()
    cfg = library_config(tmp_path, "alphatoken_lora", 2, 2)
    cfg = TrainConfig(**{**cfg.__dict__, "policy": PolicyConfig(name="alphatoken_lora", rho=0.5, lora_rank=4, lora_alpha=8.0,
                                                                lora_targets=tuple(targets))})
    library = train_sft(build_tiny_model("llama"), tokenizer, sft_examples(), val_examples(), cfg).model
    assert max_param_diff(merged, library) < BATCHING_TOL
    assert max_param_diff(library, build_tiny_model("llama")) > 1e-4


def run_dpo_trl(tmp_path, tokenizer, name, micro=2, accum=2):
    model = build_tiny_model("llama")
    scores = name not in ("full", "random")
    train, _ = preference_dataset(tokenizer, pairs(), MAX_LENGTH)
    args = AlphaTokenDPOConfig(**trl_fields(tmp_path, name, micro, accum, beta=0.1))
    trainer = AlphaTokenDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=train,
                                   processing_class=tokenizer, val_dataset=val_pairs() if scores else None,
                                   fisher=fisher_of(model) if scores else None)
    trainer.train()
    return trainer


@pytest.mark.parametrize("name,micro,accum", [("alphatoken", 2, 2), ("full", 2, 2), ("random", 2, 2), ("alphatoken", 1, 4)])
def test_dpo_steps_equal_train_dpo(tmp_path, tokenizer, name, micro, accum):
    trainer = run_dpo_trl(tmp_path, tokenizer, name, micro, accum)
    model = build_tiny_model("llama")
    scores = name not in ("full", "random")
    library = train_dpo(model, tokenizer, pairs(), val_pairs() if scores else None,
                        library_config(tmp_path, name, micro, accum, dpo_beta=0.1), fisher=fisher_of(model) if scores else None).model
    assert max_param_diff(trainer.model, library) < BATCHING_TOL
    assert max_param_diff(library, build_tiny_model("llama")) > 1e-4


def test_preference_dataset_is_trl_format(tokenizer):
    data, stats = preference_dataset(tokenizer, pairs(3), MAX_LENGTH)
    assert stats["kept"] == 3 and set(data.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}
    row = data[0]
    assert row["prompt_ids"] and row["chosen_ids"] != row["rejected_ids"]


@pytest.mark.parametrize("field,value,named", [
    ("packing", True, "packing"), ("padding_free", True, "padding_free"), ("policy", "soft", "policy"),
    ("policy", "stm", "policy"), ("policy", "alphatoken_lora", "policy"), ("policy", "nope", "policy"),
    ("rho", 0.0, "rho"), ("last_k", 0, "last_k"), ("signal", "both", "signal"), ("data_order", "x", "data_order"),
])
def test_sft_config_refuses_with_the_field(tmp_path, field, value, named):
    with pytest.raises(ConfigError) as err:
        AlphaTokenSFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{field: value})
    assert err.value.field == named and "AlphaTokenSFTConfig" in str(err.value)


@pytest.mark.parametrize("field,value", [("loss_type", ["hinge"]), ("ld_alpha", 0.5), ("label_smoothing", 0.1),
                                         ("policy", "xtf"), ("policy", "confpo")])
def test_dpo_config_refuses_other_objectives(tmp_path, field, value):
    with pytest.raises(ConfigError) as err:
        AlphaTokenDPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **{field: value})
    assert err.value.field == field


def test_scoring_policy_without_validation_data_is_refused(tmp_path, tokenizer):
    train, _ = sft_dataset(tokenizer, sft_examples(), MAX_LENGTH)
    with pytest.raises(ValueError, match="val_data"):
        AlphaTokenSFTTrainer(model=build_tiny_model("llama"), args=AlphaTokenSFTConfig(**trl_fields(tmp_path, "alphatoken", 2, 2)),
                             train_dataset=train, processing_class=tokenizer)


def test_validation_file_and_fisher_file_are_read(tmp_path, tokenizer):
    """`val_data` (a split file) and `fisher_path` (save_fisher's safetensors, checked against the model) work
    as the trainer arguments do."""
    from alphatoken.data import ChatExample, to_json
    from alphatoken.fisher import FisherConfig, save_fisher
    import json

    model = build_tiny_model("llama")
    fisher = fisher_of(model)
    # a Fisher file stores exactly the scored weights of its last_k
    save_fisher(tmp_path / "fisher.safetensors", fisher, model, FisherConfig(last_k=VALUATION["last_k"]), 4)
    lines = [json.dumps(to_json(ChatExample(f"v{i}", [{"role": "user", "content": e["prompt"]},
                                                      {"role": "assistant", "content": e["response"]}], "val")))
             for i, e in enumerate(val_examples())]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    train, _ = sft_dataset(tokenizer, sft_examples(), MAX_LENGTH)
    args = AlphaTokenSFTConfig(**trl_fields(tmp_path, "alphatoken", 2, 2, val_data=str(tmp_path / "val.jsonl"),
                                            fisher_path=str(tmp_path / "fisher.safetensors")))
    trainer = AlphaTokenSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    library = run_sft_library(tmp_path, tokenizer, "alphatoken")
    assert max_param_diff(trainer.model, library) < BATCHING_TOL


def test_core_package_does_not_import_trl():
    code = ("import sys, alphatoken, alphatoken.train, alphatoken.valuation, alphatoken.policies, alphatoken.losses, "
            "alphatoken.integrations; assert 'trl' not in sys.modules, 'trl imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


DDP_WORKER = r'''
import sys
import torch
sys.path.insert(0, sys.argv[2])  # the tests directory: the helpers above
from test_trl_integration import run_sft_trl
from alphatoken.models import byte_tokenizer
from pathlib import Path

trainer = run_sft_trl(Path(sys.argv[1]), byte_tokenizer(), sys.argv[3], micro=2, accum=1)
if trainer.accelerator.is_main_process:
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    torch.save(trainer.model.state_dict(), Path(sys.argv[1]) / "weights.pt")
'''


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alphatoken", "random"])
def test_two_process_data_parallel_equals_one_process_accumulating(tmp_path, tokenizer, name):
    """torchrun, 2 CPU processes (gloo) x 1 micro-batch of 2 inside TRL = the library's 1 process x 2 accumulated
    micro-batches of 2: process r takes micro-batch r of the step, K is summed over processes."""
    import os
    from pathlib import Path

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path),
           str(root / "tests"), name]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    library = run_sft_library(tmp_path, tokenizer, name, micro=2, accum=2)
    trained = build_tiny_model("llama")
    trained.load_state_dict(weights)
    assert max_param_diff(trained, library) < BATCHING_TOL


def test_dpo_with_precomputed_reference_log_probs(tmp_path, tokenizer):
    """No ref_model: TRL precomputes the reference log-probs with the starting model; the step is the library's."""
    model = build_tiny_model("llama")
    train, _ = preference_dataset(tokenizer, pairs(), MAX_LENGTH)
    args = AlphaTokenDPOConfig(**trl_fields(tmp_path, "alphatoken", 2, 2, beta=0.1, precompute_ref_log_probs=True))
    trainer = AlphaTokenDPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                   val_dataset=val_pairs(), fisher=fisher_of(model))
    assert trainer.ref_model is None
    trainer.train()
    fresh = build_tiny_model("llama")
    library = train_dpo(fresh, tokenizer, pairs(), val_pairs(), library_config(tmp_path, "alphatoken", 2, 2, dpo_beta=0.1),
                        fisher=fisher_of(fresh)).model
    assert max_param_diff(trainer.model, library) < BATCHING_TOL


def test_evaluation_reports_the_unmasked_loss(tmp_path, tokenizer):
    """trainer.evaluate() is TRL's: the mean token loss over all response tokens, no valuation."""
    model = build_tiny_model("llama")
    train, _ = sft_dataset(tokenizer, sft_examples(), MAX_LENGTH)
    evaluation, _ = sft_dataset(tokenizer, val_examples(), MAX_LENGTH)
    args = AlphaTokenSFTConfig(**trl_fields(tmp_path, "alphatoken", 2, 2, per_device_eval_batch_size=2))
    trainer = AlphaTokenSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                   processing_class=tokenizer, val_dataset=val_examples())
    metrics = trainer.evaluate()
    batch = as_batch(tokenizer, val_examples(), MAX_LENGTH)
    with torch.no_grad():
        logits = build_tiny_model("llama")(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = float(token_nll(logits, batch["labels"]).sum() / loss_positions(batch["labels"]).sum())
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)
