"""Data-free drift: KL(model || reference) on the model's own greedy responses.

For each prompt (chat template + generation prompt), the model greedily generates up to
`max_new_tokens` response tokens y_1..y_n (stopping after EOS, which is counted). Then, with
pi = model and pi_ref = reference both read on the same sequence,

    KL_t = sum_v pi(v | x, y_<t) * (log pi(v | x, y_<t) - log pi_ref(v | x, y_<t))

and the result is the mean of KL_t over all response tokens of all prompts (token-weighted).
Measuring on the model's own responses (not on held-out text) asks how far the fine-tuned model's
behaviour has moved from the reference where the model actually goes; it needs no data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alphatoken.eval.generation import greedy_response


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) along the last axis, computed in float64.

    logits, ref_logits: (..., V) -> (...)
    """
    log_p = F.log_softmax(logits.double(), dim=-1)  # (..., V)
    log_q = F.log_softmax(ref_logits.double(), dim=-1)  # (..., V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)


@torch.no_grad()
def kl_to_reference(model, reference, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> float:
    """Mean per-token KL(model || reference) over the model's greedy responses to `prompts`
    (see the module docstring). Both models must share the tokenizer; returns a float (nats)."""
    was_training = (model.training, reference.training)
    model.eval()
    reference.eval()
    total, count = 0.0, 0
    for prompt in tqdm(prompts, desc="KL to reference"):
        ids, prompt_len = greedy_response(model, tokenizer, prompt, max_new_tokens)  # (1, L)
        n = ids.shape[1] - prompt_len
        if n == 0:
            continue
        # logits at p predict token p + 1: response tokens are predicted at P-1 .. L-2
        logits = model(input_ids=ids).logits[0, prompt_len - 1 : -1]  # (n, V)
        ref_logits = reference(input_ids=ids.to(next(reference.parameters()).device)).logits[0, prompt_len - 1 : -1]
        total += float(token_kl(logits, ref_logits.to(logits.device)).sum())
        count += n
    model.train(was_training[0])
    reference.train(was_training[1])
    if count == 0:
        raise ValueError("no response tokens were generated for any prompt")
    return total / count
