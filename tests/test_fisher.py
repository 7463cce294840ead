"""Monte-Carlo Fisher: the batched hook-based computation against a one-prompt-at-a-time
`torch.autograd.grad` loop, the seeded sampler against a plain token-by-token loop, and the cache
file's checks. Tiny float64 models built here; nothing downloaded."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alphatoken.blocks import scored_linears
from alphatoken.fisher import (
    FisherConfig,
    FisherMismatchError,
    compute_fisher,
    load_fisher,
    prompt_seed,
    read_fisher_metadata,
    sample_responses,
    sampling_log_probs,
    save_fisher,
    stop_token_ids,
)
from alphatoken.models import build_tiny_model
from conftest import BATCHING_TOL

ARCHS = ("llama", "qwen2", "gemma3")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread
    hand-offs cost ~30x in wall time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
PROMPT_LENGTHS = (3, 9, 5, 1, 7, 4, 6)  # 7 prompts: batch sizes 2, 3, 4 leave a partial last batch


def make_prompts(lengths=PROMPT_LENGTHS, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in lengths]


def eos_prone(model, eos_id, boost=3.0):
    """Give the tiny model an lm_head bias favouring eos (~7% per step at temperature 1 instead of ~0.4%), so sampled
    responses of one batch end at different lengths and the padding after eos is exercised."""
    head = model.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos_id] = boost
    model.lm_head = biased
    return model


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    """float64 with SDPA attention: batched left-padded generation runs as is (float64 eager attention
    turns left padding into NaN, see the fallback test)."""
    from alphatoken.models import byte_tokenizer

    model = build_tiny_model(request.param, dtype=torch.float64, attn_implementation="sdpa")
    return eos_prone(model, byte_tokenizer().eos_token_id)


# ----------------------------------------------------------------------------------------------------
# Obviously-correct twins


def naive_fisher(model, prompts, responses, last_k):
    """mean_n (d/dW sum_{t in y_n} log p(y_t | x_n, y_<t))^2, one prompt at a time, unpadded."""
    linears = scored_linears(model, last_k)
    weights = [linear.weight for linear in linears.values()]
    total = [torch.zeros_like(w) for w in weights]
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)  # (L, V)
        log_likelihood = sum(logp[p, ids[0, p + 1]] for p in range(len(prompt) - 1, len(prompt) + len(response) - 1))
        grads = torch.autograd.grad(log_likelihood, weights)
        total = [t + g.square() for t, g in zip(total, grads)]
    return {name: t / len(prompts) for name, t in zip(linears, total)}


def per_sample_gradients(model, prompts, responses, last_k):
    weights = [linear.weight for linear in scored_linears(model, last_k).values()]
    result = []
    for prompt, response in zip(prompts, responses):
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
        log_likelihood = sum(logp[p, ids[0, p + 1]] for p in range(len(prompt) - 1, len(prompt) + len(response) - 1))
        result.append(torch.autograd.grad(log_likelihood, weights))
    return result


def naive_sample(model, prompt, index, cfg, stop_ids):
    """Token-by-token sampling without cache or padding: recompute the logits of the whole sequence,
    restrict to the nucleus (tokens whose more probable tokens hold mass < top_p), Gumbel-max with the
    prompt's own generator."""
    generator = torch.Generator().manual_seed(prompt_seed(cfg.seed, index))
    sequence, response = list(prompt), []
    with torch.no_grad():
        for _ in range(cfg.max_new_tokens):
            logits = model(input_ids=torch.tensor([sequence])).logits[0, -1].float()  # (V,)
            probs = torch.softmax(logits / cfg.temperature, dim=-1)
            sorted_probs, order = torch.sort(probs, descending=True)
            mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs
            keep = torch.zeros_like(probs, dtype=torch.bool)
            keep[order[mass_before < cfg.top_p]] = True
            u = torch.rand(probs.shape[0], generator=generator, dtype=torch.float32)
            score = torch.where(keep, torch.log(probs), torch.tensor(float("-inf"))) - torch.log(-torch.log(u))
            token = int(score.argmax())
            response.append(token)
            sequence.append(token)
            if token in stop_ids:
                break
    return response


def assert_close(fast, slow, tol=1e-6):
    assert sorted(fast) == sorted(slow)
    for name in slow:
        err = (fast[name] - slow[name]).norm() / slow[name].norm().clamp_min(1e-300)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"


# ----------------------------------------------------------------------------------------------------
# Sampling


def test_sampler_matches_token_by_token_loop_and_ignores_batch_size(model, tokenizer):
    prompts = make_prompts()
    cfg = FisherConfig(last_k=2, temperature=0.8, top_p=0.9, max_new_tokens=8, seed=3, batch_size=3)
    stop_ids = stop_token_ids(model, tokenizer)
    sampled = sample_responses(model, tokenizer, prompts, cfg)
    expected = [naive_sample(model, p, i, cfg, stop_ids) for i, p in enumerate(prompts)]
    assert sampled == expected
    ended = [r[-1] in stop_ids for r in sampled]
    assert any(ended) and not all(ended), "test needs rows stopping at eos and rows running to max_new_tokens"
    assert len({len(r) for r in sampled}) > 1
    for batch_size in (1, 4, 7):
        assert sample_responses(model, tokenizer, prompts, dataclasses.replace(cfg, batch_size=batch_size)) == sampled
    assert sample_responses(model, tokenizer, prompts, cfg) == sampled  # reproducible
    assert sample_responses(model, tokenizer, prompts, dataclasses.replace(cfg, seed=4)) != sampled


def test_padding_nan_falls_back_to_one_prompt_at_a_time(tokenizer, caplog):
    model = eos_prone(build_tiny_model("qwen2", dtype=torch.float64, attn_implementation="eager"),
                      tokenizer.eos_token_id)
    padded = model(input_ids=torch.tensor([[258, 8, 9]]), attention_mask=torch.tensor([[0, 1, 1]])).logits
    assert padded.isnan().any()  # the kernel behaviour the fallback exists for
    prompts = make_prompts()
    cfg = FisherConfig(last_k=1, max_new_tokens=6, seed=2, batch_size=4)
    with caplog.at_level("WARNING", logger="alphatoken.fisher"):
        sampled = sample_responses(model, tokenizer, prompts, cfg)
    assert "one at a time" in caplog.text
    assert sampled == [naive_sample(model, p, i, cfg, stop_token_ids(model, tokenizer)) for i, p in enumerate(prompts)]
    fisher = compute_fisher(model, tokenizer, prompts, cfg, progress=False)
    assert_close(fisher, naive_fisher(model, prompts, sampled, cfg.last_k))


def test_sampling_distribution_is_the_tempered_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    logq = sampling_log_probs(logits, temperature=1.5, top_p=1.0)
    assert torch.allclose(logq.exp(), torch.softmax(logits / 1.5, -1), atol=1e-6)
    probs = torch.softmax(logits, -1)[0]  # ~ [0.61, 0.22, 0.14, 0.03, 0.004]
    logq = sampling_log_probs(logits, temperature=1.0, top_p=0.8)
    kept = torch.isfinite(logq[0])
    assert kept.tolist() == [True, True, False, False, False]  # 0.61 < 0.8 <= 0.61 + 0.22
    assert torch.allclose(logq[0, :2].exp(), probs[:2] / probs[:2].sum(), atol=1e-6)
    smallest = sampling_log_probs(logits, temperature=1.0, top_p=1e-9)  # the nucleus is never empty
    assert torch.isfinite(smallest[0]).tolist() == [True, False, False, False, False] and smallest[0, 0] == 0
    # Gumbel-max with the library's noise draws from q: empirical frequencies over many draws
    from alphatoken.fisher import gumbel_noise

    generator = torch.Generator().manual_seed(0)
    logq = sampling_log_probs(logits, temperature=1.0, top_p=0.95)
    draws = torch.stack([(logq[0] + gumbel_noise(5, generator, "cpu")).argmax() for _ in range(20000)])
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    assert (freq - logq[0].exp()).abs().max() < 0.015
    assert freq[4] == 0  # outside the nucleus: never drawn


# ----------------------------------------------------------------------------------------------------
# Fisher values


@pytest.mark.parametrize("batch_size", [3, 2])
def test_sampled_fisher_matches_per_prompt_autograd_loop(model, tokenizer, batch_size):
    prompts = make_prompts()
    cfg = FisherConfig(last_k=2, max_new_tokens=6, seed=0, batch_size=batch_size)
    fisher = compute_fisher(model, tokenizer, prompts, cfg, progress=False)
    responses = sample_responses(model, tokenizer, prompts, cfg)
    assert len({len(r) for r in responses}) > 1  # padding after eos exercised
    expected = naive_fisher(model, prompts, responses, cfg.last_k)
    assert_close(fisher, expected)
    for name, value in fisher.items():
        assert value.dtype == torch.float64 and value.device.type == "cpu"
        assert value.shape == dict(model.named_parameters())[name].shape
        assert value.abs().sum() > 0


def test_sampled_fisher_does_not_depend_on_batch_size(tokenizer):
    model = eos_prone(build_tiny_model("llama", dtype=torch.float64), tokenizer.eos_token_id)
    prompts = make_prompts()
    base = FisherConfig(last_k=3, max_new_tokens=5, seed=7, batch_size=1)
    one = compute_fisher(model, tokenizer, prompts, base, progress=False)
    for batch_size in (4, 7):
        assert_close(compute_fisher(model, tokenizer, prompts, dataclasses.replace(base, batch_size=batch_size),
                                    progress=False), one, tol=BATCHING_TOL)
    other_seed = compute_fisher(model, tokenizer, prompts, dataclasses.replace(base, seed=8), progress=False)
    assert any(not torch.allclose(other_seed[n], one[n]) for n in one)


@pytest.mark.parametrize("arch", ARCHS)
def test_empirical_fisher_uses_the_given_responses(arch, tokenizer):
    model = build_tiny_model(arch, dtype=torch.float64, seed=2)
    prompts = make_prompts()
    responses = make_prompts(lengths=(4, 1, 6, 3, 2, 5, 8), seed=9)
    cfg = FisherConfig(last_k=3, labels="empirical", batch_size=4)
    fisher = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
    assert_close(fisher, naive_fisher(model, prompts, responses, cfg.last_k))
    shuffled = compute_fisher(model, tokenizer, prompts, cfg, responses=responses[1:] + responses[:1], progress=False)
    assert any(not torch.allclose(shuffled[n], fisher[n]) for n in fisher)


def test_per_sample_square_is_not_the_square_of_the_batch_gradient(tokenizer):
    """The Fisher needs the cross terms 2 g_n g_m gone: squaring a batch gradient keeps them, so that
    estimate changes with the batch size, while the per-sample one does not."""
    model = build_tiny_model("qwen2", dtype=torch.float64, seed=5)
    prompts = make_prompts()
    responses = make_prompts(lengths=(5, 3, 2, 6, 4, 3, 5), seed=11)
    cfg = FisherConfig(last_k=1, labels="empirical", batch_size=4)
    fisher = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
    grads = per_sample_gradients(model, prompts, responses, cfg.last_k)
    n = len(prompts)
    for k, name in enumerate(scored_linears(model, cfg.last_k)):
        g = torch.stack([sample[k] for sample in grads])  # (N, out, in)
        per_sample = g.square().mean(0)
        batch_square = g.sum(0).square() / n  # one batch of N, its gradient squared
        pairs_square = (g[0::2].sum(0).square() + sum(x.square() for x in g[1::2])) / n  # batches of 1 and 2
        # batch of 4 against one sample at a time: float32 precision (conftest.BATCHING_TOL)
        assert (fisher[name] - per_sample).norm() <= BATCHING_TOL * per_sample.norm(), name
        assert (per_sample - g.mean(0).square() >= -1e-15).all()  # E[g^2] >= E[g]^2: the variance
        assert (fisher[name] - batch_square).norm() > 0.3 * fisher[name].norm(), name
        assert (batch_square - pairs_square).norm() > 0.1 * batch_square.norm(), name


def test_model_is_left_as_found(tokenizer):
    model = eos_prone(build_tiny_model("gemma3", dtype=torch.float64), tokenizer.eos_token_id)
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    generation_config = model.generation_config
    rng = torch.get_rng_state()
    fisher = compute_fisher(model, tokenizer, make_prompts(), FisherConfig(last_k=2, max_new_tokens=4, batch_size=3),
                            progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires
    assert {name: m.training for name, m in model.named_modules()} == modes
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks and not getattr(module, "_backward_pre_hooks", {})
    assert model.generation_config is generation_config
    assert torch.equal(torch.get_rng_state(), rng)  # own generators only
    # frozen weights (no requires_grad anywhere) give the same Fisher and stay frozen
    model.requires_grad_(False)
    frozen = compute_fisher(model, tokenizer, make_prompts(), FisherConfig(last_k=2, max_new_tokens=4, batch_size=3),
                            progress=False)
    assert_close(frozen, fisher, tol=1e-12)
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_input_is_refused_with_its_position(tokenizer):
    model = build_tiny_model("llama", dtype=torch.float64)
    cfg = FisherConfig(last_k=1, labels="empirical")
    with pytest.raises(ValueError, match=r"prompts\[1\]: expected a non-empty"):
        compute_fisher(model, tokenizer, [[5, 6], []], cfg, responses=[[1], [2]], progress=False)
    with pytest.raises(ValueError, match=r"responses\[0\]\[1\]: token id 999"):
        compute_fisher(model, tokenizer, [[5, 6]], cfg, responses=[[1, 999]], progress=False)
    with pytest.raises(ValueError, match=r"responses: expected 2 entries"):
        compute_fisher(model, tokenizer, [[5], [6]], cfg, responses=[[1]], progress=False)
    with pytest.raises(ValueError, match="responses: required"):
        compute_fisher(model, tokenizer, [[5]], cfg, progress=False)
    with pytest.raises(ValueError, match="responses: only used"):
        compute_fisher(model, tokenizer, [[5]], FisherConfig(last_k=1), responses=[[1]], progress=False)
    with pytest.raises(ValueError, match="at least one"):
        compute_fisher(model, tokenizer, [], FisherConfig(last_k=1), progress=False)
    with pytest.raises(ValueError, match="last_k"):
        compute_fisher(model, tokenizer, [[5]], FisherConfig(last_k=9), progress=False)


@pytest.mark.parametrize("field, value", [
    ("last_k", 0), ("labels", "true"), ("temperature", 0.0), ("temperature", float("nan")), ("top_p", 0.0),
    ("top_p", 1.5), ("max_new_tokens", 0), ("seed", -1), ("batch_size", 0), ("batch_size", 2.0), ("kind", "block"),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"FisherConfig\.{field}"):
        FisherConfig(**{field: value})


# ----------------------------------------------------------------------------------------------------
# Cache file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from alphatoken.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    model = eos_prone(build_tiny_model("llama", dtype=torch.float64), tokenizer.eos_token_id)
    cfg = FisherConfig(last_k=2, temperature=0.9, top_p=0.95, max_new_tokens=4, seed=5, batch_size=3)
    prompts = make_prompts()
    fisher = compute_fisher(model, tokenizer, prompts, cfg, progress=False)
    path = save_fisher(tmp_path_factory.mktemp("fisher") / "fisher.safetensors", fisher, model, cfg, len(prompts))
    return model, cfg, fisher, path


def test_save_load_round_trip_is_bit_exact(saved):
    model, cfg, fisher, path = saved
    loaded = load_fisher(path, model, cfg)
    assert list(loaded) == list(fisher)
    for name in fisher:
        assert loaded[name].dtype == fisher[name].dtype and torch.equal(loaded[name], fisher[name])
    assert load_fisher(path, model) .keys() == fisher.keys()
    assert load_fisher(path, model, dataclasses.replace(cfg, batch_size=7)).keys() == fisher.keys()
    meta = read_fisher_metadata(path)
    assert meta["num_prompts"] == str(len(PROMPT_LENGTHS)) and meta["model_type"] == "llama"
    assert json.loads(meta["param_names"]) == list(scored_linears(model, 2))
    assert meta["num_params"] == "14" and meta["labels"] == '"sampled"' and float(meta["top_p"]) == 0.95
    assert meta["kind"] == '"diagonal"'
    assert not path.with_name(path.name + ".partial").exists()


@pytest.mark.parametrize("field, value", [
    ("seed", 6), ("temperature", 1.0), ("top_p", 1.0), ("max_new_tokens", 5), ("labels", "empirical"), ("last_k", 3),
    ("kind", "kronecker"),
])
def test_load_refuses_another_config(saved, field, value):
    model, cfg, _, path = saved
    with pytest.raises(FisherMismatchError) as error:
        load_fisher(path, model, dataclasses.replace(cfg, **{field: value}))
    message = str(error.value)
    assert str(path) in message and f"field '{field}'" in message
    assert f"expected {value!r}, found {getattr(cfg, field)!r}" in message


def test_load_refuses_other_weights(saved):
    model, cfg, _, path = saved
    other = eos_prone(build_tiny_model("llama", dtype=torch.float64), 256)
    other.load_state_dict(model.state_dict())
    assert load_fisher(path, other, cfg)  # same weights, another object: accepted
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-9  # not even a scored weight
    with pytest.raises(FisherMismatchError, match=r"field 'weights_fingerprint'.*computed for other weights") as error:
        load_fisher(path, other, cfg)
    assert str(path) in str(error.value)


def rewrite(path, target, edit):
    tensors, meta = load_file(str(path)), read_fisher_metadata(path)
    edit(tensors, meta)
    save_file(tensors, str(target), metadata=meta)
    return target


def test_load_refuses_missing_extra_and_misshapen_tensors(saved, tmp_path):
    model, cfg, _, path = saved
    name = "model.layers.3.self_attn.v_proj.weight"

    def drop(tensors, meta):
        del tensors[name]

    def add(tensors, meta):
        tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 32, dtype=torch.float64)

    def reshape(tensors, meta):
        tensors[name] = tensors[name][:-1].clone()

    with pytest.raises(FisherMismatchError, match=rf"field 'param_names'.*missing \['{name}'\]"):
        load_fisher(rewrite(path, tmp_path / "a.safetensors", drop), model, cfg)
    with pytest.raises(FisherMismatchError, match=r"extra \['model.layers.1.mlp.up_proj.weight'\]"):
        load_fisher(rewrite(path, tmp_path / "b.safetensors", add), model, cfg)
    with pytest.raises(FisherMismatchError, match=rf"field 'shape of {name}': expected \(16, 32\), found \(15, 32\)"):
        load_fisher(rewrite(path, tmp_path / "c.safetensors", reshape), model, cfg)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(FisherMismatchError, match=rf"{plain}: field 'format'"):
        load_fisher(plain, model)


def test_save_refuses_a_fisher_of_other_weights(saved, tmp_path):
    model, cfg, fisher, _ = saved
    partial = {k: v for k, v in fisher.items() if "q_proj" not in k}
    with pytest.raises(ValueError, match="missing parameter model.layers.2.self_attn.q_proj.weight"):
        save_fisher(tmp_path / "f.safetensors", partial, model, cfg, num_prompts=7)
    with pytest.raises(ValueError, match="unexpected parameter"):
        save_fisher(tmp_path / "f.safetensors", fisher, model, dataclasses.replace(cfg, last_k=1), num_prompts=7)


def test_per_sample_gradients_in_chunks_and_no_graph_before_the_scored_blocks(tokenizer, monkeypatch):
    """Memory: the per-sample gradients of a linear are formed a few samples at a time (here one), with
    the same Fisher, and the blocks before the scored ones run without an autograd graph."""
    import alphatoken.fisher as fisher_module

    model = build_tiny_model("llama", dtype=torch.float64, seed=3)
    prompts = make_prompts()
    responses = make_prompts(lengths=(4, 1, 6, 3, 2, 5, 8), seed=9)
    cfg = FisherConfig(last_k=1, labels="empirical", batch_size=4)
    whole = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
    graph_before_scored = []
    hook = model.model.layers[0].register_forward_hook(
        lambda module, args, output: graph_before_scored.append((output[0] if isinstance(output, tuple) else output).requires_grad))
    monkeypatch.setattr(fisher_module, "PER_SAMPLE_ELEMENTS", 1)  # one sample at a time
    try:
        chunked = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
    finally:
        hook.remove()
    assert_close(chunked, whole, tol=1e-12)
    assert_close(chunked, naive_fisher(model, prompts, responses, cfg.last_k))
    assert graph_before_scored and not any(graph_before_scored)
    assert all(p.requires_grad for p in model.parameters())  # restored
