"""KL(model || reference) on the model's greedy responses: 0 against itself, > 0 against a perturbed
copy, and equal to a brute-force per-prefix, per-vocabulary-entry loop in float64."""

import copy
import math

import pytest
import torch

from alphatoken.eval.drift import kl_to_reference
from alphatoken.eval.generation import greedy_response

PROMPTS = ["Say hi.", "List three colours:"]
MAX_NEW = 6


def perturbed(model, scale=0.05, seed=1):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return other


def brute_force_kl(model, reference, tokenizer, prompts, max_new_tokens):
    """Re-run both models on every prefix and sum p * (log p - log q) entry by entry."""
    total, count = 0.0, 0
    for prompt in prompts:
        ids, prompt_len = greedy_response(model, tokenizer, prompt, max_new_tokens)
        for t in range(prompt_len, ids.shape[1]):  # response token t, predicted from ids[:t]
            with torch.no_grad():
                p = torch.softmax(model(input_ids=ids[:, :t]).logits[0, -1].double(), -1).tolist()
                q = torch.softmax(reference(input_ids=ids[:, :t]).logits[0, -1].double(), -1).tolist()
            total += sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q) if pv > 0)
            count += 1
    return total / count


def test_kl_of_model_with_itself_is_zero(tiny_model, tokenizer):
    assert kl_to_reference(tiny_model, tiny_model, tokenizer, PROMPTS, MAX_NEW) == 0.0


def test_kl_to_perturbed_copy_is_positive_and_matches_brute_force(tiny_model, tokenizer):
    reference = perturbed(tiny_model)
    fast = kl_to_reference(tiny_model, reference, tokenizer, PROMPTS, MAX_NEW)
    slow = brute_force_kl(tiny_model, reference, tokenizer, PROMPTS, MAX_NEW)
    assert fast > 1e-6
    assert fast == pytest.approx(slow, abs=1e-6, rel=1e-6)


def test_response_stops_after_eos(tokenizer):
    from alphatoken.models import build_tiny_model

    model = build_tiny_model("llama", dtype=torch.float64)
    vocab, hidden = model.lm_head.out_features, model.lm_head.in_features
    # a head that always prefers EOS, then one that never emits it
    model.lm_head = torch.nn.Linear(hidden, vocab, bias=True, dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tokenizer.eos_token_id] = 10.0
    ids, prompt_len = greedy_response(model, tokenizer, PROMPTS[0], 40)
    assert ids[0, prompt_len:].tolist() == [tokenizer.eos_token_id]
    with torch.no_grad():
        model.lm_head.bias[tokenizer.eos_token_id] = -10.0
        model.lm_head.bias[65] = 5.0
    ids, prompt_len = greedy_response(model, tokenizer, PROMPTS[0], 40)
    assert ids[0, prompt_len:].tolist() == [65] * 40
