"""Slow, obviously-correct reference for the token valuation (METHOD.md), used only by the tests.

Every scored linear is patched so that each position (b, p) multiplies by its own copy W[b, p] of the
weight (a leaf of shape (B, T, d_out, d_in)); then `grad W[b, p]` is exactly the per-position weight
gradient e_p (x) x_p. `self`: one backward per loss position of l_p alone; `total`: one backward of
L = sum_p l_p. The value-path term builds the explicit (d_out, d_in) matrix
sum_h sum_k A_h[k, p] c_{k,h} (x) x_p on the rows of head group g(h), with c_k the autograd
gradient of the attention output at k (what the attention function returns, before the block's
output gate, if any, and o_proj) and A recomputed in plain eager math from the attention inputs.
Blocks without softmax attention (the Gated-DeltaNet blocks of a hybrid) have no value-path term;
their linears are scored by the direct terms like any other."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alphatoken.blocks import scored_blocks, scored_linears

RECORDING = "bruteforce_recording"
_PROBS: dict = {}  # id(attention module) -> (B, H, T, T) probabilities
_OUTPUTS: dict = {}  # id(attention module) -> (B, T, H, hd) attention output, in the graph


def _recording_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """The model's sdpa attention, plus an explicit eager computation of the probabilities."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    _OUTPUTS[id(module)] = out[0]  # (B, T, H, hd)
    n_rep = query.shape[1] // key.shape[1]
    keys = key.detach().repeat_interleave(n_rep, dim=1)  # (B, H, T, hd)
    scale = scaling if scaling is not None else module.head_dim**-0.5
    logits = (query.detach() @ keys.transpose(2, 3)) * scale  # (B, H, T, T)
    T = query.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, :, :, :T]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked (padding) rows -> 0
    _PROBS[id(module)] = probs
    return out


AttentionInterface.register(RECORDING, _recording_attention)
AttentionMaskInterface.register(RECORDING, sdpa_mask)


def attention_modules(model, last_k: int) -> list:
    """The softmax-attention module (owning v_proj and o_proj) of every scored block that has one."""
    found = []
    for _, block in scored_blocks(model, last_k):
        found += [m for m in block.modules() if hasattr(m, "v_proj") and hasattr(m, "o_proj")][:1]
    return found


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """l_p = -log pi(labels[p+1]) at every loss position, 0 elsewhere. (B, T, V) -> (B, T-1)."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    return nll.view(B, T - 1)


def validation_gradient(model, last_k: int, val_batch: dict, objective=None) -> dict:
    """G = grad_W J_tgt by plain autograd; J_tgt = mean token loss over the response tokens by default."""
    linears = scored_linears(model, last_k)
    if objective is None:
        out = model(input_ids=val_batch["input_ids"], attention_mask=val_batch["attention_mask"])
        losses = token_losses(out.logits, val_batch["labels"])
        objective_value = losses.sum() / (val_batch["labels"][:, 1:] != -100).sum()
    else:
        objective_value = objective(model, val_batch)
    grads = torch.autograd.grad(objective_value, [lin.weight for lin in linears.values()])
    return {name: g.detach() for name, g in zip(linears, grads)}


def proxy_direction(model, last_k: int, fisher: dict, reference: dict) -> dict:
    params = dict(model.named_parameters())
    return {n: fisher[n] * (params[n].detach() - reference[n]) for n in scored_linears(model, last_k)}


@contextmanager
def _per_position_weights(model, linears: dict, leaves: dict, inputs: dict):
    """Patch every scored linear: z[b, p] = W[b, p] x[b, p] + bias with a fresh leaf W (B, T, d_out, d_in)."""

    def patched(name, linear):
        def forward(x):
            B, T, _ = x.shape
            w = linear.weight.detach().expand(B, T, *linear.weight.shape).clone().requires_grad_(True)
            leaves[name], inputs[name] = w, x
            z = torch.einsum("btoi,bti->bto", w, x)
            return z if linear.bias is None else z + linear.bias
        return forward

    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}  # text/vision sub-configs too
    saved_impl = {key: cfg.__dict__.get("_attn_implementation_internal") for key, cfg in configs.items()}
    for name, linear in linears.items():
        linear.forward = patched(name, linear)
    for cfg in configs.values():
        cfg._attn_implementation_internal = RECORDING
    try:
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation_internal = saved_impl[key]
        for linear in linears.values():
            del linear.forward


def bruteforce_scores(model, batch: dict, *, last_k: int, window: int, lam: float, signal: str,
                      target: dict | None, proxy: dict | None, example_scale=None) -> dict:
    """All five scores, aligned with labels, by materialising per-position weight gradients."""
    linears = scored_linears(model, last_k)
    labels = batch["labels"]
    B, T = labels.shape
    leaves, inputs = {}, {}
    _PROBS.clear()
    _OUTPUTS.clear()
    with _per_position_weights(model, linears, leaves, inputs):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = token_losses(out.logits, labels)  # (B, T-1)
    names = list(linears)
    attns = attention_modules(model, last_k)
    o_names = [next(n for n in names if linears[n] is a.o_proj) for a in attns]
    v_names = [next(n for n in names if linears[n] is a.v_proj) for a in attns]
    wanted = [leaves[n] for n in names] + [_OUTPUTS[id(a)] for a in attns]

    weight_grad = {n: torch.zeros_like(leaves[n]) for n in names}  # (B, T, d_out, d_in): e_p (x) x_p
    ctx_err = {n: torch.zeros_like(_OUTPUTS[id(a)]) for n, a in zip(o_names, attns)}  # (B, T, H, hd): grad of attn output
    if signal == "total":
        grads = torch.autograd.grad(losses.sum(), wanted, allow_unused=True)
        for n, g in zip(names, grads):
            weight_grad[n] = g
        for n, g in zip(o_names, grads[len(names):]):
            ctx_err[n] = g
    else:
        for b in range(B):
            for p in range(T - 1):
                if labels[b, p + 1] == -100:
                    continue
                grads = torch.autograd.grad(losses[b, p], wanted, retain_graph=True, allow_unused=True)
                for n, g in zip(names, grads):
                    weight_grad[n][b, p] = g[b, p]
                for n, g in zip(o_names, grads[len(names):]):
                    ctx_err[n][b, p] = g[b, p]

    scores = {k: torch.zeros(B, T, dtype=torch.float64) for k in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau")}
    for kind, direction in (("tgt", target), ("prx", proxy)):
        if direction is None:
            continue
        for n in names:
            scores[f"{kind}_dir"] += (weight_grad[n] * direction[n]).sum((-1, -2))
        for attn, o_name, v_name in zip(attns, o_names, v_names):
            probs = _PROBS[id(attn)]  # (B, H, T, T)
            H = probs.shape[1]
            c = ctx_err[o_name]  # (B, T, H, hd)
            hd = c.shape[-1]
            n_rep = H // (linears[v_name].out_features // hd)
            x_v = inputs[v_name].detach()  # (B, T, d_in)
            for b in range(B):
                for p in range(T):
                    m = torch.zeros_like(direction[v_name])  # (d_out, d_in)
                    for h in range(H):
                        g = h // n_rep
                        for k in range(p + 1, min(p + window, T - 1) + 1):
                            m[g * hd:(g + 1) * hd] += probs[b, h, k, p] * torch.outer(c[b, k, h], x_v[b, p])
                    scores[f"{kind}_cau"][b, p] += (m * direction[v_name]).sum()
    if example_scale is not None:
        scores = {k: v * example_scale[:, None] for k, v in scores.items()}
    aligned = {}
    for k, v in scores.items():
        shifted = torch.zeros_like(v)
        shifted[:, 1:] = v[:, :-1]
        aligned[k] = torch.where(labels != -100, shifted, torch.zeros_like(shifted))
    aligned["total"] = aligned["tgt_dir"] + aligned["tgt_cau"] + lam * (aligned["prx_dir"] + aligned["prx_cau"])
    return aligned


def bruteforce_scores_by_autograd(model, batch: dict, *, last_k: int, window: int, lam: float, signal: str,
                                  target: dict | None, proxy: dict | None, example_scale=None) -> dict:
    """All five scores like `bruteforce_scores`, but with nothing derived by hand, so that it holds for
    any scored weights, the LoRA factors of a peft-wrapped model included.

    Direct terms: the per-position gradients of every scored weight, as there. Value path (Eq. 9):
    with A_h and the per-position context errors c_k (gradient of the o_proj input, `self`: of l_k
    alone) held constant, token p's value-path term for a scored weight is the gradient, taken at
    position p's own weight copy, of the surrogate
        S = sum_{b, h, p, k = p+1 .. min(p+W, T-1)} A_h[k, p] c_{k,h} . v_{p, g(h)}
    with v the output of that block's v_proj module (base weight plus adapters). Only the scored
    weights inside the v_proj module are differentiated, and position p's copy reaches v only at p,
    so one backward of S gives every token's term; autograd applies the chain rule through the adapter."""
    linears = scored_linears(model, last_k)
    labels = batch["labels"]
    B, T = labels.shape
    attns = attention_modules(model, last_k)
    names = list(linears)
    feeding = [[n for n in names if any(linears[n] is m for m in a.v_proj.modules())] for a in attns]
    values, handles = {}, []  # block -> v_proj output (B, T, Hkv*hd)

    def keep(store, i, pick):
        def hook(module, args, output):
            store.setdefault(i, pick(args, output))  # returns None: the output is left alone
        return hook

    for i, attn in enumerate(attns):
        handles.append(attn.v_proj.register_forward_hook(keep(values, i, lambda args, output: output)))
    leaves, inputs = {}, {}
    _PROBS.clear()
    _OUTPUTS.clear()
    try:
        with _per_position_weights(model, linears, leaves, inputs):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    losses = token_losses(out.logits, labels)  # (B, T-1)
    contexts = [_OUTPUTS[id(a)] for a in attns]  # (B, T, H, hd) attention outputs
    wanted = [leaves[n] for n in names] + contexts

    weight_grad = {n: torch.zeros_like(leaves[n]) for n in names}  # (B, T, d_out, d_in): e_p (x) x_p
    ctx_err = [torch.zeros_like(contexts[i]) for i in range(len(attns))]  # (B, T, H, hd)
    if signal == "total":
        grads = torch.autograd.grad(losses.sum(), wanted, retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                weight_grad[n] = g
        for i, g in enumerate(grads[len(names):]):
            if g is not None:
                ctx_err[i] = g
    else:
        for b in range(B):
            for p in range(T - 1):
                if labels[b, p + 1] == -100:
                    continue
                grads = torch.autograd.grad(losses[b, p], wanted, retain_graph=True, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        weight_grad[n][b, p] = g[b, p]
                for i, g in enumerate(grads[len(names):]):
                    if g is not None:
                        ctx_err[i][b, p] = g[b, p]

    value_grad = {n: torch.zeros_like(leaves[n]) for n in names}  # (B, T, d_out, d_in) value-path gradients
    k_minus_p = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # (T, T) [k, p]
    for i, attn in enumerate(attns):
        if not feeding[i]:
            continue
        probs = _PROBS[id(attn)]  # (B, H, T, T) [query k, key p]
        H = probs.shape[1]
        c = ctx_err[i].detach()  # (B, T, H, hd)
        v = values[i].view(B, T, -1, c.shape[-1])  # (B, T, Hkv, hd), in the graph
        v_heads = v.repeat_interleave(H // v.shape[2], dim=2)  # (B, T, H, hd): head h reads group h // n_rep
        band = ((k_minus_p >= 1) & (k_minus_p <= window)).to(probs.dtype)  # (T, T)
        surrogate = torch.einsum("bhkp,kp,bkhd,bphd->", probs.detach(), band, c, v_heads)
        grads = torch.autograd.grad(surrogate, [leaves[n] for n in feeding[i]], retain_graph=True)
        for n, g in zip(feeding[i], grads):
            value_grad[n] += g

    scores = {k: torch.zeros(B, T, dtype=torch.float64) for k in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau")}
    for kind, direction in (("tgt", target), ("prx", proxy)):
        if direction is None:
            continue
        for n in names:
            scores[f"{kind}_dir"] += (weight_grad[n] * direction[n]).sum((-1, -2))
            scores[f"{kind}_cau"] += (value_grad[n] * direction[n]).sum((-1, -2))
    if example_scale is not None:
        scores = {k: v * example_scale[:, None] for k, v in scores.items()}
    aligned = {}
    for k, v in scores.items():
        shifted = torch.zeros_like(v)
        shifted[:, 1:] = v[:, :-1]
        aligned[k] = torch.where(labels != -100, shifted, torch.zeros_like(shifted))
    aligned["total"] = aligned["tgt_dir"] + aligned["tgt_cau"] + lam * (aligned["prx_dir"] + aligned["prx_cau"])
    return aligned
