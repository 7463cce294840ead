"""Greedy generation shared by the evaluations that let the model answer (HumanEval, MBPP, the KL on
the model's own responses): one prompt at a time, chat template with the generation prompt, the
answer kept up to and including its first EOS."""

from __future__ import annotations

import torch


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, P) prompt token ids: the chat template with the generation prompt when there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy_response(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[torch.Tensor, int]:
    """(1, P + n) ids of prompt + greedy response, and P. The response stops after EOS."""
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt).to(device)  # (1, P)
    sequence = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (1, P + n'), n' <= max_new_tokens
    response = sequence[0, ids.shape[1]:]  # (n',)
    eos = (response == tokenizer.eos_token_id).nonzero()
    n = int(eos[0]) + 1 if len(eos) else len(response)  # keep EOS, drop anything after it
    return sequence[:, : ids.shape[1] + n], ids.shape[1]
