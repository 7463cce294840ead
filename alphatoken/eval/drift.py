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


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, P) prompt token ids: the chat template with the generation prompt when there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) along the last axis, computed in float64.

    logits, ref_logits: (..., V) -> (...)
    """
    log_p = F.log_softmax(logits.double(), dim=-1)  # (..., V)
    log_q = F.log_softmax(ref_logits.double(), dim=-1)  # (..., V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)


@torch.no_grad()
def greedy_response(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """(1, P + n) ids of prompt + greedy response, and P. The response stops after EOS."""
    device = next(model.parameters()).device
    prompt_ids = _prompt_ids(tokenizer, prompt).to(device)  # (1, P)
    sequence = model.generate(
        input_ids=prompt_ids,
        attention_mask=torch.ones_like(prompt_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (1, P + n'), n' <= max_new_tokens
    response = sequence[0, prompt_ids.shape[1]:]  # (n',)
    eos = (response == tokenizer.eos_token_id).nonzero()
    n = int(eos[0]) + 1 if len(eos) else len(response)  # keep EOS, drop anything after it
    return sequence[:, : prompt_ids.shape[1] + n], prompt_ids.shape[1]


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
