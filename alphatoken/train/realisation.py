"""Value realisation: does the loss change that a step's token selection promises reach the model?

AlphaToken ranks tokens by the first-order effect of their gradient on a target-validation loss. A
step built from the top-ranked tokens should therefore lower that loss, and, if the values generalise,
the loss of held-out target examples that were never in G. Between the promise and the result sit the
selection (only the scored weights are valued), the optimizer (AdamW rescales every coordinate), the
clipping and the curvature. For one optimizer step with normalised (and clipped) gradient `g_hat`
and actual update `delta = theta' - theta`, and for each probe set `S` (`val`: the validation batch G
is computed on; `heldout`: target examples never in G and never trained on) with mean token loss
`L_S` and gradient `g_S = dL_S/dtheta` at theta, this module records

    sgd_pred[_scored]      -lr * <g_hat, g_S>       first-order change an SGD step of this lr would give
    update_pred[_scored]   <delta, g_S>             first-order change of the update actually taken
    loss_change            L_S(theta') - L_S(theta) the change that happened
    grad_cos               cos(g_hat, g_S)          alignment of the selected gradient with the probe's
    update_cos             cos(-delta, g_S)         alignment of the update with the probe's descent

(`_scored`: the inner product restricted to the scored weights, those the token values are computed
on; without the suffix: over every trainable weight), as `<probe>_<name>` entries of the step's history
row. Negative predictions and changes mean the loss goes down. `sgd_pred` against `update_pred` tells
what the optimizer does to the selection's promise, `update_pred` against `loss_change` what the
curvature does. Plain SGD without momentum or clipping gives `update_pred == sgd_pred` (tested).

The probes cost one forward and backward over each probe set before the step and one forward after
it; the time is measured apart and left out of the step's throughput. The record is computed on rank
0 only (the weights are replicated), from fixed probe batches, so it never changes the training run.
"""

from __future__ import annotations

import contextlib

import torch

from alphatoken.losses import loss_positions, token_nll
from alphatoken.train.batches import collate

FIELDS = ("sgd_pred", "sgd_pred_scored", "update_pred", "update_pred_scored", "loss_change", "grad_cos", "update_cos")


def _chunks(model, features: list[dict], pad_id: int, chunk: int, device, autocast):
    """(sum of response-token NLLs, response-token count) of `features`, `chunk` examples per forward."""
    for start in range(0, len(features), chunk):
        batch = {k: v.to(device) for k, v in collate(features[start : start + chunk], pad_id).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (b, T, V)
        valid = loss_positions(batch["labels"])  # (b, T-1)
        yield (token_nll(logits, batch["labels"]) * valid).sum(), int(valid.sum())


def _mean_loss_and_grad(model, features: list[dict], pad_id: int, params: list[torch.nn.Parameter], chunk: int,
                        device, autocast) -> tuple[float, list[torch.Tensor]]:
    """(mean response-token NLL over `features`, its gradient w.r.t. `params`): the sum's gradient
    accumulated chunk by chunk, then divided by the token count."""
    total, count = 0.0, 0
    grads = [torch.zeros_like(p) for p in params]
    for loss_sum, n in _chunks(model, features, pad_id, chunk, device, autocast):
        for g, d in zip(grads, torch.autograd.grad(loss_sum, params, allow_unused=True)):
            if d is not None:
                g += d
        total += float(loss_sum.detach())
        count += n
    if count == 0:
        raise ValueError("a realisation probe set has no response tokens")
    return total / count, [g / count for g in grads]


@torch.no_grad()
def _mean_loss(model, features: list[dict], pad_id: int, chunk: int, device, autocast) -> float:
    total, count = 0.0, 0
    for loss_sum, n in _chunks(model, features, pad_id, chunk, device, autocast):
        total += float(loss_sum)
        count += n
    return total / count


def _dot(a: list[torch.Tensor], b: list[torch.Tensor], keep: list[bool] | None = None) -> float:
    """sum_i <a_i, b_i> in float64, over the pairs where `keep` is True (all without it)."""
    return float(sum((x.double() * y.double()).sum() for i, (x, y) in enumerate(zip(a, b)) if keep is None or keep[i]))


def _cos(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    norm = (_dot(a, a) * _dot(b, b)) ** 0.5
    return _dot(a, b) / norm if norm > 0 else float("nan")


class ValueRealisation:
    """The probes of one run: `before(model)` at the start of a recorded step (losses, gradients and a
    copy of the trainable weights), `after(model, state, step_grads, lr)` once the optimizer stepped
    (the row entries). `probes`: name -> encoded examples (`encode_dataset` features); `params`: the
    trainable parameters in optimizer order; `scored`: which of them are scored weights."""

    def __init__(self, probes: dict[str, list[dict]], params: list[torch.nn.Parameter], scored: list[bool], pad_id: int,
                 device, chunk: int = 4, autocast=None):
        for name, features in probes.items():
            if not features:
                raise ValueError(f"realisation probe {name!r} has no usable example")
        self.probes, self.params, self.scored, self.pad_id = probes, params, scored, pad_id
        self.device, self.chunk = device, chunk
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()

    def before(self, model) -> dict:
        state = {"weights": [p.detach().clone() for p in self.params], "probes": {}}
        for name, features in self.probes.items():
            loss, grads = _mean_loss_and_grad(model, features, self.pad_id, self.params, self.chunk, self.device,
                                              self.autocast)
            state["probes"][name] = (loss, grads)
        return state

    def after(self, model, state: dict, step_grads: list[torch.Tensor], lr: float) -> dict[str, float]:
        """Row entries `<probe>_<field>` (FIELDS) and `<probe>_loss` (the loss before the step).
        `step_grads`: the gradient the optimizer stepped with (normalised and clipped), aligned with
        `params`; `lr`: the learning rate of the step."""
        delta = [p.detach() - w for p, w in zip(self.params, state["weights"])]
        minus_delta = [-d for d in delta]
        row = {}
        for name, (loss, grads) in state["probes"].items():
            after = _mean_loss(model, self.probes[name], self.pad_id, self.chunk, self.device, self.autocast)
            row.update({
                f"{name}_loss": loss,
                f"{name}_sgd_pred": -lr * _dot(step_grads, grads),
                f"{name}_sgd_pred_scored": -lr * _dot(step_grads, grads, self.scored),
                f"{name}_update_pred": _dot(delta, grads),
                f"{name}_update_pred_scored": _dot(delta, grads, self.scored),
                f"{name}_loss_change": after - loss,
                f"{name}_grad_cos": _cos(step_grads, grads),
                f"{name}_update_cos": _cos(minus_delta, grads),
            })
        return row
