"""Activations and errors of the scored weights, from a re-run of the scored blocks only.

The ordinary forward is observed by `BlockCapture` (hooks on the scored blocks): the detached hidden
state entering the first scored block, every scored block's call arguments (masks, position
embeddings) and the output of the last block. The valuation then re-runs just those blocks from the
detached hidden state with `capturing_attention` and back-propagates a given cotangent of the last
block's output: for the `total` signal g = dL/dh (ordinary attention), which yields e_p = dL/dz_p;
for the `self` signal the per-position g_p = d l_p / d h_p (the LM head is position-wise, so dL/dh
already is that) through the gradient-stopping attention, which yields e_p = d l_p / d z_p.
Backward of the training graph itself is never needed beyond the head, and `.grad` is never touched.

The context error c of a softmax-attention block is the error of the attention output itself, per
head (the tensor `capturing_attention` returns, before anything the block applies to it), taken by
the same backward. Without an output gate that is the error of the `o_proj` input; Qwen-3.5's
attention multiplies the output by sigmoid(gate) before `o_proj`, so there c_k = sigmoid(gate_k) *
(error of the o_proj input), which is what the value path v_p -> A_h[k, p] v_p -> o_proj needs.

Hybrid models: Gated-DeltaNet blocks among the scored ones (`alphatoken.blocks.token_mixer`) give x
and e of their linears and no band or context error; under the `self` signal they re-run with the
gradient kept on the own position (`linear_attention.own_position_linear_attention`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from alphatoken.hooks import claim, release
from alphatoken.blocks import LINEAR_ATTENTION, SOFTMAX_ATTENTION, token_mixer
from alphatoken.valuation.attention import ATTENTION_NAME, AttentionRecord, active_record
from alphatoken.valuation.linear_attention import own_position_linear_attention


@dataclass
class ForwardRecord:
    """What one forward call of the model passed through the scored blocks."""

    first_input: torch.Tensor | None = None  # (B, T, d) hidden state entering the first scored block, detached
    block_calls: dict = field(default_factory=dict)  # block index -> (extra positional args, kwargs)
    last_output: torch.Tensor | None = None  # (B, T, d) output of the last decoder block (in the forward graph)


@dataclass
class Signals:
    """Per-position quantities of the scored weights for one batch (compute dtype, detached)."""

    x: dict  # weight name -> (B, T, d_in) input of the linear
    e: dict  # weight name -> (B, T, d_out) error d(objective)/dz of the linear's output
    band: dict  # attention block index -> (B, H, T, W) causal band, band[b, h, p, d-1] = A_h[p+d, p] (none for DeltaNet)
    ctx_err: dict  # attention block index -> (B, T, H, hd) error of the attention output (before gate and o_proj)
    attn: dict = field(default_factory=dict)  # block index -> (B, H, T, T) A_h[k, p], only with band=None


def _hidden_of(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class BlockCapture:
    """Hooks on the scored blocks that record each forward call; `cut_last=True` replaces the last
    block's output by a fresh leaf so that d(objective)/dh costs only the LM head (for forwards the
    valuation runs itself). With `cut_last` and the model's first decoder block `first_block`, the
    decoder blocks run without autograd (grad mode off from `first_block`'s call to the end of the
    last block, back on for the head): their graph would never be used, and on a long validation
    batch it is most of the memory. Hooks fire once per module call; recomputation under gradient
    checkpointing calls `forward` directly and records nothing."""

    def __init__(self, blocks: list[tuple[int, nn.Module]], cut_last: bool, first_block: nn.Module | None = None):
        self.blocks = blocks
        self.cut_last = cut_last
        self.first_block = first_block if cut_last else None
        self.records: list[ForwardRecord] = []
        self.handles = []
        self.grad_was_enabled = True

    def _stop_grad(self, module, args):
        self.grad_was_enabled = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # restored by the last block's hook (or by the caller's grad-mode context)

    def __enter__(self):
        modules = [block for _, block in self.blocks] + ([self.first_block] if self.first_block is not None else [])
        self.claimed = claim("the valuation's block capture", modules)
        if self.first_block is not None:
            self.handles.append(self.first_block.register_forward_pre_hook(self._stop_grad))
        first_idx, last_idx = self.blocks[0][0], self.blocks[-1][0]
        for idx, block in self.blocks:
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(idx, idx == first_idx), with_kwargs=True))
        self.handles.append(self.blocks[-1][1].register_forward_hook(self._last_hook))
        self.last_idx = last_idx
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        release(self.claimed)
        return False

    def _pre_hook(self, idx: int, is_first: bool):
        def hook(module, args, kwargs):
            if is_first:
                self.records.append(ForwardRecord())
            if not self.records:
                return None
            record = self.records[-1]
            if idx in record.block_calls:  # a repeated call inside one forward: keep the first
                return None
            kwargs = dict(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if is_first:
                record.first_input = hidden.detach()
            record.block_calls[idx] = (rest, kwargs)
            return None

        return hook

    def _last_hook(self, module, args, output):
        if self.first_block is not None:
            torch.set_grad_enabled(self.grad_was_enabled)
        if not self.records or self.records[-1].last_output is not None:
            return None
        hidden = _hidden_of(output)
        if self.cut_last:
            leaf = hidden.detach().requires_grad_(True)
            self.records[-1].last_output = leaf
            if isinstance(output, (tuple, list)):
                return type(output)((leaf, *output[1:]))
            return leaf
        self.records[-1].last_output = hidden
        return None


class HeadCut:
    """Makes the input of the output embedding (the LM head) a fresh leaf during one training forward,
    so that the training backward can start below the head. Scoring needs g_p = d l_p / d u_p for
    every position (u_p the head input; the head is position-wise), and the masked loss's gradient
    at the head input is then (dL/dl_p) g_p: `TokenValuer.backward` sends that into the blocks and
    back-propagates the loss only to the head's own weights, instead of running the head's input
    gradient (a (V x d) product per token) a second time. A plain `loss.backward()` after such a
    forward would leave the blocks without gradient; the leaf raises if anything accumulates into it."""

    def __init__(self, head: nn.Module | None):
        self.head = head
        self.input: torch.Tensor | None = None  # (B, T, d) head input in the forward graph
        self.leaf: torch.Tensor | None = None  # (B, T, d) the detached copy the head computes from
        self.handle = None

    def __enter__(self):
        if self.head is not None:
            claim("the valuation's head cut", [self.head])
            self.handle = self.head.register_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            release([self.head])
        return False

    def _pre_hook(self, module, args):
        hidden = args[0]
        if self.leaf is not None or not hidden.requires_grad:  # first call with a graph only
            return None
        self.input = hidden
        self.leaf = hidden.detach().requires_grad_(True)
        self.leaf.register_post_accumulate_grad_hook(_refuse_plain_backward)
        return (self.leaf, *args[1:])


def _refuse_plain_backward(tensor):
    raise RuntimeError(
        "this forward ran inside `valuer.capture(share_head=True)`, whose head input is cut from the "
        "blocks: back-propagate the loss with `valuer.backward(loss, token_loss)`, not `loss.backward()`")


def attention_module(block: nn.Module) -> nn.Module:
    """The self-attention module of a decoder block: the submodule owning `v_proj` and `o_proj`
    (plain or LoRA-adapted linears). Raises ValueError for a block without one (e.g. linear attention)."""
    kind, module = token_mixer(block)
    if kind != SOFTMAX_ATTENTION:
        raise ValueError(f"{type(block).__name__} has no attention module with `v_proj` and `o_proj` linears ({kind})")
    return module


def softmax_attention_modules(blocks: list[tuple[int, nn.Module]]) -> dict[int, nn.Module]:
    """Block index -> attention module, for the blocks whose token mixer is softmax attention."""
    mixers = {idx: token_mixer(block, f"decoder block {idx}") for idx, block in blocks}
    return {idx: module for idx, (kind, module) in mixers.items() if kind == SOFTMAX_ATTENTION}


def linear_attention_modules(blocks: list[tuple[int, nn.Module]]) -> dict[int, nn.Module]:
    """Block index -> Gated-DeltaNet module, for the linear-attention blocks."""
    mixers = {idx: token_mixer(block, f"decoder block {idx}") for idx, block in blocks}
    return {idx: module for idx, (kind, module) in mixers.items() if kind == LINEAR_ATTENTION}


def rerun_scored_blocks(
    blocks: list[tuple[int, nn.Module]],
    linears: dict[str, nn.Linear],
    record: ForwardRecord,
    cotangent: torch.Tensor,
    stop_cross_position_grad: bool,
    compute_dtype: torch.dtype,
    band: int | None = 0,
) -> Signals:
    """Re-run the scored blocks from `record.first_input` with the same call arguments and return
    x, e for every scored linear and A, c for every scored block, where e = d<cotangent, h_out>/dz.
    `band=W` keeps the attention's causal band (B, H, T, W) per block, `band=0` none (validation
    re-runs), `band=None` also the full (B, H, T, T) probabilities (see `attention.AttentionRecord`).
    The model is restored afterwards (attention setting, checkpointing flags, hooks)."""
    if record.first_input is None or len(record.block_calls) != len(blocks):
        raise RuntimeError("the forward did not pass through every scored block; nothing to value")
    param = next(iter(linears.values())).weight
    inputs, outputs, handles = {}, {}, []

    def linear_hook(name):
        def hook(module, args, output):
            if name not in outputs:  # first call only
                inputs[name] = args[0].detach()
                outputs[name] = output

        return hook

    attn_modules = softmax_attention_modules(blocks)
    deltanets = list(linear_attention_modules(blocks).values()) if stop_cross_position_grad else []

    configs = {id(m.config): m.config for m in attn_modules.values()}  # hybrids: the attention blocks' config
    saved_impl = {key: cfg.__dict__.get("_attn_implementation_internal") for key, cfg in configs.items()}
    saved_ckpt = {idx: block.__dict__.get("gradient_checkpointing", None) for idx, block in blocks}
    attn_record = AttentionRecord(stop_cross_position_grad=stop_cross_position_grad, band=band)
    device_type = param.device.type
    claimed = claim("the valuation's re-run of the scored blocks", [*linears.values(), *(block for _, block in blocks)])
    try:
        for name, linear in linears.items():
            handles.append(linear.register_forward_hook(linear_hook(name)))
        for cfg in configs.values():
            cfg._attn_implementation_internal = ATTENTION_NAME
        for idx, block in blocks:
            if hasattr(block, "gradient_checkpointing"):
                block.gradient_checkpointing = False  # the re-run is K blocks only; hooks must fire once
        with (torch.enable_grad(), torch.autocast(device_type=device_type, enabled=False), active_record(attn_record),
              own_position_linear_attention(deltanets)):
            hidden = record.first_input.to(param.dtype).requires_grad_(True)  # (B, T, d) leaf
            for idx, block in blocks:
                rest, kwargs = record.block_calls[idx]
                kwargs = {**kwargs, "past_key_values": None, "use_cache": False}
                hidden = _hidden_of(block(hidden, *rest, **kwargs))  # (B, T, d)
            names = list(outputs)
            contexts = [attn_record.outputs[id(m)] for m in attn_modules.values()]  # (B, T, H, hd) each
            grads = torch.autograd.grad(hidden, [outputs[n] for n in names] + contexts,
                                        grad_outputs=cotangent.to(hidden.dtype), allow_unused=True)
            grads, context_grads = grads[: len(names)], dict(zip(attn_modules, grads[len(names):]))
    finally:
        for handle in handles:
            handle.remove()
        release(claimed)
        for key, cfg in configs.items():
            cfg._attn_implementation_internal = saved_impl[key]
        for idx, block in blocks:
            if saved_ckpt[idx] is None:
                block.__dict__.pop("gradient_checkpointing", None)
            else:
                block.gradient_checkpointing = saved_ckpt[idx]
    x = {n: inputs[n].to(compute_dtype) for n in linears}
    e = {}
    for n, g in zip(names, grads):
        e[n] = (torch.zeros_like(outputs[n]) if g is None else g).detach().to(compute_dtype)  # (B, T, d_out)
    attn, bands, ctx_err = {}, {}, {}
    for idx, module in attn_modules.items():
        g = context_grads[idx]
        out = attn_record.outputs[id(module)]
        ctx_err[idx] = (torch.zeros_like(out) if g is None else g).detach().to(compute_dtype)  # (B, T, H, hd)
        if band is None:
            attn[idx] = attn_record.probs[id(module)].to(compute_dtype)  # (B, H, T, T)
        elif band > 0:
            bands[idx] = attn_record.bands[id(module)].to(compute_dtype)  # (B, H, T, W)
    return Signals(x=x, e=e, band=bands, ctx_err=ctx_err, attn=attn)
