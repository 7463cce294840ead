"""Gated-DeltaNet linear attention (Qwen-3.5 `linear_attn`) with the gradient kept on the own position,
used only while a `self`-signal re-run passes through such a block (`signals.rerun_scored_blocks`).

Why: the `self` signal needs e_p = d l_p / d z_p for every p from one backward of sum_p l_p, so in
the re-run no gradient may cross positions (METHOD.md; `attention.capturing_attention` does this for
softmax attention). A Gated DeltaNet mixes positions twice: a causal depthwise convolution over
(q, k, v) and the recurrent state of the gated delta rule. Per value head, with q_t, k_t
L2-normalised (q_t also scaled by d_k^-1/2), decay a_t = exp(g_t) and write strength beta_t:

    S_t = a_t S_{t-1} + k_t (x) delta_t,   delta_t = beta_t (v_t - a_t S_{t-1}^T k_t),   o_t = S_t^T q_t
    =>  o_t = a_t r_t + beta_t (k_t . q_t) (v_t - a_t u_t),   r_t = S_{t-1}^T q_t,   u_t = S_{t-1}^T k_t

Only S_{t-1} carries the other positions. The re-run keeps the model's own output values (its own
convolution and chunked delta rule on detached inputs) and adds, as an exact zero `f - f.detach()`,
the same quantities recomputed from the position's own inputs with everything from other positions
held constant: for the convolution the current-position tap w_{K-1} x_t (the earlier taps detached),
for the delta rule the closed form above with S_{t-1} constant (`EarlierStateReads`). Values are
unchanged; the gradient at position t reaches only position t's inputs, which is d l_t / d(.) of the
ordinary model, since causality leaves no other path from a position's inputs to its own loss.

r_t and u_t come from a plain recurrence without autograd, and so do their gradients (the states are
recomputed, never kept): 2 x O(T) steps of (B, H, d_k, d_v) work per block, in the dtype the model's
kernel computes in (float32, as `torch_chunk_gated_delta_rule` does)."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim, as transformers' Qwen-3.5 `l2norm`."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _states(key: torch.Tensor, value: torch.Tensor, decay: torch.Tensor, beta: torch.Tensor):
    """Yield (t, S_{t-1}) for t = 0..T-1 of the gated delta rule, S_{-1} = 0, one state at a time.
    key (B, H, T, d_k) normalised, value (B, H, T, d_v), decay = exp(g) and beta (B, H, T)."""
    B, H, T, dk = key.shape
    state = key.new_zeros(B, H, dk, value.shape[-1])  # (B, H, d_k, d_v)
    for t in range(T):
        yield t, state
        k_t = key[:, :, t]  # (B, H, d_k)
        read = torch.einsum("bhkv,bhk->bhv", state, k_t)  # S_{t-1}^T k_t
        delta = beta[:, :, t, None] * (value[:, :, t] - decay[:, :, t, None] * read)  # (B, H, d_v)
        state = decay[:, :, t, None, None] * state + k_t[..., None] * delta[:, :, None, :]


class EarlierStateReads(torch.autograd.Function):
    """r_t = S_{t-1}^T q_t and u_t = S_{t-1}^T k_t (module docstring), with S_{t-1} held constant: the
    gradient reaches q_t and k_t through these products only (dq_t = S_{t-1} dr_t, dk_t = S_{t-1} du_t),
    never the earlier positions that built S_{t-1}. No state is kept: the backward recomputes them.
    query, key (B, H, T, d_k) normalised, value (B, H, T, d_v), decay, beta (B, H, T) -> r, u (B, H, T, d_v)."""

    @staticmethod
    def forward(ctx, query, key, value, decay, beta):
        r, u = torch.zeros_like(value), torch.zeros_like(value)  # (B, H, T, d_v)
        for t, state in _states(key, value, decay, beta):
            r[:, :, t] = torch.einsum("bhkv,bhk->bhv", state, query[:, :, t])
            u[:, :, t] = torch.einsum("bhkv,bhk->bhv", state, key[:, :, t])
        ctx.save_for_backward(key, value, decay, beta)
        return r, u

    @staticmethod
    def backward(ctx, grad_r, grad_u):
        key, value, decay, beta = ctx.saved_tensors
        d_query, d_key = torch.zeros_like(key), torch.zeros_like(key)  # (B, H, T, d_k)
        for t, state in _states(key, value, decay, beta):
            d_query[:, :, t] = torch.einsum("bhkv,bhv->bhk", state, grad_r[:, :, t])
            d_key[:, :, t] = torch.einsum("bhkv,bhv->bhk", state, grad_u[:, :, t])
        return d_query, d_key, None, None, None


def own_position_delta_rule(query, key, value, g, beta, full_output: torch.Tensor) -> torch.Tensor:
    """The model's delta-rule output `full_output` (B, T, Hv, d_v) with the gradient of o_t flowing only
    into q_t, k_t, v_t, g_t, beta_t. query, key (B, T, Hk, d_k) before normalisation, value (B, T, Hv, d_v),
    g, beta (B, T, Hv); query/key heads serve Hv / Hk consecutive value heads (as in the kernel)."""
    n_rep = value.shape[2] // key.shape[2]
    if n_rep > 1:
        query, key = query.repeat_interleave(n_rep, dim=2), key.repeat_interleave(n_rep, dim=2)  # (B, T, Hv, d_k)
    q, k, v, b, gg = (x.transpose(1, 2).to(torch.float32) for x in (query, key, value, beta, g))  # heads first
    q = _l2norm(q) * q.shape[-1] ** -0.5  # (B, H, T, d_k)
    k = _l2norm(k)  # (B, H, T, d_k)
    decay = gg.exp()  # (B, H, T)
    r, u = EarlierStateReads.apply(q, k, v.detach(), decay.detach(), b.detach())  # (B, H, T, d_v)
    own = decay[..., None] * r + (b * (k * q).sum(-1))[..., None] * (v - decay[..., None] * u)  # (B, H, T, d_v)
    own = own.transpose(1, 2).to(full_output.dtype)  # (B, T, H, d_v)
    return full_output.detach() + (own - own.detach())


def own_position_forward(module: nn.Module, kernel, hidden_states: torch.Tensor, cache_params=None,
                         attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """`Qwen3_5GatedDeltaNet.forward` without cache, values as the model's, gradients own-position only.
    `kernel` is the chunked delta rule the module's own forward calls."""
    if cache_params is not None:
        raise ValueError("the self-signal re-run of a Gated-DeltaNet block runs without a cache")
    if module.activation not in ("silu", "swish"):
        raise ValueError(f"Gated DeltaNet with activation {module.activation!r}: only silu is supported")
    if attention_mask is not None:  # the 2D padding mask: padded positions enter as zeros
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    B, T, _ = hidden_states.shape
    mixed = module.in_proj_qkv(hidden_states).transpose(1, 2)  # (B, C, T), C = 2 Hk d_k + Hv d_v
    z = module.in_proj_z(hidden_states).reshape(B, T, -1, module.head_v_dim)  # (B, T, Hv, d_v) output gate
    b = module.in_proj_b(hidden_states)  # (B, T, Hv)
    a = module.in_proj_a(hidden_states)  # (B, T, Hv)
    weight = module.conv1d.weight.squeeze(1)  # (C, K) causal depthwise taps, w_{K-1} on the current position
    conv = F.conv1d(mixed.detach().to(weight.dtype), weight.unsqueeze(1), module.conv1d.bias,
                    padding=weight.shape[-1] - 1, groups=weight.shape[0])[:, :, :T]  # (B, C, T)
    conv = conv + weight[:, -1:] * (mixed - mixed.detach())  # gradient through the own tap only
    mixed = F.silu(conv).to(hidden_states.dtype)  # (B, C, T)
    query, key, value = torch.split(mixed.transpose(1, 2), [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(B, T, -1, module.head_k_dim)  # (B, T, Hk, d_k)
    key = key.reshape(B, T, -1, module.head_k_dim)  # (B, T, Hk, d_k)
    value = value.reshape(B, T, -1, module.head_v_dim)  # (B, T, Hv, d_v)
    beta = b.sigmoid()  # (B, T, Hv)
    g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)  # (B, T, Hv) log decay
    full, _ = kernel(query.detach(), key.detach(), value.detach(), g=g.detach(), beta=beta.detach(),
                     initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True)  # (B, T, Hv, d_v)
    core = own_position_delta_rule(query, key, value, g, beta, full)  # (B, T, Hv, d_v)
    core = module.norm(core.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))  # gated RMSNorm
    return module.out_proj(core.reshape(B, T, -1))  # (B, T, d)


class own_position_linear_attention:
    """Context manager: the given Gated-DeltaNet modules run `own_position_forward` (an instance
    attribute `forward`, removed on exit). Each module's kernel is looked up in its own modeling
    module, so the values are those of the model's forward."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def __enter__(self):
        for module in self.modules:
            if "forward" in module.__dict__:
                raise RuntimeError(f"{type(module).__name__} already has an instance forward; cannot re-run it")
            kernel = getattr(sys.modules[type(module).__module__], "torch_chunk_gated_delta_rule", None)
            if kernel is None:
                raise ValueError(f"{type(module).__name__}: no `torch_chunk_gated_delta_rule` in its modeling module")

            def forward(*args, _module=module, _kernel=kernel, **kwargs):
                return own_position_forward(_module, _kernel, *args, **kwargs)

            module.forward = forward
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            module.__dict__.pop("forward", None)
        return False
