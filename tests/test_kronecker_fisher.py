"""Kronecker-factored Fisher (`FisherConfig.kind = "kronecker"`, paper Table 6): the factors
A = E_t[x x^T] and S = (1/N) sum_n sum_t e e^T of `compute_fisher` against explicit per-token loops
run one prompt at a time, their cache file, and the retention proxy P = S (W - W_ref) A of
`TokenValuer` against brute-force per-token gradient dot products (tests/bruteforce.py) with the
proxy built from the explicit Kronecker matrix S (x) A. Tiny float64 models built here."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from alphatoken.blocks import scored_linears
from alphatoken.fisher import (
    KRONECKER_SUFFIXES,
    FisherConfig,
    FisherPrompts,
    FisherMismatchError,
    compute_fisher,
    fisher_entries,
    fisher_kind,
    fisher_parameter_names,
    fisher_tensor_shapes,
    load_fisher,
    read_fisher_metadata,
    sample_responses,
    save_fisher,
)
from alphatoken.models import build_tiny_model, byte_tokenizer, save_pretrained
from alphatoken.train import train_sft
from alphatoken.valuation import TokenValuer, ValuationConfig
from bruteforce import bruteforce_scores, validation_gradient
from conftest import BATCHING_TOL
from test_fisher import assert_close, eos_prone, make_prompts, per_sample_gradients, rewrite
from test_valuation import COMPONENTS, LAM, LAST_K, WINDOW, Setup, assert_scores_close, make_batch, rel_err

ARCHS = ("llama", "qwen2", "gemma3")
A_SUFFIX, S_SUFFIX = KRONECKER_SUFFIXES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Obviously-correct twins


def per_token_signals(model, prompt, response, last_k):
    """{name: (x (L, d_in), e (L, d_out))} of one unpadded prompt + response: x the input of each scored
    linear at every position, e = d log p(response | prompt) / d z at every position (plain autograd)."""
    linears = scored_linears(model, last_k)
    inputs, outputs = {}, {}

    def keeper(name):
        def hook(module, args, out):
            inputs[name], outputs[name] = args[0], out
        return hook

    handles = [linear.register_forward_hook(keeper(name)) for name, linear in linears.items()]
    try:
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)  # (L, V)
        log_likelihood = sum(logp[p, ids[0, p + 1]] for p in range(len(prompt) - 1, len(prompt) + len(response) - 1))
        errors = torch.autograd.grad(log_likelihood, [outputs[name] for name in linears])
    finally:
        for handle in handles:
            handle.remove()
    return {name: (inputs[name][0].detach(), e[0]) for name, e in zip(linears, errors)}


def naive_factors(model, prompts, responses, last_k):
    """A = (1/M) sum over samples and positions t = 0 .. L_n - 2 of x_t x_t^T, S = (1/N) sum of e_t e_t^T
    over the same positions, M their number: one prompt, then one token at a time, outer products."""
    linears = scored_linears(model, last_k)
    a = {name: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for name, l in linears.items()}
    s = {name: torch.zeros(l.out_features, l.out_features, dtype=torch.float64) for name, l in linears.items()}
    tokens = 0
    for prompt, response in zip(prompts, responses):
        signals = per_token_signals(model, prompt, response, last_k)
        length = len(prompt) + len(response)
        for name, (x, e) in signals.items():
            for t in range(length - 1):
                a[name] += torch.outer(x[t], x[t])
                s[name] += torch.outer(e[t], e[t])
        tokens += length - 1
    factors = {}
    for name in linears:
        factors[name + A_SUFFIX] = a[name] / tokens
        factors[name + S_SUFFIX] = s[name] / len(prompts)
    return factors


def kronecker_proxy(model, last_k, factors, reference):
    """P_W = unvec((S (x) A) vec(W - W_ref)) with the explicit (d_out d_in)^2 Kronecker matrix (row-major vec)."""
    params = dict(model.named_parameters())
    proxy = {}
    for name, linear in scored_linears(model, last_k).items():
        d_out, d_in = linear.weight.shape
        kron = torch.kron(factors[name + S_SUFFIX], factors[name + A_SUFFIX])  # (d_out d_in, d_out d_in)
        proxy[name] = (kron @ (params[name].detach() - reference[name]).reshape(-1)).view(d_out, d_in)
    return proxy


def random_factors(model, last_k, seed):
    """Generic symmetric positive semi-definite factors A = R R^T / d_in, S = Q Q^T / d_out."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, linear in scored_linears(model, last_k).items():
        d_out, d_in = linear.weight.shape
        r = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
        q = torch.randn(d_out, d_out, generator=g, dtype=torch.float64)
        factors[name + A_SUFFIX] = r @ r.T / d_in
        factors[name + S_SUFFIX] = q @ q.T / d_out
    return factors


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return eos_prone(build_tiny_model(request.param, dtype=torch.float64, attn_implementation="sdpa"),
                     byte_tokenizer().eos_token_id)


# ----------------------------------------------------------------------------------------------------
# The factors


def test_twin_signals_rebuild_the_per_sample_gradient(model):
    """The twin's x and e are right: sum_t e_t x_t^T is the autograd gradient of the log-likelihood, and
    e = 0 at the last position (which is why it is not a counted token)."""
    prompts, responses = make_prompts(lengths=(3, 1)), make_prompts(lengths=(4, 2), seed=9)
    grads = per_sample_gradients(model, prompts, responses, 2)
    for n, (prompt, response) in enumerate(zip(prompts, responses)):
        signals = per_token_signals(model, prompt, response, 2)
        for k, (name, (x, e)) in enumerate(signals.items()):
            assert rel_err(e.T @ x, grads[n][k]) <= 1e-10, name
            assert (e[-1] == 0).all() and e[:-1].abs().max() > 0, name


@pytest.mark.parametrize("batch_size", [3, 2])
def test_sampled_kronecker_factors_match_per_token_loops(model, tokenizer, batch_size):
    prompts = make_prompts()
    cfg = FisherConfig(last_k=2, kind="kronecker", max_new_tokens=6, seed=0, batch_size=batch_size)
    factors = compute_fisher(model, tokenizer, prompts, cfg, progress=False)
    responses = sample_responses(model, tokenizer, prompts, cfg)
    assert len({len(r) for r in responses}) > 1  # padding after eos exercised
    expected = naive_factors(model, prompts, responses, cfg.last_k)
    assert list(factors) == list(expected) == list(fisher_tensor_shapes(scored_linears(model, 2), "kronecker"))
    assert_close(factors, expected)
    for name, value in factors.items():
        assert value.dtype == torch.float64 and value.device.type == "cpu"
        assert (value - value.T).abs().max() <= 1e-12 * value.abs().max(), name  # sums of x x^T, e e^T: symmetric
        assert torch.linalg.eigvalsh(value).min() >= -1e-12 * value.abs().max(), name  # and positive semi-definite
        assert value.abs().max() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_empirical_kronecker_factors_match_loops_and_not_the_batch_size(arch, tokenizer):
    model = build_tiny_model(arch, dtype=torch.float64, seed=2)
    prompts = make_prompts()
    responses = make_prompts(lengths=(4, 1, 6, 3, 2, 5, 8), seed=9)
    cfg = FisherConfig(last_k=3, kind="kronecker", labels="empirical", batch_size=4)
    factors = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
    assert_close(factors, naive_factors(model, prompts, responses, cfg.last_k))
    for batch_size in (1, 7):
        assert_close(compute_fisher(model, tokenizer, prompts, dataclasses.replace(cfg, batch_size=batch_size),
                                    responses=responses, progress=False), factors, tol=BATCHING_TOL)
    shuffled = compute_fisher(model, tokenizer, prompts, cfg, responses=responses[1:] + responses[:1], progress=False)
    assert any(not torch.allclose(shuffled[n], factors[n]) for n in factors if n.endswith(S_SUFFIX))


def test_one_sample_of_one_token_kronecker_diagonal_is_the_diagonal_fisher(tokenizer):
    """N = M = 1 (a one-token prompt, a one-token response): diag(S (x) A) = e^2 x^2 = F exactly. With
    a second sample the two differ (cross-sample averaging of the factors), as they do in general."""
    model = build_tiny_model("qwen2", dtype=torch.float64, seed=4)
    cfg = FisherConfig(last_k=2, labels="empirical", batch_size=2)
    linears = scored_linears(model, 2)

    def both(prompts, responses):
        diagonal = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
        kronecker = compute_fisher(model, tokenizer, prompts, dataclasses.replace(cfg, kind="kronecker"),
                                   responses=responses, progress=False)
        kron_diagonal = {name: torch.kron(kronecker[name + S_SUFFIX], kronecker[name + A_SUFFIX]).diagonal()
                         .view(linear.weight.shape) for name, linear in linears.items()}
        return diagonal, kron_diagonal

    diagonal, kron_diagonal = both([[17]], [[42]])
    for name, f in diagonal.items():  # one position: the softmax over one key is constant, so q and k get no gradient
        assert (f.abs().max() == 0) == ("q_proj" in name or "k_proj" in name), name
    assert_close(kron_diagonal, diagonal, tol=1e-12)
    diagonal, kron_diagonal = both([[17], [90]], [[42], [7]])
    assert max(rel_err(kron_diagonal[n], diagonal[n]) for n in linears) > 1e-2


def test_fisher_kind_helpers(model):
    linears = scored_linears(model, 2)
    diagonal = {name: torch.ones(shape) for name, shape in fisher_tensor_shapes(linears, "diagonal").items()}
    factors = {name: torch.ones(shape) for name, shape in fisher_tensor_shapes(linears, "kronecker").items()}
    assert fisher_kind(diagonal) == "diagonal" and fisher_kind(factors) == "kronecker"
    assert fisher_parameter_names(diagonal) == fisher_parameter_names(factors) == list(linears)
    name = next(iter(linears))
    half = {k: v for k, v in factors.items() if k != name + S_SUFFIX}
    assert fisher_parameter_names(half) == list(linears)[1:]  # a parameter counts with both factors only
    kind, entries = fisher_entries(factors, linears)
    assert kind == "kronecker" and entries[name][0] is factors[name + A_SUFFIX] and entries[name][1] is factors[name + S_SUFFIX]
    with pytest.raises(ValueError, match="mixes Kronecker factors"):
        fisher_kind({**factors, name: diagonal[name]})
    with pytest.raises(KeyError, match=rf"no entry '{name}{S_SUFFIX}' for the scored weight '{name}'"):
        fisher_entries(half, linears)
    bad = {**factors, name + A_SUFFIX: torch.ones(3, 3)}
    with pytest.raises(ValueError, match=rf"'{name}{A_SUFFIX}'\] has shape \(3, 3\): the Kronecker factor A"):
        fisher_entries(bad, linears)
    with pytest.raises(ValueError, match=r"FisherConfig\.kind"):
        FisherConfig(kind="block")


# ----------------------------------------------------------------------------------------------------
# Cache file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tokenizer = byte_tokenizer()
    model = eos_prone(build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa"), tokenizer.eos_token_id)
    cfg = FisherConfig(last_k=2, kind="kronecker", max_new_tokens=4, seed=5, batch_size=3)
    prompts = make_prompts()
    factors = compute_fisher(model, tokenizer, prompts, cfg, progress=False)
    root = tmp_path_factory.mktemp("kfac")
    path = save_fisher(root / "fisher.safetensors", factors, model, cfg, len(prompts))
    diagonal_cfg = dataclasses.replace(cfg, kind="diagonal")
    diagonal = compute_fisher(model, tokenizer, prompts, diagonal_cfg, progress=False)
    diagonal_path = save_fisher(root / "diagonal.safetensors", diagonal, model, diagonal_cfg, len(prompts))
    return model, cfg, factors, path, diagonal_path


def test_kronecker_file_round_trip_is_bit_exact(saved):
    model, cfg, factors, path, _ = saved
    for loaded in (load_fisher(path, model, cfg), load_fisher(path, model)):
        assert list(loaded) == list(factors)
        assert all(loaded[n].dtype == factors[n].dtype and torch.equal(loaded[n], factors[n]) for n in factors)
    meta = read_fisher_metadata(path)
    assert meta["kind"] == '"kronecker"'
    assert json.loads(meta["param_names"]) == list(scored_linears(model, 2)) and meta["num_params"] == "14"
    assert sorted(load_file(str(path))) == sorted(factors)


def test_a_file_of_one_kind_is_refused_under_the_other(saved):
    model, cfg, _, path, diagonal_path = saved
    with pytest.raises(FisherMismatchError, match=r"field 'kind': expected 'diagonal', found 'kronecker'") as error:
        load_fisher(path, model, dataclasses.replace(cfg, kind="diagonal"))
    assert str(path) in str(error.value)
    with pytest.raises(FisherMismatchError, match=r"field 'kind': expected 'kronecker', found 'diagonal'"):
        load_fisher(diagonal_path, model, cfg)
    assert read_fisher_metadata(diagonal_path)["kind"] == '"diagonal"'


def test_a_file_without_kind_is_diagonal(saved, tmp_path):
    """Files written before `kind` existed hold a diagonal Fisher: they load as one, and not as Kronecker."""
    model, cfg, _, _, diagonal_path = saved
    legacy = rewrite(diagonal_path, tmp_path / "legacy.safetensors", lambda tensors, meta: meta.pop("kind"))
    diagonal_cfg = dataclasses.replace(cfg, kind="diagonal")
    assert list(load_fisher(legacy, model, diagonal_cfg)) == list(scored_linears(model, 2))
    with pytest.raises(FisherMismatchError, match=r"field 'kind': expected 'kronecker', found 'diagonal'"):
        load_fisher(legacy, model, cfg)
    relabelled = rewrite(diagonal_path, tmp_path / "relabelled.safetensors",
                         lambda tensors, meta: meta.update(kind='"kronecker"'))  # diagonal tensors, Kronecker label
    with pytest.raises(FisherMismatchError, match=r"field 'param_names'.*missing \[.*kfac_A"):
        load_fisher(relabelled, model)


def test_load_refuses_missing_and_misshapen_factors(saved, tmp_path):
    model, cfg, _, path, _ = saved
    name = "model.layers.3.self_attn.v_proj.weight"  # (16, 32): A (32, 32), S (16, 16)

    def drop(tensors, meta):
        del tensors[name + S_SUFFIX]

    def reshape(tensors, meta):
        tensors[name + A_SUFFIX] = tensors[name + A_SUFFIX][:-1, :-1].clone()

    with pytest.raises(FisherMismatchError, match=rf"field 'param_names'.*missing \['{name}{S_SUFFIX}'\]"):
        load_fisher(rewrite(path, tmp_path / "a.safetensors", drop), model, cfg)
    with pytest.raises(FisherMismatchError,
                       match=rf"field 'shape of {name}{A_SUFFIX}': expected \(32, 32\), found \(31, 31\)"):
        load_fisher(rewrite(path, tmp_path / "b.safetensors", reshape), model, cfg)
    with pytest.raises(FisherMismatchError, match=r"field 'kind': expected \"one of \['diagonal', 'kronecker'\]\""):
        load_fisher(rewrite(path, tmp_path / "c.safetensors", lambda t, meta: meta.update(kind='"block"')), model)


def test_save_refuses_factors_under_another_kind_or_shape(saved, tmp_path):
    model, cfg, factors, _, _ = saved
    with pytest.raises(ValueError, match=r"the tensors are a kronecker Fisher, the config says kind='diagonal'"):
        save_fisher(tmp_path / "f.safetensors", factors, model, dataclasses.replace(cfg, kind="diagonal"), 7)
    name = next(iter(scored_linears(model, 2)))
    with pytest.raises(ValueError, match="mixes Kronecker factors"):
        save_fisher(tmp_path / "f.safetensors", {**factors, name: torch.zeros(2)}, model, cfg, 7)
    with pytest.raises(ValueError, match=rf"missing parameter {name}{S_SUFFIX}"):
        save_fisher(tmp_path / "f.safetensors", {k: v for k, v in factors.items() if k != name + S_SUFFIX}, model, cfg, 7)
    v_proj = "model.layers.3.self_attn.v_proj.weight"  # (16, 32): A (32, 32), S (16, 16)
    swapped = {**factors, v_proj + A_SUFFIX: factors[v_proj + S_SUFFIX]}
    with pytest.raises(ValueError, match=rf"{v_proj}{A_SUFFIX}: shape \(16, 16\) != factor shape \(32, 32\)"):
        save_fisher(tmp_path / "f.safetensors", swapped, model, cfg, 7)
    assert not (tmp_path / "f.safetensors").exists()


# ----------------------------------------------------------------------------------------------------
# The proxy P = S (W - W_ref) A in the valuation


class KroneckerSetup(Setup):
    """test_valuation's Setup (weights moved away from the reference) with generic Kronecker factors."""

    def __init__(self, arch):
        super().__init__(arch)
        self.fisher = random_factors(self.model, LAST_K, seed=11)
        self._bruteforce = {}

    def bruteforce(self, signal):
        if signal not in self._bruteforce:
            target = validation_gradient(self.model, LAST_K, self.val_batch)
            proxy = kronecker_proxy(self.model, LAST_K, self.fisher, self.reference)
            self._bruteforce[signal] = bruteforce_scores(
                self.model, self.batch, last_k=LAST_K, window=WINDOW, lam=LAM, signal=signal, target=target, proxy=proxy)
        return self._bruteforce[signal]


@pytest.fixture(scope="module", params=ARCHS)
def kron_setup(request):
    return KroneckerSetup(request.param)


@pytest.mark.parametrize("signal", ["self", "total"])
def test_kronecker_proxy_scores_match_bruteforce(kron_setup, signal):
    reference = kron_setup.bruteforce(signal)
    for c in COMPONENTS:
        assert reference[c].abs().max() > 1e-4, f"{kron_setup.arch}/{signal}: brute-force {c} is trivially zero"
    valuer = kron_setup.valuer(signal=signal)
    assert valuer.fisher_kind == "kronecker"
    scores = valuer.score(kron_setup.batch)
    assert_scores_close(scores, reference, f"{kron_setup.arch}/{signal}/kronecker")
    total = valuer.score(kron_setup.batch, components=False).total
    assert rel_err(total, scores.total) <= 1e-10


def test_kronecker_proxy_differs_from_the_diagonal_one(kron_setup):
    """The comparison above is about the Kronecker proxy: the diagonal Fisher F = diag(S (x) A) reshaped
    gives other proxy scores."""
    linears = scored_linears(kron_setup.model, LAST_K)
    diagonal = {n: torch.kron(kron_setup.fisher[n + S_SUFFIX], kron_setup.fisher[n + A_SUFFIX]).diagonal()
                .view(l.weight.shape) for n, l in linears.items()}
    cfg = ValuationConfig(last_k=LAST_K, window=WINDOW, lam=LAM, signal="total")
    kron = TokenValuer(kron_setup.model, cfg, fisher=kron_setup.fisher, reference=kron_setup.reference)
    diag = TokenValuer(kron_setup.model, cfg, fisher=diagonal, reference=kron_setup.reference)
    kron.set_validation(kron_setup.val_batch)
    diag.set_validation(kron_setup.val_batch)
    assert rel_err(diag.score(kron_setup.batch).prx_dir, kron.score(kron_setup.batch).prx_dir) > 1e-2


def test_diagonal_factors_give_the_diagonal_proxy_with_f_the_outer_product():
    """diag(s) (W - W_ref) diag(a) = (s a^T) * (W - W_ref): a Kronecker Fisher with diagonal factors
    scores exactly as the diagonal Fisher F = s a^T."""
    setup = Setup("gemma3")
    g = torch.Generator().manual_seed(3)
    factors, outer = {}, {}
    for name, linear in scored_linears(setup.model, LAST_K).items():
        d_out, d_in = linear.weight.shape
        a, s = torch.rand(d_in, generator=g, dtype=torch.float64), torch.rand(d_out, generator=g, dtype=torch.float64)
        factors[name + A_SUFFIX], factors[name + S_SUFFIX], outer[name] = torch.diag(a), torch.diag(s), torch.outer(s, a)
    cfg = ValuationConfig(last_k=LAST_K, window=WINDOW, lam=LAM)
    kron = TokenValuer(setup.model, cfg, fisher=factors, reference=setup.reference)
    diag = TokenValuer(setup.model, cfg, fisher=outer, reference=setup.reference)
    for valuer in (kron, diag):
        valuer.set_validation(setup.val_batch)
    ks, ds = kron.score(setup.batch), diag.score(setup.batch)
    assert ks.prx_dir.abs().max() > 0 and ks.prx_cau.abs().max() > 0
    for c in COMPONENTS:
        assert rel_err(getattr(ks, c), getattr(ds, c)) <= 1e-12, c


def test_computed_factors_through_the_file_match_bruteforce(saved, tmp_path):
    """End to end: compute_fisher -> save_fisher -> load_fisher -> TokenValuer against the brute force."""
    model, _, _, path, _ = saved
    factors = load_fisher(path, model)
    g = torch.Generator().manual_seed(1)
    batch = make_batch(g, 2, 12, prompt=4, left_pad=[2, 0], right_pad=[0, 1])
    val_batch = make_batch(g, 2, 10, prompt=3, left_pad=[0, 1], right_pad=[1, 0])
    reference = {n: l.weight.detach() - 0.05 * torch.randn(l.weight.shape, generator=g, dtype=torch.float64)
                 for n, l in scored_linears(model, LAST_K).items()}
    valuer = TokenValuer(model, ValuationConfig(last_k=LAST_K, window=WINDOW, lam=LAM, signal="total"),
                         fisher=factors, reference=reference)  # the file has the factors of last_k=2 = LAST_K
    valuer.set_validation(val_batch)
    expected = bruteforce_scores(model, batch, last_k=LAST_K, window=WINDOW, lam=LAM, signal="total",
                                 target=validation_gradient(model, LAST_K, val_batch),
                                 proxy=kronecker_proxy(model, LAST_K, factors, reference))
    assert expected["prx_dir"].abs().max() > 0 and expected["prx_cau"].abs().max() > 0
    assert_scores_close(valuer.score(batch), expected, "computed factors")


def test_valuer_refuses_incomplete_or_mixed_factors():
    setup = KroneckerSetup("llama")
    cfg = ValuationConfig(last_k=LAST_K)
    name = next(iter(scored_linears(setup.model, LAST_K)))
    missing = {k: v for k, v in setup.fisher.items() if k != name + S_SUFFIX}
    with pytest.raises(KeyError, match=rf"'{name}{S_SUFFIX}' for the scored weight"):
        TokenValuer(setup.model, cfg, fisher=missing, reference=setup.reference)
    with pytest.raises(ValueError, match="mixes Kronecker factors"):
        TokenValuer(setup.model, cfg, fisher={**setup.fisher, name: torch.ones(3)}, reference=setup.reference)
    squashed = {**setup.fisher, name + S_SUFFIX: setup.fisher[name + S_SUFFIX][:-1]}
    with pytest.raises(ValueError, match=rf"'{name}{S_SUFFIX}'\] has shape .*: the Kronecker factor S"):
        TokenValuer(setup.model, cfg, fisher=squashed, reference=setup.reference)


# ----------------------------------------------------------------------------------------------------
# Consumers of the file: LoRA step-0 Fisher, train stage, heatmap


def test_kronecker_factors_of_lora_factors(tokenizer, tmp_path):
    from test_lora_valuation import LAST_K as LORA_K, chat, fisher_prompts, lora_config, wrap

    model = wrap(build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa"))
    prompts, responses = make_prompts(lengths=(3, 6, 4)), make_prompts(lengths=(4, 2, 5), seed=9)
    cfg = FisherConfig(last_k=LORA_K, kind="kronecker", labels="empirical")
    factors = compute_fisher(model, tokenizer, prompts, cfg, responses=responses, progress=False)
    assert all(".lora_" in name for name in factors)
    assert_close(factors, naive_factors(model, prompts, responses, LORA_K))
    fresh = wrap(build_tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa"), perturb=None)
    at_init = compute_fisher(fresh, tokenizer, prompts, cfg, responses=responses, progress=False)
    for name, value in at_init.items():  # B = 0: no error reaches lora_A's output, S_A = 0 exactly
        if ".lora_A." in name and name.endswith(S_SUFFIX):
            assert (value == 0).all(), name
        else:
            assert value.abs().max() > 0, name
    # the alphatoken_lora policy computes and caches a Kronecker Fisher of its factors at step 0
    hold_out = fisher_prompts(tokenizer)
    hold_out = FisherPrompts(hold_out.prompts, dataclasses.replace(hold_out.config, kind="kronecker"))
    result = train_sft(build_tiny_model("llama"), tokenizer, chat(8), chat(2, offset=20), lora_config(tmp_path, max_steps=2),
                       fisher_prompts=hold_out)
    assert result.steps == 2
    assert read_fisher_metadata(tmp_path / "fisher.safetensors")["kind"] == '"kronecker"'
    cached = load_file(str(tmp_path / "fisher.safetensors"))
    assert cached and all(name.endswith(KRONECKER_SUFFIXES) and ".lora_" in name for name in cached)
    assert all((v == 0).all() for n, v in cached.items() if ".lora_A." in n and n.endswith(S_SUFFIX))


def test_train_stage_trains_with_a_kronecker_fisher_file(tmp_path, tokenizer, capsys):
    from alphatoken.models import ModelSpec, load_model
    from alphatoken.stages.train import main
    from test_lora_valuation import _write_split, chat

    model_dir = save_pretrained(build_tiny_model("llama", dtype=torch.float32), tokenizer, tmp_path / "model")
    model, _ = load_model(ModelSpec(source="hub", name_or_path=str(model_dir), dtype="float32"), "cpu")
    prompts = make_prompts(lengths=(3, 5))
    files = {}
    for last_k in (1, 2):
        cfg = FisherConfig(last_k=last_k, kind="kronecker", max_new_tokens=4, batch_size=2)
        files[last_k] = save_fisher(tmp_path / f"fisher{last_k}.safetensors",
                                    compute_fisher(model, tokenizer, prompts, cfg, progress=False), model, cfg, 2)
    params = tmp_path / "params.yaml"
    params.write_text(
        "train:\n  lr: 0.01\n  micro_batch_size: 2\n  max_steps: 2\n  warmup_steps: 1\n  max_length: 64\n  progress: false\n"
        "  rho: 0.5\n  dtype: float32\n"
        "valuation:\n  last_k: 2\n  window: 4\n")
    train, val = _write_split(tmp_path / "train.jsonl", chat(6)), _write_split(tmp_path / "val.jsonl", chat(2, 20))
    argv = ["--params", str(params), "--section", "train", "--valuation-section", "valuation", "--objective", "sft",
            "--method", "alphatoken", "--model", str(model_dir), "--train-data", train, "--val-data", val]
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path / "short"), "--fisher", str(files[1])])
    assert "valuation.last_k=2 scores weights the Fisher lacks" in capsys.readouterr().err
    main(argv + ["--out", str(tmp_path / "run"), "--fisher", str(files[2])])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["policy"] == "alphatoken" and metrics["steps"] == 2


def test_heatmap_reads_a_kronecker_fisher(tmp_path):
    from alphatoken.data import ChatExample, collate, encode_chat
    from alphatoken.eval.heatmap import score_heatmap
    from alphatoken.models import ModelSpec, load_model

    tokenizer = byte_tokenizer()
    reference = build_tiny_model("llama", dtype=torch.float64, attn_implementation="eager", seed=0)
    tuned = build_tiny_model("llama", dtype=torch.float64, attn_implementation="eager", seed=0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for linear in scored_linears(tuned, 2).values():
            linear.weight.add_(0.05 * torch.randn(linear.weight.shape, generator=gen, dtype=torch.float64))
    model_dir = save_pretrained(tuned, tokenizer, tmp_path / "model")
    ref_dir = save_pretrained(reference, tokenizer, tmp_path / "ref")
    ref, _ = load_model(ModelSpec(source="hub", name_or_path=str(ref_dir), dtype="float64", attn_implementation="eager"), "cpu")
    factors = random_factors(ref, 2, seed=5)
    fisher_path = save_fisher(tmp_path / "fisher.safetensors", factors, ref, FisherConfig(last_k=2, kind="kronecker"), 1)

    def chat(i, prompt, answer):
        return ChatExample(id=f"ex{i}", messages=[{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": answer}], source="test")

    val, train = [chat(0, "Write 1.", "1"), chat(1, "Write ab.", "abab")], [chat(2, "Hi?", "hello"), chat(3, "Q", "yes no")]
    cfg = ValuationConfig(last_k=2, window=4, lam=1.5)
    html = score_heatmap(model_dir, fisher_path, ref_dir, val, train, cfg, tmp_path / "h.html", max_length=64, n=2,
                         dtype="float64").read_text()
    model, _ = load_model(ModelSpec(source="hub", name_or_path=str(model_dir), dtype="float64", attn_implementation="eager"), "cpu")
    ref_params = dict(ref.named_parameters())
    valuer = TokenValuer(model, cfg, fisher=factors, reference={n: ref_params[n].detach() for n in scored_linears(ref, 2)})
    valuer.set_validation(collate([encode_chat(e, tokenizer, 64) for e in val], tokenizer.pad_token_id))
    batch = collate([encode_chat(e, tokenizer, 64) for e in train], tokenizer.pad_token_id)
    scores = valuer.score(batch)
    first = int((batch["labels"][0] != -100).nonzero()[0])
    for component in ("prx_dir", "total"):
        value = float(getattr(scores, component)[0, first])
        assert value != 0.0 and f'title="{component}={value:.4g}"' in html
