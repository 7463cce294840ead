"""Token valuation engine vs the brute-force reference (tests/bruteforce.py) and its invariances.
Tiny float64 models of three architectures, batches mixing left and right padding with prompts."""

import dataclasses

import pytest
import torch

from alphatoken.blocks import decoder_blocks, scored_linears
from alphatoken.models import build_tiny_model
from alphatoken.valuation import TokenScores, TokenValuer, ValuationConfig
from bruteforce import bruteforce_scores, proxy_direction, token_losses, validation_gradient

ARCHS = ("llama", "qwen2", "gemma3", "gemma3_mm", "qwen3_5")  # gemma3_mm: the multimodal wrapper; qwen3_5: the hybrid
COMPONENTS = ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau", "total")
LAST_K, WINDOW, LAM = 2, 3, 1.5


def make_batch(generator, batch, length, prompt, left_pad, right_pad):
    """Random tokens; example i has `left_pad[i]` leading and `right_pad[i]` trailing pads and a prompt
    of `prompt` real tokens (labels -100 on prompt and padding)."""
    ids = torch.randint(3, 259, (batch, length), generator=generator)  # (B, T)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for i in range(batch):
        mask[i, : left_pad[i]] = 0
        if right_pad[i]:
            mask[i, length - right_pad[i]:] = 0
        labels[i, : left_pad[i] + prompt] = -100
    ids = ids.masked_fill(mask == 0, 0)
    labels = labels.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class Setup:
    """A tiny model, a training batch (left-padded, right-padded and full rows), a validation batch,
    and a Fisher/reference with the weights perturbed away from the reference."""

    def __init__(self, arch):
        self.arch = arch
        self.model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")
        g = torch.Generator().manual_seed(1)
        self.batch = make_batch(g, 3, 14, prompt=5, left_pad=[3, 0, 0], right_pad=[0, 2, 0])
        self.val_batch = make_batch(g, 2, 12, prompt=4, left_pad=[0, 2], right_pad=[1, 0])
        linears = scored_linears(self.model, LAST_K)
        self.reference = {
            n: lin.weight.detach() - 0.05 * torch.randn(lin.weight.shape, generator=g, dtype=torch.float64)
            for n, lin in linears.items()
        }
        self.fisher = {n: torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) for n, lin in linears.items()}
        self._bruteforce = {}

    def valuer(self, **overrides):
        cfg = ValuationConfig(**{"last_k": LAST_K, "window": WINDOW, "lam": LAM, **overrides})
        valuer = TokenValuer(self.model, cfg, fisher=self.fisher, reference=self.reference)
        valuer.set_validation(self.val_batch)
        return valuer

    def bruteforce(self, signal):
        if signal not in self._bruteforce:
            target = validation_gradient(self.model, LAST_K, self.val_batch)
            proxy = proxy_direction(self.model, LAST_K, self.fisher, self.reference)
            self._bruteforce[signal] = bruteforce_scores(
                self.model, self.batch, last_k=LAST_K, window=WINDOW, lam=LAM, signal=signal, target=target, proxy=proxy
            )
        return self._bruteforce[signal]


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
    return Setup(request.param)


def assert_scores_close(scores: TokenScores, reference: dict, what: str, tol=1e-6):
    errors = {c: rel_err(getattr(scores, c), reference[c]) for c in COMPONENTS}
    bad = {c: e for c, e in errors.items() if not e <= tol}
    assert not bad, f"{what}: components off by relative error {bad} (tolerance {tol})"


@pytest.mark.parametrize("signal", ["self", "total"])
def test_engine_matches_bruteforce(setup, signal):
    reference = setup.bruteforce(signal)
    for c in COMPONENTS:  # the comparison must be about something
        assert reference[c].abs().max() > 1e-4, f"{setup.arch}/{signal}: brute-force {c} is trivially zero"
    scores = setup.valuer(signal=signal).score(setup.batch)
    assert_scores_close(scores, reference, f"{setup.arch}/{signal}")
    zero = setup.batch["labels"] == -100
    assert (scores.total[zero] == 0).all()


def test_signals_differ(setup):
    """`self` and `total` are different quantities (the test above would not notice a swap otherwise)."""
    s, t = setup.bruteforce("self"), setup.bruteforce("total")
    assert rel_err(s["tgt_dir"], t["tgt_dir"]) > 1e-3


@pytest.mark.parametrize("signal", ["self", "total"])
def test_contract_equals_ghost(setup, signal):
    contract = setup.valuer(signal=signal, target_form="contract").score(setup.batch)
    ghost = setup.valuer(signal=signal, target_form="ghost").score(setup.batch)
    auto = setup.valuer(signal=signal, target_form="auto").score(setup.batch)
    for c in COMPONENTS:
        assert rel_err(ghost.__dict__[c], contract.__dict__[c]) <= 1e-10, c
        assert rel_err(auto.__dict__[c], contract.__dict__[c]) <= 1e-10, c


def test_score_captured_equals_score_and_keeps_graph(setup):
    model, batch = setup.model, setup.batch
    valuer = setup.valuer(signal="self")
    expected = valuer.score(batch)
    with valuer.capture():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    token_loss = token_losses(out.logits, batch["labels"])  # (B, T-1)
    scores = valuer.score_captured(batch, token_loss)
    for c in COMPONENTS:
        assert rel_err(getattr(scores, c), getattr(expected, c)) <= 1e-10, c
    assert all(p.grad is None for p in model.parameters())
    # the caller's backward on the same graph still works and gives the ordinary gradient
    params = [p for p in model.parameters()]
    loss = token_loss.sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # a multimodal model's vision tower is unused
    fresh = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    fresh_grads = torch.autograd.grad(token_losses(fresh.logits, batch["labels"]).sum(), params, allow_unused=True)
    assert sum(g is not None for g in grads) > len(params) // 2
    for g1, g2 in zip(grads, fresh_grads):
        assert (g1 is None) == (g2 is None)
        assert g1 is None or torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)


def test_proxy_zero_at_reference(setup):
    reference = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    valuer = TokenValuer(setup.model, ValuationConfig(last_k=LAST_K, window=WINDOW), fisher=setup.fisher, reference=reference)
    valuer.set_validation(setup.val_batch)
    scores = valuer.score(setup.batch)
    assert (scores.prx_dir == 0).all() and (scores.prx_cau == 0).all()
    assert scores.tgt_dir.abs().max() > 0
    no_proxy = TokenValuer(setup.model, ValuationConfig(last_k=LAST_K, window=WINDOW))
    no_proxy.set_validation(setup.val_batch)
    s = no_proxy.score(setup.batch)
    assert (s.prx_dir == 0).all() and (s.prx_cau == 0).all()
    assert torch.equal(s.total, s.tgt_dir + s.tgt_cau)


def test_lam_scales_exactly_the_proxy(setup):
    a = setup.valuer(lam=0.0).score(setup.batch)
    b = setup.valuer(lam=2.5).score(setup.batch)
    for c in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau"):
        assert torch.equal(getattr(a, c), getattr(b, c)), c
    assert torch.allclose(b.total - a.total, 2.5 * (a.prx_dir + a.prx_cau), rtol=1e-12, atol=1e-14)
    assert torch.equal(a.total, a.tgt_dir + a.tgt_cau)


@pytest.mark.parametrize("form", ["contract", "ghost"])
def test_switching_off_a_component(setup, form):
    full = setup.valuer(target_form=form).score(setup.batch)
    for c in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau"):
        part = setup.valuer(target_form=form, **{f"use_{c}": False}).score(setup.batch)
        assert (getattr(part, c) == 0).all(), c
        assert getattr(full, c).abs().max() > 0, c
        for other in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau"):
            if other != c:
                assert torch.equal(getattr(part, other), getattr(full, other)), f"{c} off changed {other}"


@pytest.mark.parametrize("signal", ["self", "total"])
def test_example_scale_is_linear_per_example(setup, signal):
    valuer = setup.valuer(signal=signal)
    w = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    plain = valuer.score(setup.batch)
    scaled = valuer.score(setup.batch, example_scale=w)
    for c in COMPONENTS:
        assert torch.allclose(getattr(scaled, c), w[:, None] * getattr(plain, c), rtol=1e-12, atol=1e-15), c
    # and against the brute force with the same scale
    target = validation_gradient(setup.model, LAST_K, setup.val_batch)
    proxy = proxy_direction(setup.model, LAST_K, setup.fisher, setup.reference)
    if signal == "total":
        bf = bruteforce_scores(setup.model, setup.batch, last_k=LAST_K, window=WINDOW, lam=LAM, signal=signal,
                               target=target, proxy=proxy, example_scale=w)
        assert_scores_close(scaled, bf, f"{setup.arch}/example_scale")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
               + len(getattr(m, "_forward_hooks_with_kwargs", {})) + len(getattr(m, "_forward_pre_hooks_with_kwargs", {}))
               for m in model.modules())


def test_model_left_untouched(setup):
    model = setup.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 0.5)  # a pre-existing accumulated gradient
    ckpt = [b.__dict__.get("gradient_checkpointing") for b in decoder_blocks(model)]
    valuer = setup.valuer(signal="self")
    valuer.score(setup.batch)
    with valuer.capture():
        out = model(input_ids=setup.batch["input_ids"], attention_mask=setup.batch["attention_mask"])
    valuer.score_captured(setup.batch, token_losses(out.logits, setup.batch["labels"]))
    assert torch.equal(params[0].grad, torch.full_like(params[0], 0.5))
    params[0].grad = None
    assert all(p.grad is None for p in params)
    assert _hook_count(model) == 0
    assert model.config._attn_implementation == impl
    assert all(m.config._attn_implementation == impl for m in model.modules() if hasattr(m, "config"))
    assert [b.__dict__.get("gradient_checkpointing") for b in decoder_blocks(model)] == ckpt
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert valuer._captured is None


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_scores(use_reentrant):
    for arch in ("llama", "gemma3", "qwen3_5"):
        setup = Setup(arch)
        model = setup.model
        for signal in ("self", "total"):
            expected = setup.valuer(signal=signal).score(setup.batch)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.train()
            hooks_before = _hook_count(model)  # checkpointing may register its own hooks
            try:
                valuer = setup.valuer(signal=signal)
                got = valuer.score(setup.batch)
                with valuer.capture():
                    out = model(input_ids=setup.batch["input_ids"], attention_mask=setup.batch["attention_mask"])
                token_loss = token_losses(out.logits, setup.batch["labels"])
                captured = valuer.score_captured(setup.batch, token_loss)
                token_loss.sum().backward()  # the caller's backward (recomputes the checkpointed blocks)
                assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
                assert _hook_count(model) == hooks_before
            finally:
                model.gradient_checkpointing_disable()
                model.eval()
                model.zero_grad(set_to_none=True)
            for c in COMPONENTS:
                assert rel_err(getattr(got, c), getattr(expected, c)) <= 1e-10, f"{arch}/{signal}/{c} score"
                assert rel_err(getattr(captured, c), getattr(expected, c)) <= 1e-10, f"{arch}/{signal}/{c} captured"


def test_eager_model_matches_sdpa_model():
    """The valuation does not depend on the model's own attention implementation (right padding,
    where float64 eager attention is well defined). Transformers' eager attention takes its softmax
    in float32 even for float64 models, so the two forwards themselves differ by ~1e-8 relative."""
    setup = Setup("gemma3")
    g = torch.Generator().manual_seed(3)
    batch = make_batch(g, 2, 13, prompt=4, left_pad=[0, 0], right_pad=[0, 3])
    val = make_batch(g, 2, 10, prompt=3, left_pad=[0, 0], right_pad=[2, 0])
    eager = build_tiny_model("gemma3", dtype=torch.float64, attn_implementation="eager")
    eager.load_state_dict(setup.model.state_dict())
    results = []
    for model in (setup.model, eager):
        valuer = TokenValuer(model, ValuationConfig(last_k=LAST_K, window=4), fisher=setup.fisher, reference=setup.reference)
        valuer.set_validation(val)
        results.append(valuer.score(batch))
    for c in COMPONENTS:
        assert rel_err(getattr(results[1], c), getattr(results[0], c)) <= 1e-6, c
    assert eager.config._attn_implementation == "eager"


def test_custom_validation_objective_matches_bruteforce():
    """A DPO-style objective (any scalar of the model outputs) defines G by its plain gradient."""
    setup = Setup("qwen2")
    weights = torch.tensor([0.3, -0.8], dtype=torch.float64)

    def objective(model, batch):
        half = {k: v for k, v in batch.items()}
        losses = token_losses(model(input_ids=half["input_ids"], attention_mask=half["attention_mask"]).logits, half["labels"])
        first = token_losses(model(input_ids=half["input_ids"][:1], attention_mask=half["attention_mask"][:1]).logits,
                             half["labels"][:1])
        return torch.nn.functional.logsigmoid((weights[:, None] * losses).sum()) + 0.1 * first.sum()

    valuer = TokenValuer(setup.model, ValuationConfig(last_k=LAST_K, window=WINDOW, signal="total"),
                         fisher=setup.fisher, reference=setup.reference)
    valuer.set_validation(setup.val_batch, objective=objective)
    scores = valuer.score(setup.batch)
    target = validation_gradient(setup.model, LAST_K, setup.val_batch, objective=objective)
    proxy = proxy_direction(setup.model, LAST_K, setup.fisher, setup.reference)
    bf = bruteforce_scores(setup.model, setup.batch, last_k=LAST_K, window=WINDOW, lam=LAM, signal="total",
                           target=target, proxy=proxy)
    assert_scores_close(scores, bf, "qwen2/custom objective")


def test_bad_input_errors():
    setup = Setup("llama")
    with pytest.raises(ValueError, match="signal"):
        ValuationConfig(signal="both")
    with pytest.raises(ValueError, match="target_form"):
        ValuationConfig(target_form="fast")
    broken = dict(setup.fisher)
    name = next(iter(broken))
    del broken[name]
    with pytest.raises(KeyError, match=name):
        TokenValuer(setup.model, ValuationConfig(last_k=LAST_K), fisher=broken, reference=setup.reference)
    valuer = TokenValuer(setup.model, ValuationConfig(last_k=LAST_K))
    with pytest.raises(RuntimeError, match="set_validation"):
        valuer.score(setup.batch)
    with pytest.raises(KeyError, match="labels"):
        valuer.set_validation({"input_ids": setup.batch["input_ids"]})
    empty = dict(setup.val_batch, labels=torch.full_like(setup.val_batch["labels"], -100))
    with pytest.raises(ValueError, match="no response tokens"):
        valuer.set_validation(empty)
    with pytest.raises(RuntimeError, match="capture"):
        valuer.score_captured(setup.batch, torch.zeros(3, 13, dtype=torch.float64))
    assert dataclasses.is_dataclass(ValuationConfig) and ValuationConfig.__dataclass_params__.frozen


def _per_example_objective(model, batch):
    """J = mean over examples of the summed token loss of each example: the mean of two equal halves'
    J equals J of the whole batch exactly, so averaging per-rank G reproduces the full-batch G."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return token_losses(out.logits, batch["labels"]).sum(1).mean()


@pytest.mark.parametrize("form", ["ghost", "auto"])
def test_reduce_averages_validation_gradients_of_two_ranks(form):
    s = Setup("qwen2")
    halves = [{k: v[i : i + 1] for k, v in s.val_batch.items()} for i in range(2)]
    cfg = ValuationConfig(last_k=LAST_K, window=WINDOW, lam=LAM, target_form=form)
    full = TokenValuer(s.model, cfg, fisher=s.fisher, reference=s.reference)
    full.set_validation(s.val_batch, objective=_per_example_objective)
    expected = full.score(s.batch)

    other_rank = []  # G of the second half-batch, in the order the valuer reduces them
    ranked = TokenValuer(s.model, cfg, fisher=s.fisher, reference=s.reference)
    ranked.set_validation(halves[1], objective=_per_example_objective, reduce=lambda g: other_rank.append(g.clone()) or g)
    pending = list(other_rank)
    ranked.set_validation(halves[0], objective=_per_example_objective, reduce=lambda g: (g + pending.pop(0)) / 2)
    assert not pending and len(other_rank) == len(scored_linears(s.model, LAST_K))
    assert all(t.form == "contract" for t in ranked._target.values())
    assert_scores_close(ranked.score(s.batch), {c: getattr(expected, c) for c in COMPONENTS}, f"reduce ({form})")
    # without averaging, one half alone gives a different G (the test can fail)
    ranked.set_validation(halves[0], objective=_per_example_objective)
    assert rel_err(ranked.score(s.batch).tgt_dir, expected.tgt_dir) > 1e-3


def test_scoring_micro_batches_leaves_accumulated_grad_exact():
    s = Setup("llama")
    micro = [{k: v[i : i + 1] for k, v in s.batch.items()} for i in (0, 1)]
    weights = [torch.tensor(0.7), torch.tensor(1.3)]

    def accumulate(valuer):
        s.model.zero_grad(set_to_none=True)
        for batch, w in zip(micro, weights):
            ctx = valuer.capture() if valuer is not None else torch.enable_grad()
            with ctx:
                out = s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            token_loss = token_losses(out.logits, batch["labels"])
            if valuer is not None:
                valuer.score_captured(batch, token_loss)
            (w * token_loss.sum()).backward()
        return {n: p.grad.clone() for n, p in s.model.named_parameters()}

    plain = accumulate(None)
    with_scoring = accumulate(s.valuer(signal="self"))
    s.model.zero_grad(set_to_none=True)
    for name, grad in plain.items():
        assert torch.equal(with_scoring[name], grad), f"{name}: .grad changed by scoring"


@pytest.mark.parametrize("arch", ARCHS)
def test_valuation_attention_runs_a_whole_model(arch):
    """The valuation's attention is registered with a matching mask entry, so a whole model can run on
    it: outside a re-run it is plain attention (same logits as sdpa on every non-padding position,
    left and right padding), and scoring such a model gives the same values as scoring the sdpa model."""
    from alphatoken.valuation.attention import ATTENTION_NAME

    setup = Setup(arch)
    model = build_tiny_model(arch, dtype=torch.float64, attn_implementation="sdpa")
    model.load_state_dict(setup.model.state_dict())
    TokenValuer(model, ValuationConfig(last_k=LAST_K))  # registers the implementation
    model.set_attn_implementation(ATTENTION_NAME)
    assert model.config._attn_implementation == ATTENTION_NAME
    batch = setup.batch
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sdpa = setup.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert rel_err(ours[real], sdpa[real]) <= 1e-12
    valuer = TokenValuer(model, ValuationConfig(last_k=LAST_K, window=WINDOW, lam=LAM), fisher=setup.fisher, reference=setup.reference)
    valuer.set_validation(setup.val_batch)
    scores = valuer.score(batch)
    expected = setup.valuer(window=WINDOW).score(batch)
    for c in COMPONENTS:
        assert rel_err(getattr(scores, c), getattr(expected, c)) <= 1e-10, c
    assert model.config._attn_implementation == ATTENTION_NAME


TOTAL_ONLY_CASES = [
    {},
    {"use_tgt_cau": False},
    {"use_prx_dir": False},
    {"use_tgt_dir": False, "use_prx_dir": False},
    {"use_tgt_cau": False, "use_prx_cau": False},
    {"use_prx_dir": False, "use_prx_cau": False, "lam": 0.0},
    {"use_tgt_dir": False, "use_tgt_cau": False},
    {"lam": 0.25, "signal": "total"},
]


@pytest.mark.parametrize("form", ["contract", "ghost"])
@pytest.mark.parametrize("case", range(len(TOTAL_ONLY_CASES)))
def test_total_only_equals_sum_of_components(setup, form, case):
    """`components=False` (one contraction with the combined direction) gives the same total as the
    four components computed apart, for every switch pattern, both target forms, with a DPO-style
    per-example scale; it leaves the components None."""
    valuer = setup.valuer(target_form=form, **TOTAL_ONLY_CASES[case])
    scale = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    full = valuer.score(setup.batch, example_scale=scale)
    fast = valuer.score(setup.batch, example_scale=scale, components=False)
    assert full.total.abs().max() > 0
    assert rel_err(fast.total, full.total) <= 1e-12
    assert fast.tgt_dir is None and fast.prx_cau is None


def test_total_only_without_proxy(setup):
    """Without Fisher/reference the proxy is absent: the fast total is the target total."""
    cfg = ValuationConfig(last_k=LAST_K, window=WINDOW, lam=LAM)
    valuer = TokenValuer(setup.model, cfg)
    valuer.set_validation(setup.val_batch)
    full = valuer.score(setup.batch)
    assert rel_err(valuer.score(setup.batch, components=False).total, full.total) <= 1e-12
    assert rel_err(full.total, full.tgt_dir + full.tgt_cau) <= 1e-12


@pytest.mark.parametrize("form", ["auto", "contract", "ghost"])
def test_validation_in_chunks_gives_the_same_direction(setup, form):
    """set_validation runs the validation batch `val_chunk_size` sequences at a time (bounded memory)
    and sums G over the chunks: one sequence per forward gives the same values as the whole batch
    in one forward, for each target form ("auto" switches from rows to the matrix mid-way)."""
    val = {k: torch.cat([v, v.flip(0), v]) for k, v in setup.val_batch.items()}  # 6 sequences
    whole = setup.valuer(target_form=form, val_chunk_size=8)
    whole.set_validation(val)
    chunked = setup.valuer(target_form=form, val_chunk_size=1)
    calls = []
    handle = decoder_blocks(setup.model)[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        chunked.set_validation(val)
    finally:
        handle.remove()
    assert len(calls) == 6  # one model forward per sequence
    forms = {n: d.form for n, d in chunked._target.items()}
    assert forms == {n: d.form for n, d in whole._target.items()}
    if form == "auto":  # rows were kept for the first chunks, then turned into the matrix
        assert set(forms.values()) == {"contract"}, forms
        first = setup.valuer(target_form=form, val_chunk_size=1)
        first.set_validation({k: v[:1] for k, v in val.items()})
        assert "ghost" in {d.form for d in first._target.values()}
    for c in COMPONENTS:
        assert rel_err(getattr(chunked.score(setup.batch), c), getattr(whole.score(setup.batch), c)) <= 1e-12, c


def test_valuation_forwards_run_the_blocks_without_autograd(setup):
    """The valuer's own forwards (set_validation, score) need gradients only from the LM head on
    (the scored blocks are then re-run with autograd): every decoder block of the forward runs with
    grad mode off, the head with it on, the re-run with it on, and the caller's grad mode is restored
    (score also works under torch.no_grad()); the training forward under capture() is left alone."""
    model = setup.model
    seen = []
    hooks = [block.register_forward_hook(lambda m, a, o, i=i: seen.append((i, torch.is_grad_enabled())))
             for i, block in enumerate(decoder_blocks(model))]
    hooks.append(model.lm_head.register_forward_hook(lambda m, a, o: seen.append(("head", torch.is_grad_enabled()))))
    try:
        n_blocks = len(decoder_blocks(model))
        forward = [(i, False) for i in range(n_blocks)] + [("head", True)]
        rerun = [(i, True) for i in range(n_blocks - LAST_K, n_blocks)]
        valuer = setup.valuer()
        assert seen == forward + rerun, seen  # set_validation
        seen.clear()
        with torch.no_grad():
            scores = valuer.score(setup.batch)
            assert not torch.is_grad_enabled()
        assert torch.is_grad_enabled()
        assert seen == forward + rerun, seen
        assert_scores_close(scores, setup.bruteforce("self"), "score under no_grad")
        seen.clear()
        with valuer.capture():
            model(input_ids=setup.batch["input_ids"], attention_mask=setup.batch["attention_mask"])
        assert seen == [(i, True) for i in range(n_blocks)] + [("head", True)], seen
    finally:
        for h in hooks:
            h.remove()
