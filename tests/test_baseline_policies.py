"""XTF, ssToken, TALR and FLOW: each rule against a by-hand twin (explicit loops, float64) on fixed
small batches, exact per-example budgets, the attention capture against Hugging Face's own eager
attentions, and the config checks naming their field. Tiny float64 models built here."""

import math

import pytest
import torch
import torch.nn.functional as F

from alphatoken.data import ConfigError
from alphatoken.losses import kept_count, token_nll
from alphatoken.models import build_tiny_model
from alphatoken.policies import POLICIES, PolicyConfig, StepZeroInputs, TokenContext, get_policy
from alphatoken.policy_inputs import (
    AttentionCapture,
    flow_example_weights,
    otsu_three_class_thresholds,
    prompt_attention_mass,
    received_attention,
    xtf_keep_masks,
)
from alphatoken.train.reference import reference_token_losses

EXACT = 1e-12


def _pad(rows, width):
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row.double()
    return out


def _lower_median(values):
    return sorted(values)[(len(values) - 1) // 2]


def _middle_median(values):
    s, n = sorted(values), len(values)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _top_by_hand(scores, positions, k):
    """The k positions with the largest scores, ties to the smaller position."""
    return set(sorted(positions, key=lambda p: (-scores[p], p))[:k])


def _lerp_quantile(values, q):
    """numpy's default (linear) quantile."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("name,value", [
    ("xtf_attention_layers", 0), ("xtf_attention_layers", 1.5), ("xtf_iqr_factor", -0.1), ("xtf_iqr_factor", math.nan),
    ("xtf_novelty_threshold", 1.5), ("xtf_distance", "manhattan"), ("xtf_domain_words", "def"), ("xtf_domain_words", []),
    ("xtf_domain_words", ["def", " "]), ("sstoken_gamma", 1.2), ("sstoken_gamma", math.inf),
    ("sstoken_attention_only_examples", -1), ("sstoken_attention_only_examples", 2.0), ("talr_tau", 0.0),
    ("talr_weight_floor", 2.0), ("talr_normalize", "mean"), ("flow_temperature", -1.0), ("flow_temperature", math.nan),
])
def test_bad_settings_are_refused_naming_the_field(name, value):
    with pytest.raises(ConfigError) as err:
        PolicyConfig(**{name: value})
    assert err.value.field == name and str(err.value).startswith(f"PolicyConfig.{name}: ")


def test_defaults_and_registry():
    config = PolicyConfig(xtf_domain_words=["def", "return"])
    assert config.xtf_domain_words == ("def", "return")  # a YAML list is stored as a tuple
    default = PolicyConfig()
    assert (default.sstoken_gamma, default.sstoken_attention_only_examples) == (0.5, 10000)  # ssToken's ratio, pre_index
    assert (default.talr_weight_floor, default.talr_normalize, default.talr_tau) == (0.01, "tokens", None)
    assert (default.xtf_novelty_threshold, default.xtf_iqr_factor) == (0.95, 1.0)
    assert default.flow_temperature is None
    for name in ("xtf", "sstoken", "talr", "flow"):
        assert POLICIES[name].doc and POLICIES[name].sft_only
    assert POLICIES["xtf"].precompute is not None and POLICIES["flow"].precompute is not None
    assert POLICIES["sstoken"].needs_attention and POLICIES["sstoken"].needs_reference_loss
    assert not any(POLICIES[n].needs_scores for n in ("xtf", "sstoken", "talr", "flow"))


# ---------------------------------------------------------------------------------------------
# TALR

TALR_LOSS = torch.tensor([[0.2, 1.5, 0.0, 3.0, 0.4],
                          [0.7, 0.1, 2.2, 0.0, 30.0],
                          [5.0, 0.4, 0.9, 1.1, 0.6],
                          [0.05, 0.3, 0.0, 0.0, 0.0]], dtype=torch.float64)
TALR_VALID = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 1], [0, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)


def _talr_by_hand(loss, valid, tau=None, floor=0.01):
    B, W = loss.shape
    if tau is None:
        means = [sum(float(loss[b, p]) for p in range(W) if valid[b, p]) / max(1, int(valid[b].sum())) for b in range(B)]
        tau = max(_lower_median(means), 1e-6)  # torch.median: the lower middle value of 4
    out = torch.zeros(B, W, dtype=torch.float64)
    for b in range(B):
        for p in range(W):
            if valid[b, p]:
                out[b, p] = max(max(math.exp(-float(loss[b, p])), 1e-6) ** (1.0 / tau), floor)
    return out, tau


@pytest.mark.parametrize("tau", [None, 0.8])
def test_talr_weights_equal_the_by_hand_rule(tau):
    ctx = TokenContext(TALR_VALID, TALR_LOSS, rho=0.5)
    config = PolicyConfig(name="talr", talr_tau=tau)
    weights = get_policy("talr").weights(ctx, config)
    expected, used_tau = _talr_by_hand(TALR_LOSS, TALR_VALID, tau)
    assert torch.allclose(weights, expected, rtol=0, atol=EXACT)
    if tau is None:  # the lower median of the 4 rows' means, not the mean of the two middle values
        means = sorted(float((TALR_LOSS[b] * TALR_VALID[b]).sum() / TALR_VALID[b].sum()) for b in range(4))
        assert used_tau == pytest.approx(means[1]) and abs(means[2] - means[1]) > 0.1
    assert float(weights[1, 4]) == 0.01  # l = 30: p^(1/tau) is under the floor


@pytest.mark.parametrize("normalize,expected", [("tokens", 14.0), ("sequences", 4.0), ("weights", None)])
def test_talr_step_normaliser(normalize, expected):
    ctx = TokenContext(TALR_VALID, TALR_LOSS, rho=0.5)
    config = PolicyConfig(name="talr", talr_normalize=normalize)
    policy = get_policy("talr")
    weights = policy.weights(ctx, config)
    share = float(policy.normalizer_share(weights, TALR_VALID, config))
    assert share == (float(weights.sum()) if expected is None else expected)
    assert int(TALR_VALID.sum()) == 14


# ---------------------------------------------------------------------------------------------
# FLOW


def _flow_features():
    """Four examples (prompt -100, response labelled) and their reference losses per loss position."""
    labels = [[-100, -100, 5, 6, 7], [-100, 8, 9], [-100, -100, -100, 4, 4, 4], [-100, -100, 3, 3]]
    features = [{"input_ids": [1] * len(lab), "labels": lab} for lab in labels]
    g = torch.Generator().manual_seed(3)
    losses = []
    for lab in labels:
        row = torch.rand(len(lab) - 1, generator=g, dtype=torch.float64) * 3
        row[torch.tensor(lab[1:]) == -100] = 0.0  # the loop's reference losses are 0 off the response
        losses.append(row)
    return features, losses


def _flow_by_hand(features, losses, tau=None):
    L = []
    for feature, row in zip(features, losses):
        response = [p for p in range(len(feature["labels"]) - 1) if feature["labels"][p + 1] != -100]
        L.append(sum(float(row[p]) for p in response) / len(response))
    tau = _middle_median(L) if tau is None else tau  # np.median
    rows = []
    for feature, li in zip(features, L):
        rows.append(torch.tensor([math.exp(-li / tau) if feature["labels"][p + 1] != -100 else 0.0
                                  for p in range(len(feature["labels"]) - 1)], dtype=torch.float64))
    return rows


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_flow_weights_equal_the_by_hand_rule(temperature):
    features, losses = _flow_features()
    rows = flow_example_weights(features, losses, temperature)
    expected = _flow_by_hand(features, losses, temperature)
    for got, want in zip(rows, expected):
        assert torch.allclose(got, want, rtol=0, atol=EXACT)
    # the registered policy: its precompute is this helper, its rule reads the rows, K counts response tokens
    config = PolicyConfig(name="flow", flow_temperature=temperature)
    policy = get_policy("flow")
    inputs = StepZeroInputs(None, None, features, losses, 0, "cpu", 2)
    assert all(torch.equal(a, b) for a, b in zip(policy.precompute(inputs, config), rows))
    width = max(len(f["labels"]) for f in features) - 1
    valid = torch.stack([F.pad(torch.tensor(f["labels"][1:]) != -100, (0, width - len(f["labels"]) + 1)) for f in features])
    ctx = TokenContext(valid, torch.rand(valid.shape, dtype=torch.float64), 0.5, reference_loss=_pad(losses, width),
                       precomputed=_pad(rows, width))
    weights = policy.weights(ctx, config)
    assert torch.allclose(weights, _pad(expected, width), rtol=0, atol=EXACT)
    assert float(policy.normalizer_share(weights, valid, config)) == int(valid.sum())


def test_flow_example_without_response_weighs_zero_and_the_median_skips_it():
    features, losses = _flow_features()
    features.append({"input_ids": [1, 1, 1], "labels": [-100, -100, -100]})
    losses.append(torch.zeros(2, dtype=torch.float64))
    rows = flow_example_weights(features, losses)
    assert torch.equal(rows[-1], torch.zeros(2, dtype=torch.float64))
    for got, want in zip(rows[:-1], _flow_by_hand(features[:-1], losses[:-1])):  # same tau as without it
        assert torch.allclose(got, want, rtol=0, atol=EXACT)


def test_policies_refuse_a_missing_step0_value():
    valid = torch.ones(2, 3, dtype=torch.bool)
    ctx = TokenContext(valid, torch.zeros(2, 3, dtype=torch.float64), 0.5, reference_loss=torch.zeros(2, 3))
    for name in ("flow", "xtf"):
        with pytest.raises(ValueError, match="needs its step-0 values"):
            get_policy(name).weights(ctx, PolicyConfig(name=name))
    ctx.precomputed = torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"of shape \(2, 3\), got \(2, 4\)"):
        get_policy("flow").weights(ctx, PolicyConfig(name="flow"))


# ---------------------------------------------------------------------------------------------
# ssToken


def _sstoken_batch(seed=0):
    """B = 3 rows, T = 8 (7 loss positions), prompts of 3, 2 and 4 tokens, right padding; a causal
    row-stochastic head-mean attention [B, T, T]."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.zeros(3, 7, dtype=torch.bool)
    valid[0, 2:7] = True  # labels 3..7
    valid[1, 1:5] = True  # labels 2..5, padding after
    valid[2, 3:6] = True  # labels 4..6
    token_loss = torch.rand(3, 7, generator=g, dtype=torch.float64) * 3 * valid
    reference_loss = torch.rand(3, 7, generator=g, dtype=torch.float64) * 3 * valid
    logits = torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    attention = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
    return valid, token_loss, reference_loss, attention


def _sstoken_by_hand(valid, token_loss, reference_loss, attention, gammas, rho):
    keep = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        response = [p for p in range(valid.shape[1]) if valid[b, p]]
        p0 = response[0]  # first response token t0 = p0 + 1: the prompt is positions 0..p0
        excess = {p: float(reference_loss[b, p] - token_loss[b, p]) for p in response}
        low, high = min(excess.values()), max(excess.values())
        scores = {}
        for p in response:
            mass = sum(float(attention[b, p + 1, j]) for j in range(p0 + 1))
            scores[p] = gammas[b] * (excess[p] - low) / (high - low + 1e-8) + (1 - gammas[b]) * mass
        for p in _top_by_hand(scores, response, math.ceil(round(rho * len(response), 9))):
            keep[b, p] = True
    return keep


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.6, 1.0])
def test_sstoken_mask_equals_the_by_hand_rule(rho):
    valid, token_loss, reference_loss, attention = _sstoken_batch()
    positions = torch.tensor([5, 10000, 20000])  # row 0 inside the attention-only warm-up (source: idx < pre_index)
    ctx = TokenContext(valid, token_loss, rho, reference_loss=reference_loss, attention=attention, epoch_position=positions)
    weights = get_policy("sstoken").weights(ctx, PolicyConfig(name="sstoken", rho=0.5))
    expected = _sstoken_by_hand(valid, token_loss, reference_loss, attention, [0.0, 0.5, 0.5], rho)
    assert torch.equal(weights > 0, expected)
    assert set(weights.unique().tolist()) <= {0.0, 1.0}
    for b in range(3):  # the budget is per example: ceil(rho |response|)
        assert int((weights[b] > 0).sum()) == kept_count(int(valid[b].sum()), rho)


def test_sstoken_gamma_one_is_token_cleaning_per_example_and_gamma_zero_is_attention_only():
    valid, token_loss, reference_loss, attention = _sstoken_batch(seed=4)
    ctx = TokenContext(valid, token_loss, 0.5, reference_loss=reference_loss, attention=attention)
    cleaning = get_policy("sstoken").weights(ctx, PolicyConfig(name="sstoken", sstoken_gamma=1.0, sstoken_attention_only_examples=0))
    per_example = torch.stack([get_policy("token_cleaning").weights(
        TokenContext(valid[b:b + 1], token_loss[b:b + 1], 0.5, reference_loss=reference_loss[b:b + 1]),
        PolicyConfig(name="token_cleaning"))[0] for b in range(3)])
    assert torch.equal(cleaning, per_example)
    semantic = get_policy("sstoken").weights(ctx, PolicyConfig(name="sstoken", sstoken_gamma=0.0, sstoken_attention_only_examples=0))
    assert torch.equal(semantic > 0, _sstoken_by_hand(valid, token_loss, reference_loss, attention, [0.0] * 3, 0.5))


def test_sstoken_refuses_missing_inputs():
    valid, token_loss, reference_loss, attention = _sstoken_batch()
    ctx = TokenContext(valid, token_loss, 0.5, reference_loss=reference_loss)
    with pytest.raises(ValueError, match=r"ctx.attention of shape \(3, 8, 8\), got None"):
        get_policy("sstoken").weights(ctx, PolicyConfig(name="sstoken"))
    ctx.attention = attention
    with pytest.raises(ValueError, match="needs ctx.epoch_position"):
        get_policy("sstoken").weights(ctx, PolicyConfig(name="sstoken"))
    assert get_policy("sstoken").weights(ctx, PolicyConfig(name="sstoken", sstoken_attention_only_examples=0)).sum() > 0


# ---------------------------------------------------------------------------------------------
# The attention capture


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_capture_equals_hf_eager_attentions(arch, impl):
    """On a padded batch, the head-mean probabilities of every block equal Hugging Face's
    `output_attentions` of an eager copy run on each row alone (to float32 precision: HF's eager
    softmax runs in float32 even in float64 models); the model's kernel is restored on exit."""
    ids, mask = _batch()
    eager = build_tiny_model(arch, attn_implementation="eager")
    model = build_tiny_model(arch, attn_implementation=impl)
    with AttentionCapture(model, last_k=None) as capture:
        model(input_ids=ids, attention_mask=mask)
    assert model.config._attn_implementation == impl and len(capture.values) == 4
    for b in range(3):
        n = int(mask[b].sum())
        alone = eager(input_ids=ids[b:b + 1, :n], output_attentions=True).attentions  # 4 x (1, H, n, n)
        for ours, theirs in zip(capture.values, alone):
            assert ours.shape == (3, 10, 10)
            assert float((ours[b, :n, :n] - theirs[0].mean(dim=0)).abs().max()) < 1e-6
    model(input_ids=ids, attention_mask=mask)  # closed: nothing more is recorded
    assert len(capture.values) == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_capture_keeps_the_forward_and_its_gradients(arch, impl):
    """Logits and parameter gradients with the last block captured are the model's own (to the
    float32 rounding of HF's eager softmax)."""
    ids = _batch()[0]
    model = build_tiny_model(arch, attn_implementation=impl)
    plain = model(input_ids=ids).logits
    plain_grads = torch.autograd.grad(plain.square().sum(), list(model.parameters()))
    with AttentionCapture(model, last_k=1):
        logits = model(input_ids=ids).logits
        grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    assert float((logits - plain).abs().max()) < 1e-6 * float(plain.abs().max())
    for a, b in zip(grads, plain_grads):
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()) + 1e-12


def test_attention_capture_survives_gradient_checkpointing():
    """Open across the backward, the recomputed last block runs the same kernel: same gradients as
    without checkpointing; the forward's value comes first."""
    ids, mask = _batch(1)
    grads = {}
    for checkpointing in (False, True):
        model = build_tiny_model("llama", attn_implementation="sdpa")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with AttentionCapture(model, last_k=1) as capture:
            capture.reset()
            logits = model(input_ids=ids, attention_mask=mask).logits
            first = capture.values[0]
            logits.square().sum().backward()
        grads[checkpointing] = [p.grad.clone() for p in model.parameters()]
        assert len(capture.values) == (2 if checkpointing else 1) and torch.equal(capture.values[0], first)
    assert max(float((a - b).abs().max()) for a, b in zip(grads[True], grads[False])) < 1e-10


def test_prompt_attention_mass_of_a_real_forward():
    ids, mask = _batch(2)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    labels[0, :5] = -100
    model = build_tiny_model("qwen2")
    with AttentionCapture(model) as capture:
        model(input_ids=ids, attention_mask=mask)
    attention = capture.values[0]  # (B, T, T)
    valid = labels[:, 1:] != -100
    mass = prompt_attention_mass(attention, valid)
    for b in range(3):
        t0 = int((labels[b] != -100).nonzero()[0])  # first response token
        for p in range(9):
            want = sum(float(attention[b, p + 1, j]) for j in range(t0)) if valid[b, p] else 0.0
            assert abs(float(mass[b, p]) - want) < EXACT


# ---------------------------------------------------------------------------------------------
# XTF


def _otsu_by_hand(values, bins=256):
    v = [float(x) for x in values]
    if len(set(v)) < 3:
        return None
    low, high = min(v), max(v)
    hist = [0.0] * bins
    for x in v:
        hist[min(bins - 1, max(0, math.floor((x - low) * (bins / (high - low)))))] += 1
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64).tolist()
    centres = [(edges[k] + edges[k + 1]) / 2 for k in range(bins)]

    count, total = [0.0], [0.0]  # running sums over bins 0..k-1
    for k in range(bins):
        count.append(count[-1] + hist[k])
        total.append(total[-1] + hist[k] * centres[k])

    def term(lo, hi):  # bins lo..hi inclusive
        p, s = count[hi + 1] - count[lo], total[hi + 1] - total[lo]
        return s * s / p if p > 0 else 0.0

    best, best_value = None, -math.inf
    for i in range(bins - 2):
        for j in range(i + 1, bins - 1):
            value = term(0, i) + term(i + 1, j) + term(j + 1, bins - 1)
            if value > best_value:
                best, best_value = (centres[i], centres[j]), value
    return best


def test_multi_otsu_thresholds_equal_the_by_hand_search():
    g = torch.Generator().manual_seed(5)
    values = torch.cat([torch.randn(30, generator=g) * 0.3, 4 + torch.randn(20, generator=g) * 0.5,
                        9 + torch.randn(25, generator=g), torch.tensor([4.0, 4.0, 4.0])]).double()
    ours = otsu_three_class_thresholds(values, bins=32)
    assert ours == _otsu_by_hand(values, bins=32)
    classes = (values >= ours[0]).long() + (values >= ours[1]).long()  # np.digitize
    assert classes[:30].eq(0).all() and classes[30:50].eq(1).all() and classes[50:75].eq(2).all()  # the clusters
    assert otsu_three_class_thresholds(torch.tensor([1.0, 1.0, 2.0])) is None


def test_received_attention_equals_the_by_hand_mean():
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    got = received_attention(probs, mask)
    for b in range(2):
        length = int(mask[b].sum())
        for k in range(6):
            queries = [q for q in range(k + 1, length)] if k < length else []
            if not queries:
                assert math.isnan(float(got[b, k]))
                continue
            want = sum(float(probs[b, :, q, k].mean()) for q in queries) / len(queries)
            assert abs(float(got[b, k]) - want) < EXACT


XTF_WORDS = ("def", "return", "for")


def _xtf_features(tokenizer):
    texts = [("add two numbers", "def add(a, b):\n    return a + b"), ("loop", "for i in range(3): print(i)"),
             ("say hi", "hello there"), ("square", "def sq(x): return x * x"), ("count", "n = len(items)")]
    features = []
    for prompt, response in texts:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        features.append({"input_ids": p + r, "labels": [-100] * len(p) + r})
    return features


def _xtf_by_hand(model, features, losses, layers, iqr_factor, novelty, distance, words, tokenizer):
    """One example at a time, Hugging Face's own eager attentions, explicit loops."""
    emb = model.get_input_embeddings().weight.detach().double()
    word_vectors = [emb[tokenizer(w, add_special_tokens=False)["input_ids"]].mean(dim=0) for w in words]
    centre = sum(word_vectors) / len(word_vectors)
    per_example = []
    for feature in features:
        ids = torch.tensor([feature["input_ids"]])
        attentions = model(input_ids=ids, output_attentions=True).attentions
        chosen = attentions if layers is None else attentions[-layers:]
        n = ids.shape[1]
        rows = []
        for p in range(n - 1):
            t = p + 1
            if feature["labels"][t] == -100:
                rows.append(None)
                continue
            later = list(range(t + 1, n))
            importance = (sum(sum(float(a[0, :, q, t].mean()) for q in later) / len(later) for a in chosen) / len(chosen)
                          if later else None)
            vector = emb[feature["input_ids"][t]]
            if distance == "cosine":
                d = 1 - float(vector @ centre) / (float(vector.norm()) * float(centre.norm()))
            else:
                d = float((vector - centre).norm())
            rows.append({"importance": importance, "d": d, "p": math.exp(-float(losses[len(per_example)][p]))})
        per_example.append(rows)
    all_d = [r["d"] for rows in per_example for r in rows if r]
    d_low, d_high = min(all_d), max(all_d)
    thresholds = _otsu_by_hand([1 - (d - d_low) / (d_high - d_low) for d in all_d])
    masks, fired = [], {"low": 0, "known": 0, "irrelevant": 0}
    for rows in per_example:
        judged = [r["importance"] for r in rows if r and r["importance"] is not None]
        q1, q3 = _lerp_quantile(judged, 0.25), _lerp_quantile(judged, 0.75)
        mask = []
        for r in rows:
            if r is None:
                mask.append(0.0)
                continue
            low = r["importance"] is not None and r["importance"] < q1 - iqr_factor * (q3 - q1)
            known = r["p"] > novelty
            rel = 1 - (r["d"] - d_low) / (d_high - d_low)
            irrelevant = thresholds[0] <= rel < thresholds[1]
            fired["low"] += low
            fired["known"] += known
            fired["irrelevant"] += irrelevant
            mask.append(0.0 if (low or known or irrelevant) else 1.0)
        masks.append(torch.tensor(mask, dtype=torch.float64))
    return masks, fired


@pytest.mark.parametrize("layers,distance", [(None, "cosine"), (2, "euclidean")])
def test_xtf_masks_equal_the_by_hand_rule(tokenizer, layers, distance):
    """Batched with padding (3 per forward) against one example at a time; thresholds set so that
    each of the three attributes marks noise on this data (a random tiny model knows no token at
    p > 0.95)."""
    model = build_tiny_model("llama")
    features = _xtf_features(tokenizer)
    losses = reference_token_losses(model, features, tokenizer.pad_token_id, "cpu", 3, False)
    iqr_factor, novelty = 0.0, 0.0045
    masks = xtf_keep_masks(model, tokenizer, features, losses, tokenizer.pad_token_id, "cpu", 3, layers, iqr_factor,
                           novelty, distance, XTF_WORDS)
    expected, fired = _xtf_by_hand(model, features, losses, layers, iqr_factor, novelty, distance, XTF_WORDS, tokenizer)
    assert all(v > 0 for v in fired.values()), fired
    for got, want in zip(masks, expected):
        assert torch.equal(got.double(), want)
    # the registered policy computes the same masks from its config, and its rule reads them
    config = PolicyConfig(name="xtf", xtf_attention_layers=layers, xtf_iqr_factor=iqr_factor,
                          xtf_novelty_threshold=novelty, xtf_distance=distance, xtf_domain_words=XTF_WORDS)
    inputs = StepZeroInputs(model, tokenizer, features, losses, tokenizer.pad_token_id, "cpu", 2)
    assert all(torch.equal(a, b) for a, b in zip(POLICIES["xtf"].precompute(inputs, config), masks))
    width = max(len(f["input_ids"]) for f in features) - 1
    valid = torch.stack([F.pad(torch.tensor(f["labels"][1:]) != -100, (0, width - len(f["labels"]) + 1)) for f in features])
    ctx = TokenContext(valid, torch.rand(valid.shape, dtype=torch.float64), 0.5, reference_loss=_pad(losses, width),
                       precomputed=_pad(masks, width))
    weights = get_policy("xtf").weights(ctx, config)
    assert torch.equal(weights, _pad(expected, width))
    assert float(get_policy("xtf").normalizer_share(weights, valid, config)) == float(weights.sum())  # mean over kept


def test_xtf_defaults_run_on_a_tiny_model(tokenizer):
    """With the paper's thresholds a random tiny model knows nothing (p < 0.95 everywhere): only
    reasoning importance and task relevance mark noise; the masks stay on the response."""
    model = build_tiny_model("gemma3", attn_implementation="sdpa")  # HF's float64 eager gemma3 turns padded batches into NaN
    features = _xtf_features(tokenizer)
    losses = reference_token_losses(model, features, tokenizer.pad_token_id, "cpu", 2, False)
    config = PolicyConfig(name="xtf")
    masks = POLICIES["xtf"].precompute(StepZeroInputs(model, tokenizer, features, losses, tokenizer.pad_token_id, "cpu", 2), config)
    for feature, mask in zip(features, masks):
        response = torch.tensor(feature["labels"][1:]) != -100
        assert mask.shape == response.shape and not (mask.bool() & ~response).any()
        assert 0 < int(mask.sum()) < int(response.sum())
    on_response = torch.cat([torch.tensor(f["labels"][1:]) != -100 for f in features])
    assert torch.exp(-torch.cat(losses))[on_response].max() < 0.95


def test_reference_losses_used_by_the_tests_are_the_model_nll(tokenizer):
    """The twins read the loop's reference losses (alphatoken.train.reference): the model's NLL."""
    model = build_tiny_model("llama")
    feature = _xtf_features(tokenizer)[0]
    losses = reference_token_losses(model, [feature], tokenizer.pad_token_id, "cpu", 1, False)[0]
    ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor([feature["labels"]])
    assert torch.allclose(losses, token_nll(model(input_ids=ids).logits, labels)[0], rtol=0, atol=EXACT)
