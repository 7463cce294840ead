"""AlphaToken on LoRA factors (paper App. B.2.3): valuation, Monte-Carlo Fisher and the
`alphatoken_lora` training policy on peft-wrapped tiny float64 Llama models built here.

The engine is held to `bruteforce_scores_by_autograd` (tests/bruteforce.py), which materialises the
per-token factor gradients with plain autograd and takes the value path through the adapter by
autograd as well, so the hand-derived value change of a factor (s B D x for A, s D A x for B) is
checked, not assumed. That twin is itself checked against the explicit full-weight twin."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from alphatoken.blocks import is_lora_layer, scored_blocks, scored_linears
from alphatoken.fisher import (FisherConfig, FisherMismatchError, FisherPrompts, compute_fisher, load_fisher,
                               sample_responses, save_fisher, stop_token_ids)
from alphatoken.losses import kept_count
from alphatoken.models import build_tiny_model, save_pretrained, weights_fingerprint
from alphatoken.policies import POLICIES, Policy, PolicyConfig
import alphatoken.train.loop as loop
from alphatoken.train import TrainConfig, train_sft
from alphatoken.valuation import TokenValuer, ValuationConfig
from conftest import BATCHING_TOL
from bruteforce import bruteforce_scores, bruteforce_scores_by_autograd, proxy_direction, token_losses, validation_gradient
from test_fisher import assert_close, eos_prone, make_prompts, naive_fisher, naive_sample
from test_valuation import make_batch, rel_err

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMPONENTS = ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau", "total")
LAST_K, WINDOW, LAM, RANK, ALPHA = 2, 3, 1.5, 4, 8.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wrap(model, targets=ALL_TARGETS, perturb: float | None = 0.2, seed: int = 3, **lora):
    """peft LoRA (r=4, alpha=8: s=2, dropout 0) on `targets`; `perturb` adds noise to both factors so
    that B != 0 and every term is non-trivial (None keeps peft's initialisation, B = 0)."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets), **lora)
    wrapped = get_peft_model(model, config)
    if perturb is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    p.add_(perturb * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return wrapped


class Setup:
    """A LoRA-wrapped tiny Llama (`kv_heads` < 4: grouped-query attention), a training batch with left
    and right padding, a validation batch, and a Fisher/reference of the factors with the factors
    moved away from the reference."""

    def __init__(self, kv_heads: int, targets=ALL_TARGETS):
        base = build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa", num_key_value_heads=kv_heads)
        self.model = wrap(base, targets)
        g = torch.Generator().manual_seed(1)
        self.batch = make_batch(g, 3, 14, prompt=5, left_pad=[3, 0, 0], right_pad=[0, 2, 0])
        self.val_batch = make_batch(g, 2, 12, prompt=4, left_pad=[0, 2], right_pad=[1, 0])
        linears = scored_linears(self.model, LAST_K)
        self.reference = {n: lin.weight.detach() - 0.05 * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64)
                          for n, lin in linears.items()}
        self.fisher = {n: torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) for n, lin in linears.items()}

    def valuer(self, **overrides):
        cfg = ValuationConfig(**{"last_k": LAST_K, "window": WINDOW, "lam": LAM, **overrides})
        valuer = TokenValuer(self.model, cfg, fisher=self.fisher, reference=self.reference)
        valuer.set_validation(self.val_batch)
        return valuer

    def bruteforce(self, signal):
        target = validation_gradient(self.model, LAST_K, self.val_batch)
        proxy = proxy_direction(self.model, LAST_K, self.fisher, self.reference)
        return bruteforce_scores_by_autograd(self.model, self.batch, last_k=LAST_K, window=WINDOW, lam=LAM,
                                             signal=signal, target=target, proxy=proxy)


def assert_scores_close(scores, reference: dict, what: str, tol=1e-6):
    errors = {c: rel_err(getattr(scores, c), reference[c]) for c in COMPONENTS}
    bad = {c: e for c, e in errors.items() if not e <= tol}
    assert not bad, f"{what}: components off by relative error {bad} (tolerance {tol})"


# ----------------------------------------------------------------------------------------------------
# Which parameters are scored


def test_scored_parameters_are_the_factors_of_the_last_k_blocks():
    base = build_tiny_model("llama", dtype=torch.float64)
    full = scored_linears(base, LAST_K)
    # the full-model rule is unchanged: every nn.Linear of the last K blocks, in model order
    expected_full = [f"{n}.weight" for n, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and any(m is x for _, b in scored_blocks(base, LAST_K) for x in b.modules())]
    assert list(full) == expected_full and len(full) == 14
    model = wrap(base)
    names = list(scored_linears(model, LAST_K))
    assert names == [f"base_model.model.model.layers.{i}.{part}.{factor}.default.weight"
                     for i in (2, 3)
                     for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
                     for factor in ("lora_A", "lora_B")]
    params = dict(model.named_parameters())
    for name, linear in scored_linears(model, LAST_K).items():
        assert params[name] is linear.weight and params[name].requires_grad
    # adapters on q and v only: the frozen k/o/MLP linears are not scored either
    partial = wrap(build_tiny_model("llama", dtype=torch.float64), ("q_proj", "v_proj"))
    assert [n.split("layers.")[1] for n in scored_linears(partial, 1)] == [
        "3.self_attn.q_proj.lora_A.default.weight", "3.self_attn.q_proj.lora_B.default.weight",
        "3.self_attn.v_proj.lora_A.default.weight", "3.self_attn.v_proj.lora_B.default.weight"]


def test_factor_states_that_cannot_be_scored_are_refused():
    early = wrap(build_tiny_model("llama", dtype=torch.float64), layers_to_transform=[0])
    with pytest.raises(ValueError, match="none inside the last 2 decoder blocks"):
        scored_linears(early, 2)
    merged = wrap(build_tiny_model("llama", dtype=torch.float64))
    merged.merge_adapter()
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.q_proj.*merged"):
        scored_linears(merged, 2)
    dropout = get_peft_model(build_tiny_model("llama", dtype=torch.float64),
                             LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.1, target_modules=list(ALL_TARGETS)))
    with pytest.raises(ValueError, match="lora_dropout=0"):
        TokenValuer(dropout, ValuationConfig(last_k=2))
    with pytest.raises(ValueError, match="lora_dropout"):
        PolicyConfig(name="alphatoken_lora", lora_dropout=0.1)
    PolicyConfig(name="lora", lora_dropout=0.1)  # the plain LoRA baseline scores nothing: dropout is fine


# ----------------------------------------------------------------------------------------------------
# The value path through a factor


def test_value_change_of_a_factor_is_the_directional_derivative_of_v_proj():
    """The valuer's map from y_p = D x_p (x_p the factor's input) to the change of v_proj's output
    equals the Jacobian-vector product of the adapted v_proj in the direction D, by torch.func.jvp."""
    from torch.func import functional_call, jvp

    s = Setup(kv_heads=2)
    valuer = TokenValuer(s.model, ValuationConfig(last_k=LAST_K))
    v_proj = s.model.base_model.model.model.layers[3].self_attn.v_proj
    prefix = "base_model.model.model.layers.3.self_attn.v_proj."
    assert {n for n in valuer.value_weight if n.startswith(prefix)} == {prefix + "lora_A.default.weight",
                                                                        prefix + "lora_B.default.weight"}
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)  # (B, T, d)
    weights = {k: v.detach() for k, v in v_proj.named_parameters()}
    for factor in ("lora_A", "lora_B"):
        key = f"{factor}.default.weight"
        direction = torch.randn(weights[key].shape, generator=g, dtype=torch.float64)
        _, expected = jvp(lambda w: functional_call(v_proj, {**weights, key: w}, (x,)), (weights[key],), (direction,))
        factor_input = x if factor == "lora_A" else x @ weights["lora_A.default.weight"].T  # (B, T, d_in of the factor)
        got = valuer.value_maps[prefix + key](factor_input @ direction.T)
        assert expected.abs().max() > 1e-2
        assert rel_err(got, expected) <= 1e-12, factor


# ----------------------------------------------------------------------------------------------------
# Scores against the brute-force twin


@pytest.mark.parametrize("signal", ["self", "total"])
def test_autograd_twin_equals_the_explicit_twin_on_full_weights(signal):
    """The twin used below for the factors gives the explicit twin's values on an unwrapped model."""
    model = build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(1)
    batch = make_batch(g, 3, 14, prompt=5, left_pad=[3, 0, 0], right_pad=[0, 2, 0])
    val = make_batch(g, 2, 12, prompt=4, left_pad=[0, 2], right_pad=[1, 0])
    linears = scored_linears(model, LAST_K)
    reference = {n: l.weight.detach() - 0.05 * torch.randn(l.weight.shape, generator=g, dtype=torch.float64) for n, l in linears.items()}
    fisher = {n: torch.rand(l.weight.shape, generator=g, dtype=torch.float64) for n, l in linears.items()}
    kwargs = dict(last_k=LAST_K, window=WINDOW, lam=LAM, signal=signal, target=validation_gradient(model, LAST_K, val),
                  proxy=proxy_direction(model, LAST_K, fisher, reference))
    explicit = bruteforce_scores(model, batch, **kwargs)
    by_autograd = bruteforce_scores_by_autograd(model, batch, **kwargs)
    for c in COMPONENTS:
        assert explicit[c].abs().max() > 1e-4, c
        assert rel_err(by_autograd[c], explicit[c]) <= 1e-10, c


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def setup(request):
    return Setup(kv_heads=request.param)


@pytest.mark.parametrize("signal", ["self", "total"])
def test_engine_matches_bruteforce_on_factors(setup, signal):
    reference = setup.bruteforce(signal)
    for c in COMPONENTS:
        assert reference[c].abs().max() > 1e-4, f"brute-force {c} is trivially zero"
    valuer = setup.valuer(signal=signal)
    scores = valuer.score(setup.batch)
    assert_scores_close(scores, reference, f"lora/{signal}")
    assert (scores.total[setup.batch["labels"] == -100] == 0).all()
    # the training loop's path: the observed forward, total only
    with valuer.capture():
        out = setup.model(input_ids=setup.batch["input_ids"], attention_mask=setup.batch["attention_mask"])
    fast = valuer.score_captured(setup.batch, token_losses(out.logits, setup.batch["labels"]), components=False)
    assert rel_err(fast.total, reference["total"]) <= 1e-6
    assert all(p.grad is None for p in setup.model.parameters())


@pytest.mark.parametrize("form", ["contract", "ghost"])
def test_target_forms_agree_on_factors(setup, form):
    reference = setup.valuer(target_form="contract").score(setup.batch)
    scores = setup.valuer(target_form=form).score(setup.batch)
    for c in COMPONENTS:
        assert rel_err(getattr(scores, c), getattr(reference, c)) <= 1e-10, c


@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "down_proj"), ("k_proj", "o_proj", "up_proj")],
                         ids=["o-frozen", "v-frozen"])
@pytest.mark.parametrize("signal", ["self", "total"])
def test_partial_targets_match_bruteforce(targets, signal):
    """Adapters on some projections: a frozen o_proj (context error from the o_proj input's gradient),
    and a frozen v_proj (no scored weight feeds the values: the causal terms are exactly 0)."""
    s = Setup(kv_heads=2, targets=targets)
    reference = s.bruteforce(signal)
    scores = s.valuer(signal=signal).score(s.batch)
    assert_scores_close(scores, reference, f"{targets}/{signal}")
    if "v_proj" in targets:
        assert reference["tgt_cau"].abs().max() > 1e-4 and reference["prx_cau"].abs().max() > 1e-4
    else:
        assert (scores.tgt_cau == 0).all() and (scores.prx_cau == 0).all()
        assert reference["tgt_cau"].abs().max() == 0
    assert reference["tgt_dir"].abs().max() > 1e-4


def test_factor_signals_sum_to_the_factor_gradients(setup):
    """`total` signal: sum_p e_p (x) x_p of each factor equals its autograd gradient of L = sum_p l_p."""
    valuer = TokenValuer(setup.model, ValuationConfig(last_k=LAST_K, signal="total"))
    signals = valuer.signals(setup.batch)
    linears = scored_linears(setup.model, LAST_K)
    out = setup.model(input_ids=setup.batch["input_ids"], attention_mask=setup.batch["attention_mask"])
    grads = torch.autograd.grad(token_losses(out.logits, setup.batch["labels"]).sum(), [l.weight for l in linears.values()])
    for name, grad in zip(linears, grads):
        summed = torch.einsum("bto,bti->oi", signals.e[name], signals.x[name])
        assert grad.abs().max() > 0 and rel_err(summed, grad) <= 1e-10, name


# ----------------------------------------------------------------------------------------------------
# Fisher of the factors


def test_factor_fisher_matches_the_one_prompt_loop(tokenizer):
    plain = eos_prone(build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa"), tokenizer.eos_token_id)
    plain_samples = sample_responses(plain, tokenizer, make_prompts(), FisherConfig(last_k=LAST_K, max_new_tokens=6, batch_size=3))
    model = wrap(eos_prone(build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa"), tokenizer.eos_token_id))
    prompts = make_prompts()
    cfg = FisherConfig(last_k=LAST_K, max_new_tokens=6, batch_size=3)
    fisher = compute_fisher(model, tokenizer, prompts, cfg, progress=False)
    responses = sample_responses(model, tokenizer, prompts, cfg)
    # the samples are the wrapped model's own (adapters active), drawn as a token-by-token loop does
    assert responses == [naive_sample(model, p, i, cfg, stop_token_ids(model, tokenizer)) for i, p in enumerate(prompts)]
    assert responses != plain_samples
    assert len({len(r) for r in responses}) > 1  # padding after eos exercised
    assert list(fisher) == list(scored_linears(model, LAST_K))
    assert_close(fisher, naive_fisher(model, prompts, responses, LAST_K))
    assert all(f.abs().sum() > 0 for f in fisher.values())
    one_at_a_time = compute_fisher(model, tokenizer, prompts, FisherConfig(last_k=LAST_K, max_new_tokens=6, batch_size=1), progress=False)
    assert_close(one_at_a_time, fisher, tol=BATCHING_TOL)  # float32 steps inside (conftest.BATCHING_TOL)


def test_fisher_of_the_default_initialisation_has_zero_a(tokenizer):
    """peft initialises B = 0: the gradient reaching A, s B^T e x^T, vanishes, so F_A = 0 exactly."""
    model = wrap(build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa"), perturb=None)
    prompts = make_prompts(lengths=(3, 6, 4))
    responses = make_prompts(lengths=(4, 2, 5), seed=9)
    fisher = compute_fisher(model, tokenizer, prompts, FisherConfig(last_k=LAST_K, labels="empirical"),
                            responses=responses, progress=False)
    assert_close(fisher, naive_fisher(model, prompts, responses, LAST_K))
    for name, value in fisher.items():
        if ".lora_A." in name:
            assert (value == 0).all(), name
        else:
            assert value.abs().min() >= 0 and value.abs().max() > 0, name


def test_factor_fisher_file_round_trip_and_checks(tmp_path, tokenizer):
    model = wrap(build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa"))
    cfg = FisherConfig(last_k=LAST_K, max_new_tokens=4, batch_size=4)
    fisher = compute_fisher(model, tokenizer, make_prompts(), cfg, progress=False)
    path = save_fisher(tmp_path / "factors.safetensors", fisher, model, cfg, len(make_prompts()))
    loaded = load_fisher(path, model, cfg)
    assert list(loaded) == list(fisher) and all(torch.equal(loaded[n], fisher[n]) for n in fisher)
    base = build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa")
    with pytest.raises(FisherMismatchError, match=r"weights_fingerprint.*param_names.*missing"):
        load_fisher(path, base, cfg)  # the unwrapped model: other weights, other scored parameters
    full = compute_fisher(base, tokenizer, make_prompts(), cfg, progress=False)
    with pytest.raises(ValueError, match="missing parameter base_model.model.model.layers.2.self_attn.q_proj.lora_A"):
        save_fisher(tmp_path / "wrong.safetensors", full, model, cfg, 7)


# ----------------------------------------------------------------------------------------------------
# Training with the alphatoken_lora policy


def chat(n, offset=0):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(offset, offset + n)]


def fisher_prompts(tokenizer, last_k=LAST_K):
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"what is {i} + {i}?"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for i in range(3)]
    return FisherPrompts(prompts=prompts, config=FisherConfig(last_k=last_k, max_new_tokens=4, batch_size=2))


def lora_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), lr=1e-2, micro_batch_size=2, grad_accum_steps=2, max_steps=3, warmup_steps=1,
                checkpoint_every=1, policy=PolicyConfig(name="alphatoken_lora", rho=0.3, lora_rank=RANK, lora_alpha=ALPHA),
                valuation=ValuationConfig(last_k=LAST_K, window=4), progress=False, max_length=64)
    base.update(kw)
    return TrainConfig(**base)


def test_alphatoken_lora_policy_is_registered():
    policy = POLICIES["alphatoken_lora"]
    assert policy.needs_scores and policy.adapter == "lora" and policy.doc
    assert policy.rule is POLICIES["alphatoken"].rule


def test_alphatoken_lora_trains_only_the_adapters_on_the_top_tokens(tmp_path, tokenizer, monkeypatch):
    kept = []  # (scored tokens N, kept tokens, scores non-trivial) per micro-batch
    weights = Policy.weights

    def spy(self, ctx, config):
        w = weights(self, ctx, config)
        kept.append((int(ctx.valid.sum()), int((w > 0).sum()), float(ctx.scores.total.abs().max()), ctx.rho))
        return w

    monkeypatch.setattr(Policy, "weights", spy)
    save_checkpoint = loop.save_checkpoint
    states = {}  # step -> the checkpoint written then (a finished run removes its checkpoint/)

    def keep_state(directory, model, optimizer, scheduler, step, extra=None):
        path = save_checkpoint(directory, model, optimizer, scheduler, step, extra)
        states[step] = torch.load(path / "state.pt", weights_only=False)
        return path

    monkeypatch.setattr(loop, "save_checkpoint", keep_state)
    base = build_tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = train_sft(base, tokenizer, chat(8), chat(2, offset=20), lora_config(tmp_path, max_steps=4),
                       fisher_prompts=fisher_prompts(tokenizer))

    assert len(kept) == 4 * 2
    for n, k, magnitude, rho in kept:
        assert k == kept_count(n, rho) == math.ceil(round(rho * n, 9)), (n, k)
        assert magnitude > 0
    assert abs(result.metrics["mean_kept_fraction"] - 0.3) < 0.1
    # the Fisher and reference of the factors, from step 0
    names = list(scored_linears(wrap(build_tiny_model("llama"), perturb=None), LAST_K))
    fisher = load_file(str(tmp_path / "fisher.safetensors"))
    assert sorted(fisher) == sorted(names)  # (the file stores them sorted)
    assert all((fisher[n] == 0).all() for n in names if ".lora_A." in n)  # B = 0 at step 0
    assert all(fisher[n].abs().max() > 0 for n in names if ".lora_B." in n)
    reference = torch.load(tmp_path / "reference_weights.pt", weights_only=True)
    assert list(reference) == names and all((reference[n] == 0).all() for n in names if ".lora_B." in n)
    # mid-run state (checkpoint after step 3; step 1 has lr 0 in warm-up, step 2 moves B away from 0,
    # after which A receives gradient): the backbone is untouched, every factor moved
    assert not (tmp_path / "checkpoint").exists()
    state = states[3]
    assert state["step"] == 3
    adapters = {k: v for k, v in state["model"].items() if "lora_" in k}
    backbone = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                for k, v in state["model"].items() if "lora_" not in k}
    assert backbone.keys() == before.keys()
    assert all(torch.equal(backbone[k], before[k]) for k in before)
    for name in names:
        assert not torch.equal(adapters[name], reference[name]), name
    # the result is the merged model: a plain checkpoint, different from the backbone
    assert not any(is_lora_layer(m) for m in result.model.modules())
    assert weights_fingerprint(result.model) != weights_fingerprint(build_tiny_model("llama"))
    assert json.loads((tmp_path / "metrics.json").read_text())["policy"] == "alphatoken_lora"


def test_fisher_prompts_misuse_is_refused(tmp_path, tokenizer):
    prompts = fisher_prompts(tokenizer)
    with pytest.raises(ValueError, match="either `fisher` or `fisher_prompts`"):
        train_sft(build_tiny_model("llama"), tokenizer, chat(8), chat(2, 20), lora_config(tmp_path / "a"),
                  fisher={}, fisher_prompts=prompts)
    with pytest.raises(ValueError, match="does not score tokens"):
        train_sft(build_tiny_model("llama"), tokenizer, chat(8), chat(2, 20),
                  lora_config(tmp_path / "b", policy=PolicyConfig(name="lora")), fisher_prompts=prompts)
    with pytest.raises(ValueError, match="last_k=1 is below valuation.last_k=2"):
        train_sft(build_tiny_model("llama"), tokenizer, chat(8), chat(2, 20), lora_config(tmp_path / "c"),
                  fisher_prompts=fisher_prompts(tokenizer, last_k=1))
    with pytest.raises(KeyError, match="lora_A"):  # a Fisher of the full weights does not fit the factors
        full = {n: torch.ones_like(l.weight) for n, l in scored_linears(build_tiny_model("llama"), LAST_K).items()}
        train_sft(build_tiny_model("llama"), tokenizer, chat(8), chat(2, 20), lora_config(tmp_path / "d"), fisher=full)


WORKER = r'''
import json, os, signal, sys
import torch
import alphatoken.train.loop as loop
from alphatoken.fisher import FisherConfig, FisherPrompts
from alphatoken.models import build_tiny_model, byte_tokenizer
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, train_sft
from alphatoken.valuation import ValuationConfig

out, kill_after = sys.argv[1], int(sys.argv[2])
save_checkpoint = loop.save_checkpoint

def save_then_kill(directory, model, optimizer, scheduler, step, extra=None):
    path = save_checkpoint(directory, model, optimizer, scheduler, step, extra)
    if step == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

loop.save_checkpoint = save_then_kill
tokenizer = byte_tokenizer()
examples = [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(12)]
prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"what is {i} + {i}?"}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False) for i in range(3)]
config = TrainConfig(output_dir=out, lr=1e-2, micro_batch_size=2, grad_accum_steps=2, max_steps=4, warmup_steps=1,
                     checkpoint_every=1, policy=PolicyConfig(name="alphatoken_lora", rho=0.5, lora_rank=4, lora_alpha=8.0),
                     valuation=ValuationConfig(last_k=2, window=4), progress=False, max_length=64)
result = train_sft(build_tiny_model("llama", dtype=torch.float32), tokenizer, examples[2:], examples[:2], config,
                   fisher_prompts=FisherPrompts(prompts, FisherConfig(last_k=2, max_new_tokens=4, batch_size=2)))
torch.save(result.model.state_dict(), os.path.join(out, "weights.pt"))
print(json.dumps({"steps": result.steps}))
'''


def test_alphatoken_lora_resumes_bit_identically_after_sigkill(tmp_path):
    """Killed right after the step-2 checkpoint and rerun: the cached Fisher and reference of the
    factors (checked against the seeded adapter initialisation) and the checkpoint give the same
    final weights as an uninterrupted run."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def run(out, kill_after=-1):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_after)], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run(tmp_path / "killed", kill_after=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "fisher.safetensors").is_file() and not (tmp_path / "killed" / "weights.pt").exists()
    resumed = run(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "weights differ after resume"
    assert not torch.equal(a["model.layers.3.self_attn.v_proj.weight"],
                           build_tiny_model("llama", dtype=torch.float32).state_dict()["model.layers.3.self_attn.v_proj.weight"])


# ----------------------------------------------------------------------------------------------------
# The train stage


def _write_split(path: Path, rows):
    path.write_text("".join(json.dumps({"id": f"x{i}", "source": "test", "messages": [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}) + "\n"
        for i, r in enumerate(rows)))
    return str(path)


def test_train_stage_runs_alphatoken_lora_from_fisher_prompts(tmp_path, tokenizer, capsys):
    from alphatoken.stages.train import main

    model_dir = save_pretrained(build_tiny_model("llama", dtype=torch.float32), tokenizer, tmp_path / "model")
    params = tmp_path / "params.yaml"
    params.write_text(
        "train:\n  lr: 0.01\n  micro_batch_size: 2\n  max_steps: 2\n  warmup_steps: 1\n  max_length: 64\n  progress: false\n"
        "  rho: 0.5\n  lora_rank: 4\n  lora_alpha: 8.0\n  dtype: float32\n"
        "valuation:\n  last_k: 2\n  window: 4\n"
        "fisher:\n  last_k: 2\n  max_new_tokens: 4\n  batch_size: 2\n  max_length: 64\n  dtype: float64\n")
    train, val = _write_split(tmp_path / "train.jsonl", chat(6)), _write_split(tmp_path / "val.jsonl", chat(2, 20))
    fisher = _write_split(tmp_path / "fisher.jsonl", chat(3, 40))
    argv = ["--params", str(params), "--section", "train", "--valuation-section", "valuation", "--objective", "sft",
            "--method", "alphatoken_lora", "--model", str(model_dir), "--train-data", train, "--val-data", val]
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path / "none")])
    assert "pass --fisher-prompts" in capsys.readouterr().err
    main(argv + ["--out", str(tmp_path / "run"), "--fisher-prompts", fisher, "--fisher", str(tmp_path / "unused.safetensors")])
    out = capsys.readouterr().out
    assert "3 Fisher prompts" in out and "unused.safetensors (full weights) is not used" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["policy"] == "alphatoken_lora" and metrics["steps"] == 2
    fisher = load_file(str(tmp_path / "run" / "fisher.safetensors"))
    assert len(fisher) == 28 and all(".lora_" in n for n in fisher)
