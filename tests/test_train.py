"""SFT loop: equals a hand-written SFT loop, micro-batch invariance, every policy trains, bad input,
final Hugging Face checkpoint. Tiny float64 models built here."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from alphatoken.models import build_tiny_model, weights_fingerprint
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, collate, encode_dataset, train_sft
from alphatoken.train.loop import _epoch_order

# Relative agreement between two float64 runs that batch differently: Hugging Face RMSNorm
# computes in float32 even in float64 models, so padding/batch shape changes round at ~1e-7, and
# AdamW's m / (sqrt(v) + eps) amplifies that rounding in coordinates whose gradient is ~0; the
# comparison runs use eps = 1e-5 so such coordinates do not dominate.
TOL = 1e-6


def examples(n=8):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(n)]


def config(tmp_path, name="full", **kw):
    base = dict(output_dir=str(tmp_path), lr=1e-3, micro_batch_size=2, grad_accum_steps=2, max_steps=3, warmup_steps=1,
                weight_decay=0.1, max_grad_norm=1.0, adam_eps=1e-5, policy=PolicyConfig(name=name, rho=0.5), progress=False, max_length=64)
    base.update(kw)
    return TrainConfig(**base)


def max_param_diff(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    with torch.no_grad():
        return max(float((pa[k] - pb[k]).abs().max() / pb[k].abs().max().clamp(min=1e-12)) for k in pa)


def test_full_policy_equals_plain_sft_loop(tmp_path, tokenizer):
    cfg = config(tmp_path)
    trained = train_sft(build_tiny_model("llama"), tokenizer, examples(12), None, cfg).model

    # slow twin: the textbook loop on the same global batches (one forward per step, mean token CE)
    model = build_tiny_model("llama")
    features, _ = encode_dataset(tokenizer, examples(12), 64)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, eps=1e-5)
    total, warm = 3, 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    order = _epoch_order(len(features), 0, 0)
    for step in range(total):
        batch = collate([features[i] for i in order[step * 4 : (step + 1) * 4]], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
    assert max_param_diff(trained, model) < TOL
    assert weights_fingerprint(trained) != weights_fingerprint(build_tiny_model("llama"))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_micro_batch_split_does_not_change_the_step(tmp_path, tokenizer, arch):
    runs = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = config(tmp_path / f"{micro}x{accum}", micro_batch_size=micro, grad_accum_steps=accum, max_steps=2)
        runs[(micro, accum)] = train_sft(build_tiny_model(arch), tokenizer, examples(), None, cfg).model
    assert max_param_diff(runs[(2, 2)], runs[(4, 1)]) < TOL
    assert max_param_diff(runs[(1, 4)], runs[(4, 1)]) < TOL


NO_VALUER = ["full", "random", "stm", "token_cleaning", "rho1", "lora"]


@pytest.mark.parametrize("name", NO_VALUER)
def test_policies_without_valuer_train(tmp_path, tokenizer, name):
    before = weights_fingerprint(build_tiny_model("qwen2"))
    result = train_sft(build_tiny_model("qwen2"), tokenizer, examples(), None, config(tmp_path, name, lr=1e-2))
    assert weights_fingerprint(result.model) != before
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["policy"] == name
    expected_kept = 1.0 if name in ("full", "lora") else 0.5
    assert abs(metrics["mean_kept_fraction"] - expected_kept) < 0.1


def test_non_finite_weights_never_become_a_final_checkpoint(tmp_path, tokenizer):
    """A finite but absurd learning rate overflows the weights in finite steps (AdamW moves each weight
    by about lr): the run raises instead of writing final/ and metrics.json."""
    with pytest.raises(FloatingPointError, match="non-finite values"):
        train_sft(build_tiny_model("llama"), tokenizer, examples(), None, config(tmp_path, "full", lr=1e308))
    assert not (tmp_path / "final").exists() and not (tmp_path / "metrics.json").exists()


def test_zero_mask_steps_are_skipped_and_counted(tmp_path, tokenizer):
    # STM with a perplexity threshold of 1 keeps only tokens with reference loss <= 0: none.
    cfg = config(tmp_path, "stm", policy=PolicyConfig(name="stm", stm_ppl_threshold=1.0))
    result = train_sft(build_tiny_model("llama"), tokenizer, examples(), None, cfg)
    assert result.metrics["all_masked_steps"] == 3
    assert weights_fingerprint(result.model) == weights_fingerprint(build_tiny_model("llama"))


def test_bad_examples_are_counted_or_named(tmp_path, tokenizer):
    data = examples() + [{"prompt": "hello", "response": "   "}, {"prompt": "x" * 200, "response": "ok"}]
    result = train_sft(build_tiny_model("llama"), tokenizer, data, None, config(tmp_path, max_steps=1))
    assert result.metrics["data"]["skipped"] == {"empty_response": 1, "prompt_too_long": 1}
    assert json.loads((tmp_path / "metrics.json").read_text())["data"]["skipped_total"] == 2
    bad = examples() + [{"prompt": "hello", "__source__": "train.jsonl:9"}]
    with pytest.raises(ValueError, match=r"train.jsonl:9.*'response'"):
        train_sft(build_tiny_model("llama"), tokenizer, bad, None, config(tmp_path / "bad"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_sft(build_tiny_model("llama"), tokenizer, examples(3), None, config(tmp_path / "few"))


def _poison(model, tokenizer, text):
    """NaN embeddings for the bytes of `text` (a forward hook: the weights stay finite): every sequence
    containing them has a NaN loss."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])

    def hook(module, args, output):
        hit = torch.isin(args[0], ids)  # (B, T)
        return output.masked_fill(hit[..., None], float("nan"))

    model.get_input_embeddings().register_forward_hook(hook)
    return model


def test_nan_loss_steps_are_skipped_then_stop_with_a_checkpoint(tmp_path, tokenizer):
    data = examples(8)
    for i in range(4):
        data[i] = {"prompt": f"q{i}", "response": "\u00a7"}  # the poisoned bytes appear only here
    model = _poison(build_tiny_model("llama"), tokenizer, "\u00a7")
    result = train_sft(model, tokenizer, data, None, config(tmp_path, micro_batch_size=1, grad_accum_steps=1, max_steps=8, max_nonfinite_steps=8))
    assert result.metrics["nonfinite_steps"] == 4  # one per poisoned example, each step skipped
    assert result.metrics["steps"] == 8
    model = _poison(build_tiny_model("llama"), tokenizer, "s")  # every response contains "s"
    with pytest.raises(RuntimeError, match="non-finite loss.*checkpoint saved"):
        train_sft(model, tokenizer, examples(), None, config(tmp_path / "nan", max_nonfinite_steps=2))
    assert (tmp_path / "nan" / "checkpoint" / "state.pt").is_file()


def test_final_checkpoint_is_a_standard_hf_model_with_metrics(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    result = train_sft(build_tiny_model("gemma3"), tokenizer, examples(), None, config(tmp_path))
    loaded = AutoModelForCausalLM.from_pretrained(result.final_dir, dtype=torch.float64)
    assert max_param_diff(loaded, result.model) == 0.0
    saved = json.loads((result.final_dir / "train_config.json").read_text())
    assert saved["policy"]["name"] == "full" and saved["objective"] == "sft"
    rows = (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 steps
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "kept_fraction.tsv").is_file()


VALUER = ["alphatoken", "adaptation_only", "stability_only", "direct_only", "causal_only", "no_fisher", "bottom", "soft", "alphatoken_stratified"]


def _valuation_setup(model):
    from alphatoken.blocks import scored_linears
    from alphatoken.valuation import ValuationConfig

    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(l.weight.shape, generator=g, dtype=l.weight.dtype) for n, l in scored_linears(model, 2).items()}
    val = [{"prompt": "q20: add 20 and 21", "response": "the sum is 41."}, {"prompt": "q30: add 30 and 31", "response": "the sum is 61."}]
    return fisher, val, ValuationConfig(last_k=2, window=4)


@pytest.mark.parametrize("name", VALUER)
def test_valuer_policies_train(tmp_path, tokenizer, name):
    model = build_tiny_model("llama")
    fisher, val, vcfg = _valuation_setup(model)
    cfg = config(tmp_path, name, lr=1e-2, grad_accum_steps=1, max_steps=2, valuation=vcfg)
    result = train_sft(model, tokenizer, examples(), val, cfg, fisher=fisher)
    assert weights_fingerprint(result.model) != weights_fingerprint(build_tiny_model("llama"))
    assert result.metrics["steps"] == 2
    if name != "soft":
        assert (tmp_path / "reference_weights.pt").is_file()
        assert abs(result.metrics["mean_kept_fraction"] - 0.5) < 0.1


def test_scoring_does_not_disturb_the_update(tmp_path, tokenizer):
    """AlphaToken with rho = 1 keeps every token: same weights as `full`, although the valuer scored
    every micro-batch on the training graph."""
    model = build_tiny_model("qwen2")
    fisher, val, vcfg = _valuation_setup(model)
    scored = train_sft(model, tokenizer, examples(), val, config(tmp_path / "a", "alphatoken", policy=PolicyConfig(name="alphatoken", rho=1.0), valuation=vcfg), fisher=fisher)
    plain = train_sft(build_tiny_model("qwen2"), tokenizer, examples(), None, config(tmp_path / "b"))
    assert scored.metrics["mean_kept_fraction"] == 1.0
    assert max_param_diff(scored.model, plain.model) == 0.0


def test_step_stats_sum_as_float64_and_reduce_in_one_all_reduce(monkeypatch):
    """StepStats adds each micro-batch's float32 sums as float64, bit for bit as a float64 tensor
    accumulator does, and sums its fields over the processes with one all-reduce of one float64
    tensor (here a stand-in for two identical ranks)."""
    import alphatoken.train.loop as loop

    g = torch.Generator().manual_seed(0)
    stats, twin = loop.StepStats(), torch.zeros(5, dtype=torch.float64)
    for _ in range(7):
        token_loss = torch.rand(3, 5, generator=g) * 10  # (B, T-1) float32
        valid = torch.rand(3, 5, generator=g) > 0.3
        w = valid * torch.rand(3, 5, generator=g)
        loss_sum, mask = (w * token_loss).sum(), torch.ones(3, 6)
        stats.add_micro_batch(loss_sum, w.sum(), valid, token_loss, mask)
        for i, value in enumerate((loss_sum, w.sum(), valid.sum(), (token_loss * valid).sum(), mask.sum())):
            twin[i] += float(value)
    assert [stats.loss_sum, stats.kept, stats.valid_tokens, stats.token_loss_sum, stats.tokens] == twin.tolist()
    assert torch.tensor(stats.loss_sum, dtype=torch.float32).item() != stats.loss_sum  # a float64 sum, not rounded to float32

    calls = []

    def all_reduce(tensor, world):  # two ranks holding the same sums
        calls.append((tensor.dtype, tensor.numel(), world))
        tensor.mul_(2)
        return tensor

    monkeypatch.setattr(loop, "_all_reduce", all_reduce)
    stats.pairs, stats.sft_normaliser = 3.0, 0.1
    before = dataclasses.asdict(stats)
    stats.all_reduce(2)
    assert calls == [(torch.float64, len(before), 2)]
    assert dataclasses.asdict(stats) == {name: 2 * value for name, value in before.items()}
    assert stats.normaliser(preference=True) == 6.0 and stats.normaliser(preference=False) == 0.2


def test_statistics_and_stop_flag_are_reduced_on_the_backends_device(monkeypatch):
    """NCCL reduces CUDA tensors only: a CPU tensor (the step's statistics, the stop flag) goes to the
    current CUDA device for the all-reduce and comes back; under gloo it stays on the CPU."""
    from alphatoken.train import loop

    calls = []


    monkeypatch.setattr(loop.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loop.dist, "all_reduce", lambda tensor, op: calls.append(tensor.device) or tensor.mul_(2))
    monkeypatch.setattr(loop.dist, "get_backend", lambda: "gloo")
    flag = torch.tensor([1.0])
    assert loop._all_reduce(flag, 2) is flag and flag.item() == 2.0 and calls == [torch.device("cpu")]
    monkeypatch.setattr(loop.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(loop.torch.cuda, "current_device", lambda: 0)
    assert loop._collective_device() == torch.device("cuda", 0)
    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device: moved.append(device) or self.clone())
    flag = torch.tensor([1.0])
    loop._all_reduce(flag, 2)
    assert moved == [torch.device("cuda", 0)] and flag.item() == 2.0  # reduced on the device, copied back
