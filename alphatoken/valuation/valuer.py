"""`TokenValuer`: per-token values of a training batch against a validation target and a retention
proxy (METHOD.md). Usage::

    valuer = TokenValuer(model, ValuationConfig(), fisher=fisher, reference=reference)
    valuer.set_validation(val_batch)       # G on the current weights, P = F * (W - W_ref) (or S (W - W_ref) A)
    scores = valuer.score(batch)           # TokenScores, each (B, T), aligned with labels

    with valuer.capture():                 # inside a training step: observe the ordinary forward
        out = model(input_ids=..., attention_mask=...)
    token_loss = ...                       # (B, T-1) per-position NLL from out.logits
    scores = valuer.score_captured(batch, token_loss)   # then backward the masked loss as usual

    with valuer.capture(share_head=True):  # the training loop's form: the LM head's input gradient,
        out = model(...)                   # computed by scoring, is reused by the backward
    scores = valuer.score_captured(batch, token_loss)
    valuer.backward(loss, token_loss)      # = loss.backward(), one (V x d) product per token cheaper

The naive equivalent of `score` (tests/bruteforce.py) materialises, for every position p, the
per-position weight gradient e_p (x) x_p of every scored weight and Frobenius-dots it with G and P;
here only activations, errors and attention probabilities of the last K blocks are used.

The proxy direction P_W of a scored weight is F_W * (W - W_ref) with a diagonal Fisher, and
S_W (W - W_ref) A_W with a Kronecker-factored one (`alphatoken.fisher`, kind "kronecker": the
factors `name.kfac_A`, `name.kfac_S`); either way it is one (d_out, d_in) matrix, contracted with
x_p and e_p like G, so nothing downstream of `refresh_proxy` depends on the Fisher's kind.

LoRA: on a peft-wrapped model the scored weights are the adapter factors (`alphatoken.blocks`), and
everything above applies to them as to any linear (x, e of `lora_A` and of `lora_B`; G, F, P and
the reference are keyed by the factors' parameter names). Only the value path needs to know how a
factor feeds the value vectors: with v_p = W0 x_p + s B A x_p, a direction D of a factor changes
v_p by dv_p = s B (D x_p) for D on A (x_p the input of `lora_A`) and dv_p = s D (A x_p) for D on B
(A x_p the input of `lora_B`); `ValueMap` applies this to y_p = D x_p before the band sum."""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from alphatoken.blocks import decoder_blocks, is_lora_layer, lora_factors, scored_blocks, scored_linears
from alphatoken.fisher import fisher_entries
from alphatoken.valuation.attention import register_attention
from alphatoken.valuation.config import TokenScores, ValuationConfig
from alphatoken.valuation.scores import (
    align_with_labels,
    causal_band_score,
    contract_direction,
    direct_score,
    ghost_direct,
    ghost_direction,
    token_nll,
)
from alphatoken.valuation.signals import (
    BlockCapture,
    ForwardRecord,
    HeadCut,
    Signals,
    rerun_scored_blocks,
    softmax_attention_modules,
)


@dataclass(frozen=True)
class TargetDirection:
    """G of one scored weight, in the form chosen for it."""

    form: str  # "contract" (explicit G) or "ghost" (validation activations and errors)
    matrix: torch.Tensor | None  # (d_out, d_in) G = sum_v e_v (x) x_v, for "contract"
    val_x: torch.Tensor | None  # (N, d_in) validation inputs of the linear, for "ghost"
    val_e: torch.Tensor | None  # (N, d_out) validation errors dJ/dz_v, for "ghost"


@dataclass(frozen=True)
class ValueMap:
    """How the output change y_p = D x_p of a LoRA factor of `v_proj` (direction D) changes the value
    vectors: dv_p = s * y_p B^T for `lora_A` (y_p (B, T, r)), dv_p = s * y_p for `lora_B` (y_p
    (B, T, d_v)). The `v_proj` weight itself needs no map (dv_p = y_p)."""

    scaling: float  # s of the adapter
    lora_B: nn.Linear | None  # the adapter's B (d_v, r) for a lora_A factor, None for lora_B

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        if self.lora_B is not None:
            y = y @ self.lora_B.weight.detach().to(y.dtype).T  # (B, T, r) -> (B, T, d_v), current B
        return self.scaling * y  # (B, T, d_v)


class _DirectionSum:
    """G = sum_v e_v (x) x_v of one weight, accumulated over validation chunks. "contract": the
    (d_out, d_in) sum; "ghost": the kept rows (x_v, e_v); "auto": rows while
    N (d_in + d_out) < d_in d_out (the ghost form is cheaper), the matrix from the chunk that crosses it.
    Rows without error (padding, positions after the last response token) add nothing and are dropped."""

    def __init__(self, d_out: int, d_in: int, form: str):
        self.d_out, self.d_in, self.form = d_out, d_in, form
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_rows = 0
        self.matrix: torch.Tensor | None = None  # (d_out, d_in)
        self.like: torch.Tensor | None = None  # dtype and device of the rows

    def add(self, x: torch.Tensor, e: torch.Tensor) -> None:
        self.like = x
        keep = e.abs().sum(-1) > 0
        x, e = x[keep], e[keep]  # (n, d_in), (n, d_out)
        if self.form == "contract" or self.matrix is not None:
            self._add_matrix(x, e)
            return
        self.rows.append((x, e))
        self.n_rows += x.shape[0]
        if self.form == "auto" and self.n_rows * (self.d_in + self.d_out) >= self.d_in * self.d_out:
            rows, self.rows = self.rows, []
            for rx, re in rows:
                self._add_matrix(rx, re)

    def _add_matrix(self, x: torch.Tensor, e: torch.Tensor) -> None:
        g = e.T @ x  # (d_out, d_in)
        self.matrix = g if self.matrix is None else self.matrix + g

    def result(self) -> "TargetDirection":
        if self.matrix is not None:
            return TargetDirection("contract", self.matrix, None, None)
        if self.form == "contract":  # no row had an error: G = 0
            return TargetDirection("contract", self.like.new_zeros(self.d_out, self.d_in), None, None)
        val_x = torch.cat([x for x, _ in self.rows]) if self.rows else self.like.new_zeros(0, self.d_in)  # (N, d_in)
        val_e = torch.cat([e for _, e in self.rows]) if self.rows else self.like.new_zeros(0, self.d_out)  # (N, d_out)
        return TargetDirection("ghost", None, val_x, val_e)


def _batch_field(batch: dict, key: str) -> torch.Tensor:
    if not isinstance(batch, dict) or key not in batch:
        raise KeyError(f"batch is missing the field {key!r} (needs input_ids, attention_mask, labels)")
    return batch[key]


class TokenValuer:
    """Scores the tokens of training batches for `model` (see the module docstring).

    fisher, reference: dicts `parameter name -> tensor` (names of `model.named_parameters()`),
    needed for every scored weight (the LoRA factors of a peft-wrapped model); either `None` makes
    the proxy zero. `fisher` is a diagonal Fisher (a tensor shaped like each weight) or a Kronecker
    one (`name.kfac_A` (d_in, d_in) and `name.kfac_S` (d_out, d_out) per weight), as
    `alphatoken.fisher.compute_fisher` / `load_fisher` return them; a mix of both is refused."""

    def __init__(self, model: nn.Module, config: ValuationConfig, fisher: dict | None = None, reference: dict | None = None):
        self.model = model
        self.config = config
        self.blocks = scored_blocks(model, config.last_k)
        self.first_block = decoder_blocks(model)[0]  # the valuation's own forwards run the blocks without autograd
        self.linears = scored_linears(model, config.last_k)
        if not self.linears:
            raise ValueError(f"no linear to score in the last {config.last_k} decoder blocks")
        weight = next(iter(self.linears.values())).weight
        self.compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.value_weight = {}  # name of a scored weight feeding v_proj -> scored block index
        self.value_maps: dict[str, ValueMap] = {}  # LoRA factors of v_proj -> their map to the value change
        attention = softmax_attention_modules(self.blocks)  # refuses a block whose token mixer is unknown
        for idx, block in self.blocks:
            v_proj = attention[idx].v_proj if idx in attention else None  # None: linear attention, direct path only
            factor_maps = {}
            for layer in block.modules():
                if is_lora_layer(layer):
                    for f in lora_factors(layer):
                        if not isinstance(f.dropout, nn.Identity) and getattr(f.dropout, "p", None) != 0:
                            raise ValueError(
                                f"block {idx}: LoRA adapter {f.adapter!r} has dropout {f.dropout}: the valuation re-run "
                                "cannot reproduce the dropout mask of the training forward; use lora_dropout=0")
                        if v_proj is not None and layer is v_proj:
                            factor_maps[id(f.lora_A)] = ValueMap(f.scaling, f.lora_B)
                            factor_maps[id(f.lora_B)] = ValueMap(f.scaling, None)
            for name, linear in self.linears.items():
                if (v_proj is not None and linear is v_proj) or id(linear) in factor_maps:
                    self.value_weight[name] = idx
                if id(linear) in factor_maps:
                    self.value_maps[name] = factor_maps[id(linear)]
        self.fisher_kind, self.fisher = self._check_fisher(fisher)
        self.reference = self._check_param_dict(reference, "reference")
        self._target: dict[str, TargetDirection] | None = None
        self._proxy: dict[str, torch.Tensor] | None = None
        self._captured: list[ForwardRecord] | None = None
        self._head: HeadCut | None = None  # the head cut of the last `capture(share_head=True)`
        self._head_grad: torch.Tensor | None = None  # (B, T, d) g_p = d l_p / d u_p, from its scoring
        register_attention()
        self.refresh_proxy()

    def _check_fisher(self, fisher: dict | None) -> tuple[str | None, dict | None]:
        """(kind, {name: F} or {name: (A, S)}) of every scored weight, detached; (None, None) without."""
        if fisher is None:
            return None, None
        kind, entries = fisher_entries(fisher, self.linears)
        if kind == "kronecker":
            return kind, {name: (a.detach(), s.detach()) for name, (a, s) in entries.items()}
        return kind, {name: f.detach() for name, f in entries.items()}

    def _check_param_dict(self, tensors: dict | None, what: str) -> dict | None:
        if tensors is None:
            return None
        checked = {}
        for name, linear in self.linears.items():
            if name not in tensors:
                raise KeyError(f"{what} has no entry for the scored weight {name!r}")
            if tuple(tensors[name].shape) != tuple(linear.weight.shape):
                raise ValueError(
                    f"{what}[{name!r}] has shape {tuple(tensors[name].shape)}, the weight has {tuple(linear.weight.shape)}"
                )
            checked[name] = tensors[name].detach()
        return checked

    # ---------------------------------------------------------------- directions
    def refresh_proxy(self) -> None:
        """P_W for every scored weight, on the current weights (None without fisher/reference):
        F_W * (W - W_ref) (diagonal Fisher) or S_W (W - W_ref) A_W (Kronecker factors)."""
        if self.fisher is None or self.reference is None:
            self._proxy = None
            return
        cd = self.compute_dtype
        self._proxy = {}
        for name, linear in self.linears.items():
            w = linear.weight.detach().to(cd)
            drift = w - self.reference[name].to(w.device, cd)  # (d_out, d_in)
            if self.fisher_kind == "kronecker":
                a, s = self.fisher[name]  # (d_in, d_in), (d_out, d_out)
                self._proxy[name] = s.to(w.device, cd) @ drift @ a.to(w.device, cd)  # (d_out, d_in)
            else:
                self._proxy[name] = self.fisher[name].to(w.device, cd) * drift  # (d_out, d_in)

    def set_validation(
        self,
        val_batch: dict,
        objective: Callable | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Compute the target direction G = grad_W J_tgt on the current weights and refresh P.
        Default J_tgt: mean token loss over all validation response tokens; `objective(model, batch)`
        may return any scalar built from the model's outputs (e.g. the DPO loss of validation pairs).
        `reduce(G) -> G'` is applied to every per-weight G (d_out, d_in), e.g. an all-reduce average
        across data-parallel ranks: G = (1/R) sum_r G_r, which is the gradient of the mean of the
        per-rank objectives (it equals G of the union batch when every rank's objective is a mean
        over the same number of examples/tokens). The ghost form keeps per-token validation
        activations whose count differs per rank and cannot be averaged exactly, so `reduce` forces
        the contract form for every weight."""
        labels = _batch_field(val_batch, "labels")
        forms = {}
        for name, linear in self.linears.items():
            form = "contract" if reduce is not None else self.config.target_form
            forms[name] = _DirectionSum(*linear.weight.shape, form)
        if objective is None:
            n_tokens = int((labels[:, 1:] != -100).sum())
            if n_tokens == 0:
                raise ValueError("the validation batch has no response tokens (all labels are -100)")
            size = self.config.val_chunk_size
            for start in range(0, labels.shape[0], size):  # J = sum over chunks of (chunk token-loss sum) / n_tokens
                chunk = {k: _batch_field(val_batch, k)[start : start + size] for k in ("input_ids", "attention_mask", "labels")}

                def chunk_objective(model, batch, chunk_labels=chunk["labels"]):
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    return token_nll(out.logits, chunk_labels, self.compute_dtype).sum() / n_tokens

                self._accumulate_validation(chunk, chunk_objective, forms)
        else:
            self._accumulate_validation(val_batch, objective, forms)
        target = {}
        for name, acc in forms.items():
            direction = acc.result()
            if direction.form == "contract" and reduce is not None:
                d_out, d_in = self.linears[name].weight.shape
                g = reduce(direction.matrix)
                if not isinstance(g, torch.Tensor) or tuple(g.shape) != (d_out, d_in):
                    raise ValueError(f"reduce must return a tensor of shape {(d_out, d_in)} for {name}")
                direction = TargetDirection("contract", g, None, None)
            target[name] = direction
        self._target = target
        self.refresh_proxy()

    def _accumulate_validation(self, batch: dict, objective: Callable, forms: dict) -> None:
        """Run `objective(model, batch)`, back-propagate it to the scored weights' outputs through a
        re-run of the scored blocks, and add every weight's validation (x_v, e_v) rows to `forms`."""
        with BlockCapture(self.blocks, cut_last=True, first_block=self.first_block) as capture, torch.enable_grad():
            objective_value = objective(self.model, batch)
        records = [r for r in capture.records if r.last_output is not None]
        if not records:
            raise RuntimeError("the validation objective did not run the model")
        cotangents = torch.autograd.grad(objective_value, [r.last_output for r in records], allow_unused=True)
        if all(cot is None for cot in cotangents):
            raise RuntimeError("the validation objective does not depend on the model outputs")
        for record, cot in zip(records, cotangents):
            if cot is None:
                continue
            sig = rerun_scored_blocks(self.blocks, self.linears, record, cot, False, self.compute_dtype)
            for n in self.linears:
                forms[n].add(sig.x[n].flatten(0, 1), sig.e[n].flatten(0, 1))  # (B*T, d_in), (B*T, d_out)

    # ---------------------------------------------------------------- scoring
    def score(self, batch: dict, example_scale: torch.Tensor | None = None, components: bool = True) -> TokenScores:
        """Values of the label tokens of `batch` (runs its own forward; the model's graph is not kept).
        `components=False` computes only `total` (the four components are then None), contracting
        each weight once with the combined direction G + lam P instead of once with each."""
        labels = _batch_field(batch, "labels")
        with BlockCapture(self.blocks, cut_last=True, first_block=self.first_block) as capture, torch.enable_grad():
            out = self.model(
                input_ids=_batch_field(batch, "input_ids"),
                attention_mask=_batch_field(batch, "attention_mask"),
                use_cache=False,
            )
            token_loss = token_nll(out.logits, labels, self.compute_dtype)  # (B, T-1)
        return self._score_records(capture.records, token_loss, batch, example_scale, retain_graph=False, components=components)

    @contextmanager
    def capture(self, share_head: bool = False):
        """Observe the ordinary training forward run inside the block (hooks exist only inside).
        `share_head=True` also cuts the LM head's input from the blocks (`HeadCut`): scoring computes
        d l_p / d(head input) anyway, and `backward(loss, token_loss)` reuses it so the training
        backward skips the head's input gradient; `loss.backward()` is then refused."""
        self._captured = None
        self._head = self._head_grad = None
        capture = BlockCapture(self.blocks, cut_last=False)
        head = HeadCut(self.model.get_output_embeddings()) if share_head else None
        try:
            with capture, (head if head is not None else contextlib.nullcontext()):
                yield self
        finally:
            self._captured = capture.records
            self._head = head if head is not None and head.leaf is not None else None

    def backward(self, loss: torch.Tensor, token_loss: torch.Tensor) -> None:
        """`loss.backward()` for a forward observed by `capture(share_head=True)`, with the same
        gradients: with u_p the head input and l_p = token_loss[:, p] (computed from the logits at
        position p only), dL/du_p = (dL/dl_p) d l_p/du_p. The second factor comes from scoring (or is
        computed here); the product is back-propagated through the blocks, and `loss` only to the
        parameters above the cut (the head's weight). `loss` may be any function of token_loss
        (masked SFT sum, Alpha-DPO); gradients accumulate into `.grad` as with `loss.backward()`."""
        head, g_head = self._head, self._head_grad
        self._head = self._head_grad = None
        if head is None:
            raise RuntimeError("backward needs a forward run inside `with valuer.capture(share_head=True):`")
        with torch.enable_grad():
            if g_head is None:
                (g_head,) = torch.autograd.grad(token_loss.sum(), head.leaf, retain_graph=True)  # (B, T, d)
            (dloss,) = torch.autograd.grad(loss, token_loss, retain_graph=True, allow_unused=True)  # (B, T-1)
            if dloss is None:
                dloss = torch.zeros_like(token_loss)
            B, T = head.leaf.shape[:2]
            if tuple(dloss.shape) != (B, T - 1):
                raise ValueError(f"token_loss has shape {tuple(dloss.shape)}, expected (B, T-1) = {(B, T - 1)}")
            scale = torch.nn.functional.pad(dloss, (0, 1)).unsqueeze(-1)  # (B, T, 1); the last position has no loss
            above = [p for p in self.model.parameters() if p.requires_grad]
            torch.autograd.backward(loss, inputs=above)  # reaches only the weights above the cut (the head)
            head.input.backward((scale.to(g_head.dtype) * g_head).to(head.input.dtype))  # the blocks

    def score_captured(self, batch: dict, token_loss: torch.Tensor, example_scale: torch.Tensor | None = None,
                       components: bool = True) -> TokenScores:
        """Values for the forward observed by the last `capture()`. token_loss (B, T-1): per-position NLL
        of that forward (graph kept, 0 where ignored). The graph is retained for the caller's backward.
        `components` as in `score`."""
        records, self._captured = self._captured, None
        if records is None:
            raise RuntimeError("score_captured needs a forward run inside `with valuer.capture():`")
        return self._score_records(records, token_loss, batch, example_scale, retain_graph=True, components=components)

    def _score_records(self, records, token_loss, batch, example_scale, retain_graph: bool, components: bool) -> TokenScores:
        if len(records) != 1 or records[0].last_output is None:
            raise RuntimeError(f"expected exactly one model forward through the scored blocks, saw {len(records)}")
        record = records[0]
        if not record.last_output.requires_grad:
            raise RuntimeError("the captured forward has no graph (run it with gradients enabled)")
        labels = _batch_field(batch, "labels")
        B, T = labels.shape
        if tuple(token_loss.shape) != (B, T - 1):
            raise ValueError(f"token_loss has shape {tuple(token_loss.shape)}, expected (B, T-1) = {(B, T - 1)}")
        head = self._head if retain_graph else None  # the head cut of this captured forward, if any
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            loss_sum = token_loss.to(torch.float64 if token_loss.dtype == torch.float64 else torch.float32).sum()
            if head is None:
                (cotangent,) = torch.autograd.grad(loss_sum, record.last_output, retain_graph=retain_graph)  # (B, T, d)
            else:  # through the cut: g_p = d l_p / d u_p at the head input, kept for `backward`
                (g_head,) = torch.autograd.grad(loss_sum, head.leaf, retain_graph=True)  # (B, T, d)
                (cotangent,) = torch.autograd.grad(head.input, record.last_output, g_head, retain_graph=True)  # (B, T, d)
                self._head_grad = g_head
        signals = rerun_scored_blocks(
            self.blocks, self.linears, record, cotangent, self.config.signal == "self", self.compute_dtype,
            band=self.config.window,
        )
        if not components:
            return self._total_only(signals, labels, example_scale)
        return self._scores(signals, labels, example_scale)

    def signals(self, batch: dict, full_attention: bool = False) -> Signals:
        """x, e of every scored weight and the attention band and c of every scored block for `batch`
        under the configured signal (what `score` contracts; exposed for inspection and tests);
        `full_attention=True` also keeps the full (B, H, T, T) probabilities in `Signals.attn`."""
        labels = _batch_field(batch, "labels")
        with BlockCapture(self.blocks, cut_last=True, first_block=self.first_block) as capture, torch.enable_grad():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            token_loss = token_nll(out.logits, labels, self.compute_dtype)
        (cotangent,) = torch.autograd.grad(token_loss.sum(), capture.records[0].last_output)
        return rerun_scored_blocks(
            self.blocks, self.linears, capture.records[0], cotangent, self.config.signal == "self", self.compute_dtype,
            band=None if full_attention else self.config.window,
        )

    def _scores(self, sig: Signals, labels: torch.Tensor, example_scale: torch.Tensor | None) -> TokenScores:
        cfg = self.config
        B, T = labels.shape
        device = labels.device
        need_target = cfg.use_tgt_dir or cfg.use_tgt_cau
        if need_target and self._target is None:
            raise RuntimeError("call set_validation(val_batch) before scoring (target components are on)")
        comp = {k: torch.zeros(B, T, dtype=self.compute_dtype, device=device) for k in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau")}
        for name in self.linears:
            x, e = sig.x[name], sig.e[name]  # (B, T, d_in), (B, T, d_out)
            block_idx = self.value_weight.get(name)
            if need_target:
                self._add_target(comp, name, x, e, block_idx, sig)
            if self._proxy is not None and (cfg.use_prx_dir or (cfg.use_prx_cau and block_idx is not None)):
                y = contract_direction(x, self._proxy[name])  # (B, T, d_out) = P x_p
                if cfg.use_prx_dir:
                    comp["prx_dir"] += direct_score(y, e)
                if cfg.use_prx_cau and block_idx is not None:
                    comp["prx_cau"] += self._causal(sig, name, y)
        if example_scale is not None:
            scale = torch.as_tensor(example_scale, device=device).to(self.compute_dtype)
            if tuple(scale.shape) != (B,):
                raise ValueError(f"example_scale has shape {tuple(scale.shape)}, expected ({B},)")
            comp = {k: v * scale[:, None] for k, v in comp.items()}
        comp = {k: align_with_labels(v, labels) for k, v in comp.items()}
        total = comp["tgt_dir"] + comp["tgt_cau"] + cfg.lam * (comp["prx_dir"] + comp["prx_cau"])
        return TokenScores(total=total, **comp)

    def _total_only(self, sig: Signals, labels: torch.Tensor, example_scale: torch.Tensor | None) -> TokenScores:
        """`total` alone. The total is linear in the direction: for each weight, the direct terms of all
        enabled components are e_p^T D_dir x_p with D_dir = a G + b lam P (a, b = 1 for an enabled
        component, else 0), and the value-path terms use D_cau likewise, so one contraction
        y_p = D x_p serves all of them (two for a value projection whose direct and causal switches
        differ). Ghost-form target directions are not materialised; their terms are added separately."""
        cfg = self.config
        B, T = labels.shape
        need_target = cfg.use_tgt_dir or cfg.use_tgt_cau
        if need_target and self._target is None:
            raise RuntimeError("call set_validation(val_batch) before scoring (target components are on)")
        a_dir, a_cau = float(cfg.use_tgt_dir), float(cfg.use_tgt_cau)
        b_dir = cfg.lam * float(cfg.use_prx_dir) if self._proxy is not None else 0.0
        b_cau = cfg.lam * float(cfg.use_prx_cau) if self._proxy is not None else 0.0
        total = torch.zeros(B, T, dtype=self.compute_dtype, device=labels.device)  # (B, T) per loss position

        def combined(name: str, a: float, b: float, target: TargetDirection | None) -> torch.Tensor | None:
            parts = []
            if a and target is not None and target.form == "contract":
                parts.append(a * target.matrix)
            if b:
                parts.append(b * self._proxy[name])
            return sum(parts[1:], parts[0]) if parts else None  # (d_out, d_in)

        for name in self.linears:
            x, e = sig.x[name], sig.e[name]  # (B, T, d_in), (B, T, d_out)
            block_idx = self.value_weight.get(name)
            causal = block_idx is not None and (a_cau or b_cau)
            target = self._target[name] if need_target else None
            ghost = target is not None and target.form == "ghost"
            d_dir = combined(name, a_dir, b_dir, target)
            y_dir = contract_direction(x, d_dir) if d_dir is not None else None  # (B, T, d_out)
            if y_dir is not None:
                total += direct_score(y_dir, e)
            y_ghost = ghost_direction(x, target.val_x, target.val_e) if ghost and causal and a_cau else None
            if ghost and a_dir:
                total += a_dir * (direct_score(y_ghost, e) if y_ghost is not None else ghost_direct(x, e, target.val_x, target.val_e))
            if causal:
                if (a_cau, b_cau) == (a_dir, b_dir):
                    y_cau = y_dir
                else:
                    d_cau = combined(name, a_cau, b_cau, target)
                    y_cau = contract_direction(x, d_cau) if d_cau is not None else None
                if y_ghost is not None:
                    y_cau = a_cau * y_ghost if y_cau is None else y_cau + a_cau * y_ghost
                if y_cau is not None:
                    total += self._causal(sig, name, y_cau)
        if example_scale is not None:
            scale = torch.as_tensor(example_scale, device=labels.device).to(self.compute_dtype)
            if tuple(scale.shape) != (B,):
                raise ValueError(f"example_scale has shape {tuple(scale.shape)}, expected ({B},)")
            total = total * scale[:, None]
        return TokenScores(total=align_with_labels(total, labels), tgt_dir=None, tgt_cau=None, prx_dir=None, prx_cau=None)

    def _add_target(self, comp, name, x, e, block_idx, sig) -> None:
        cfg = self.config
        target = self._target[name]
        with_causal = cfg.use_tgt_cau and block_idx is not None
        if target.form == "contract":
            y = contract_direction(x, target.matrix)  # (B, T, d_out) = G x_p
        elif block_idx is not None:  # value projection: G x_p is needed by the causal term, reuse it
            y = ghost_direction(x, target.val_x, target.val_e)  # (B, T, d_out)
        else:
            y = None
        if cfg.use_tgt_dir:
            comp["tgt_dir"] += direct_score(y, e) if y is not None else ghost_direct(x, e, target.val_x, target.val_e)
        if with_causal:
            comp["tgt_cau"] += self._causal(sig, name, y)

    def _causal(self, sig: Signals, name: str, y: torch.Tensor) -> torch.Tensor:
        """Value-path score of the scored weight `name` (feeding v_proj), from y_p = D x_p (B, T, d_out)."""
        block_idx = self.value_weight[name]
        if name in self.value_maps:  # a LoRA factor: y_p -> the value change dv_p (B, T, d_v)
            y = self.value_maps[name](y)
        ctx_err = sig.ctx_err[block_idx]  # (B, T, H, hd)
        value_dir = y.view(*y.shape[:2], -1, ctx_err.shape[-1])  # (B, T, Hkv, hd)
        return causal_band_score(sig.band[block_idx], ctx_err, value_dir, self.config.window)
