"""The valuation on the paper's real architectures, as tiny float64 models built here:
Gemma-3-4B's multimodal wrapper (`Gemma3ForConditionalGeneration`), Qwen-3.5's wrapper and its hybrid
decoder (Gated-DeltaNet linear-attention blocks between gated full-attention blocks). The shared
exactness suite (tests/test_valuation.py, ARCHS) runs both against the brute-force twin at
last_k = 2; this file adds what is particular to them."""

import pytest
import torch
from torch import nn

from alphatoken.blocks import LINEAR_ATTENTION, SOFTMAX_ATTENTION, decoder_blocks, scored_linears, token_mixer
from alphatoken.fisher import FisherConfig, compute_fisher
from alphatoken.models import build_tiny_model, byte_tokenizer, multimodal_state_dict
from alphatoken.valuation import TokenValuer, ValuationConfig
from bruteforce import bruteforce_scores, proxy_direction, validation_gradient
from test_fisher import make_prompts, naive_fisher
from test_valuation import COMPONENTS, Setup, assert_scores_close, make_batch, rel_err

WINDOW, LAM = 3, 1.5


def _mm_name(name: str) -> str:
    """Parameter name of the text-only model -> the same weight inside the multimodal wrapper."""
    return name if name.startswith("lm_head.") else "model.language_model." + name.removeprefix("model.")


@pytest.mark.parametrize("signal", ["self", "total"])
def test_multimodal_wrapper_scores_equal_the_text_only_model(signal):
    """Gemma3ForConditionalGeneration with the decoder weights of a text-only Gemma-3 gives the same
    token values: the valuer scores the language model's last K blocks, the vision tower is ignored."""
    text = Setup("gemma3")
    wrapped = build_tiny_model("gemma3_mm", dtype=torch.float64, attn_implementation="sdpa")
    assert type(wrapped).__name__ == "Gemma3ForConditionalGeneration"
    mapped = lambda d: {_mm_name(n): t for n, t in d.items()}  # noqa: E731
    cfg = ValuationConfig(last_k=2, window=WINDOW, lam=LAM, signal=signal)
    valuer = TokenValuer(wrapped, cfg, fisher=mapped(text.fisher), reference=mapped(text.reference))
    assert list(valuer.linears) == [_mm_name(n) for n in scored_linears(text.model, 2)]
    valuer.set_validation(text.val_batch)
    got = valuer.score(text.batch)
    expected = text.valuer(signal=signal).score(text.batch)
    for c in COMPONENTS:
        assert expected.__dict__[c].abs().max() > 1e-4, c
        assert rel_err(getattr(got, c), getattr(expected, c)) <= 1e-12, c


def test_decoder_blocks_of_the_qwen3_5_multimodal_wrapper():
    """Qwen3_5ForConditionalGeneration: the blocks are the text decoder's (`model.language_model.layers`),
    never the vision tower's, and the wrapper's scores are the text-only hybrid's."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = Setup("qwen3_5")
    config = Qwen3_5Config(
        text_config=text.model.config.to_dict(), tie_word_embeddings=False,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, num_position_embeddings=16),
        image_token_id=259, video_token_id=258, vision_start_token_id=257, vision_end_token_id=256,
    )
    config._attn_implementation = "sdpa"
    wrapped = Qwen3_5ForConditionalGeneration(config).to(torch.float64).eval()
    wrapped.load_state_dict(multimodal_state_dict(text.model.state_dict(), wrapped.state_dict()))
    assert decoder_blocks(wrapped) is wrapped.model.language_model.layers
    assert all(".visual." not in n for n in scored_linears(wrapped, 4))
    mapped = lambda d: {_mm_name(n): t for n, t in d.items()}  # noqa: E731
    valuer = TokenValuer(wrapped, ValuationConfig(last_k=2, window=WINDOW, lam=LAM),
                         fisher=mapped(text.fisher), reference=mapped(text.reference))
    valuer.set_validation(text.val_batch)
    got, expected = valuer.score(text.batch), text.valuer().score(text.batch)
    for c in COMPONENTS:
        assert rel_err(getattr(got, c), getattr(expected, c)) <= 1e-12, c


def test_hybrid_block_kinds():
    model = build_tiny_model("qwen3_5", dtype=torch.float64)
    kinds = [token_mixer(block)[0] for block in decoder_blocks(model)]
    assert kinds == [LINEAR_ATTENTION, SOFTMAX_ATTENTION, LINEAR_ATTENTION, SOFTMAX_ATTENTION]
    assert kinds == [{"linear_attention": LINEAR_ATTENTION, "full_attention": SOFTMAX_ATTENTION}[t]
                     for t in model.config.layer_types]
    # the last K blocks are scored whatever their mixer: the DeltaNet's linears and MLP of block 2 too
    names = scored_linears(model, 2)
    assert {n.split(".")[2] for n in names} == {"2", "3"}
    assert "model.layers.2.linear_attn.in_proj_qkv.weight" in names
    valuer = TokenValuer(model, ValuationConfig(last_k=2))
    assert set(valuer.value_weight.values()) == {3}  # only the attention block has a value path


@pytest.fixture(scope="module")
def hybrid():
    return Setup("qwen3_5")


@pytest.mark.parametrize("last_k", [3, 4])
@pytest.mark.parametrize("signal", ["self", "total"])
def test_hybrid_matches_bruteforce_across_mixed_blocks(hybrid, last_k, signal):
    """last_k = 3 is attention, DeltaNet, attention: the attention block's context errors and the
    DeltaNet's errors are taken through a DeltaNet block above them; last_k = 4 adds the first
    DeltaNet. The model's delta rule computes in float32, so agreement is to float32's precision."""
    s = hybrid
    linears = scored_linears(s.model, last_k)
    g = torch.Generator().manual_seed(7)
    reference = {n: lin.weight.detach() - 0.05 * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64)
                 for n, lin in linears.items()}
    fisher = {n: torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) for n, lin in linears.items()}
    valuer = TokenValuer(s.model, ValuationConfig(last_k=last_k, window=WINDOW, lam=LAM, signal=signal),
                         fisher=fisher, reference=reference)
    valuer.set_validation(s.val_batch)
    expected = bruteforce_scores(
        s.model, s.batch, last_k=last_k, window=WINDOW, lam=LAM, signal=signal,
        target=validation_gradient(s.model, last_k, s.val_batch), proxy=proxy_direction(s.model, last_k, fisher, reference),
    )
    for c in COMPONENTS:
        assert expected[c].abs().max() > 1e-4, f"brute-force {c} is trivially zero"
    assert_scores_close(valuer.score(s.batch), expected, f"qwen3_5/last_k={last_k}/{signal}")


def test_self_signal_needs_the_own_position_deltanet(hybrid):
    """Without the own-position re-run of the DeltaNet blocks the `self` errors of everything below a
    DeltaNet would carry later tokens' losses: the scores then differ from the brute force (so the
    exactness test above can fail)."""
    import alphatoken.valuation.signals as signals_module

    s = hybrid
    expected = s.bruteforce("self")
    saved = signals_module.linear_attention_modules
    signals_module.linear_attention_modules = lambda blocks: {}
    try:
        plain = s.valuer(signal="self").score(s.batch)
    finally:
        signals_module.linear_attention_modules = saved
    assert rel_err(plain.tgt_dir, expected["tgt_dir"]) > 1e-3


def test_context_error_includes_the_output_gate(hybrid):
    """Qwen-3.5 attention: o_proj reads attn_out * sigmoid(gate), gate the second half of q_proj's
    per-head output. The context error is the error of attn_out, c = sigmoid(gate) * (e_o W_o)."""
    s = hybrid
    valuer = s.valuer(signal="total")
    sig = valuer.signals(s.batch)
    attn = decoder_blocks(s.model)[3].self_attn
    names = {lin: n for n, lin in valuer.linears.items()}
    q_out = sig.x[names[attn.q_proj]] @ attn.q_proj.weight.detach().T  # (B, T, H * 2 hd)
    B, T, _ = q_out.shape
    gate = q_out.view(B, T, -1, 2 * attn.head_dim)[..., attn.head_dim:]  # (B, T, H, hd)
    o_input_err = (sig.e[names[attn.o_proj]] @ attn.o_proj.weight.detach()).view(B, T, -1, attn.head_dim)
    assert torch.allclose(sig.ctx_err[3], torch.sigmoid(gate) * o_input_err, rtol=1e-10, atol=1e-14)
    assert rel_err(sig.ctx_err[3], o_input_err) > 0.1  # the gate is far from 1: leaving it out would show


def test_own_position_deltanet_against_a_per_position_loop():
    """The re-run's DeltaNet: the model's output values exactly, and for every position t the gradient
    of <g_t, y_t> alone with respect to the block's projections (one backward per position)."""
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    from alphatoken.valuation.linear_attention import own_position_forward

    model = build_tiny_model("qwen3_5", dtype=torch.float64)
    module = decoder_blocks(model)[2].linear_attn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the 2D mask zeroes those inputs
    projections = {n: getattr(module, n) for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b")}
    outputs = {}
    handles = [lin.register_forward_hook(lambda m, a, o, n=n: outputs.__setitem__(n, o)) for n, lin in projections.items()]
    try:
        y_model = module(x, attention_mask=mask)
        cot = torch.randn(y_model.shape, generator=g, dtype=torch.float64)
        looped = {n: torch.zeros_like(o) for n, o in outputs.items()}
        for t in range(x.shape[1]):
            grads = torch.autograd.grad((cot[:, t] * y_model[:, t]).sum(), list(outputs.values()), retain_graph=True)
            for n, grad in zip(outputs, grads):
                looped[n][:, t] = grad[:, t]
        y = own_position_forward(module, modeling.torch_chunk_gated_delta_rule, x, attention_mask=mask)
        grads = dict(zip(outputs, torch.autograd.grad((cot * y).sum(), list(outputs.values()))))
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(y, y_model)
    # Both sides differentiate the model's float32 arithmetic (the delta rule casts its inputs to
    # float32, and the log decay is computed from `a.float()`), in different orders: agreement is to
    # float32 precision, loosest for the small decay and write-strength gradients (a, b).
    tolerance = {"in_proj_qkv": 1e-6, "in_proj_z": 1e-12, "in_proj_a": 1e-5, "in_proj_b": 1e-5}
    for n, grad in grads.items():
        assert looped[n].abs().max() > 0, n
        err = rel_err(grad, looped[n])
        assert err <= tolerance[n], f"{n}: relative error {err:.2e}"
    assert "forward" not in module.__dict__


def test_unknown_token_mixer_is_refused():
    model = build_tiny_model("llama", dtype=torch.float64)

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32, dtype=torch.float64)

    decoder_blocks(model)[-1].self_attn = Mixer()
    assert "model.layers.3.self_attn.proj.weight" in scored_linears(model, 1)  # the Fisher still sees its linears
    with pytest.raises(ValueError, match="decoder block 3.*neither"):
        TokenValuer(model, ValuationConfig(last_k=1))


@pytest.mark.parametrize("arch", ["gemma3_mm", "qwen3_5"])
def test_fisher_on_the_wrapper_and_the_hybrid(arch):
    """Diagonal Fisher of the scored weights (the language model's for the wrapper, DeltaNet linears
    included for the hybrid) equals the per-prompt autograd loop; the sampled Fisher and the
    Kronecker factors are finite and shaped like the weights."""
    tokenizer = byte_tokenizer()
    model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa", seed=2)
    prompts = make_prompts()
    responses = make_prompts(lengths=(4, 1, 6, 3, 2, 5, 8), seed=9)
    cfg = FisherConfig(last_k=3, labels="empirical", batch_size=4)
    fisher = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
    expected = naive_fisher(model, prompts, responses, cfg.last_k)
    assert list(fisher) == list(scored_linears(model, 3))
    for name, value in expected.items():
        assert value.abs().sum() > 0, name
        err = ((fisher[name] - value).norm() / value.norm()).item()
        assert err <= 1e-6, f"{name}: relative error {err:.2e}"
    sampled = compute_fisher(model, tokenizer, prompts[:3], FisherConfig(last_k=2, max_new_tokens=4, batch_size=2),
                             progress=False)
    params = dict(model.named_parameters())
    for name, value in sampled.items():
        assert value.shape == params[name].shape and torch.isfinite(value).all() and value.abs().sum() > 0, name
    kfac = compute_fisher(model, tokenizer, prompts, FisherConfig(last_k=2, labels="empirical", kind="kronecker",
                                                                  batch_size=4), responses=responses, progress=False)
    assert len(kfac) == 2 * len(sampled)
    for name in sampled:
        d_out, d_in = params[name].shape
        a, s = kfac[name + ".kfac_A"], kfac[name + ".kfac_S"]
        assert a.shape == (d_in, d_in) and s.shape == (d_out, d_out), name
        assert torch.isfinite(a).all() and torch.isfinite(s).all() and s.abs().sum() > 0, name


def test_hybrid_validation_in_chunks_and_padding(hybrid):
    """Left and right padding in a DeltaNet block: the validation direction from one sequence per
    forward equals the whole batch's (the 2D padding mask zeroes padded inputs, causal scan)."""
    g = torch.Generator().manual_seed(11)
    val = make_batch(g, 3, 11, prompt=3, left_pad=[2, 0, 0], right_pad=[0, 3, 0])
    whole = hybrid.valuer(val_chunk_size=8)
    whole.set_validation(val)
    chunked = hybrid.valuer(val_chunk_size=1)
    chunked.set_validation(val)
    for c in COMPONENTS:
        assert rel_err(getattr(chunked.score(hybrid.batch), c), getattr(whole.score(hybrid.batch), c)) <= 1e-6, c


@pytest.mark.parametrize("arch", ["gemma3_mm", "qwen3_5"])
def test_alphatoken_trains_the_wrapper_and_the_hybrid(tmp_path, arch):
    """The training loop's form of the valuation (capture on the training forward, shared head) on both
    models: two AlphaToken steps keep half of the tokens and move the weights; with rho = 1 the update
    equals plain SFT, so scoring on the training graph leaves the update alone."""
    from alphatoken.models import weights_fingerprint
    from alphatoken.policies import PolicyConfig
    from alphatoken.train import TrainConfig, train_sft

    tokenizer = byte_tokenizer()
    data = [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(6)]
    val = [{"prompt": "q20: add 20 and 21", "response": "the sum is 41."}]

    def run(out, policy, rho):
        model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")
        g = torch.Generator().manual_seed(0)
        fisher = {n: torch.rand(lin.weight.shape, generator=g, dtype=torch.float64)
                  for n, lin in scored_linears(model, 2).items()}
        cfg = TrainConfig(output_dir=str(tmp_path / out), lr=1e-2, micro_batch_size=2, grad_accum_steps=1, max_steps=2,
                          warmup_steps=1, adam_eps=1e-5, policy=PolicyConfig(name=policy, rho=rho), progress=False,
                          max_length=64, valuation=ValuationConfig(last_k=2, window=4))
        return train_sft(model, tokenizer, data, val if policy == "alphatoken" else None, cfg,
                         fisher=fisher if policy == "alphatoken" else None)

    half = run("half", "alphatoken", 0.5)
    assert half.metrics["steps"] == 2 and abs(half.metrics["mean_kept_fraction"] - 0.5) < 0.1
    start = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")
    assert weights_fingerprint(half.model) != weights_fingerprint(start)
    every = run("every", "alphatoken", 1.0)
    plain = run("plain", "full", 0.5)
    assert every.metrics["mean_kept_fraction"] == 1.0
    params = dict(plain.model.named_parameters())
    for name, p in every.model.named_parameters():
        assert torch.equal(p, params[name]), name
