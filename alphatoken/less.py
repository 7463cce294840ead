"""LESS (Xia et al., ICML 2024): training *examples* selected before training by how well their LoRA
gradients align with the target validation set's. Follows the official source, princeton-nlp/LESS
`less/data_selection/{collect_grad_reps,matching,get_info,write_selected_data}.py`, where the paper is loose.

1. Warm-up. A LoRA adapter (`lora_rank`, `lora_alpha`, `lora_dropout` on `lora_targets`, peft) trains on a
   seeded random `warmup_fraction` of the training pool for `warmup_epochs` epochs: AdamW (betas 0.9 and
   0.999, eps 1e-8, no weight decay), Hugging Face's `linear` schedule (ceil(warmup_ratio * steps) steps of
   linear warm-up from 0, then linear decay to 0), gradient clipping; the step's loss is the mean over its
   examples of each example's mean response loss (LESS: batch 1 x gradient accumulation). One checkpoint per
   epoch: the adapter, AdamW's moments m, v, and eta_i, the epoch's mean learning rate.
2. Gradients. At checkpoint i, with the model in eval mode (no dropout, as LESS loads it), the gradient
   g_i(z) of example z's mean response loss with respect to every LoRA factor, flattened in
   `named_parameters` order. Training examples are Adam-preconditioned with the checkpoint's moments, with no
   bias correction: m' = 0.9 m + 0.1 g, v' = 0.999 v + 0.001 g^2, Gamma = m' / sqrt(v' + 1e-8); validation
   examples keep g.
3. Projection. x -> x P, P (D, k) of i.i.d. Rademacher entries +-1/sqrt(k) (`projection_dim` = k). LESS uses
   trak's projector, which draws the same distribution; here P is drawn block by block of PROJECTION_BLOCK
   parameter rows, block j from a torch generator seeded with `block_seed(projection_seed, j)`, so it is
   exact, never held whole, and the same for any batch of gradients. Each projected vector is then L2-normalised.
4. Score. score(z) = sum_i eta_i / (sum_j eta_j) * mean_{z' in val} <Gamma^_i(z), g^_i(z')>. LESS takes the
   max over the target task's subtasks of these per-subtask means; the validation set here is one task.
5. Selection. The best examples by score (ties: the earlier example): `ceil(ratio * N)` of the N scored
   examples (`budget="examples"`), or the shortest head of the ranking whose response tokens reach
   `ceil(ratio * T)` of the pool's T (`budget="tokens"`); see `selection_size`. (LESS's write_selected_data
   keeps int(percentage * N); the ceiling is AlphaToken's kept-token rule, so one ratio means one budget.)

`select_examples` runs it all; with a `work_dir` it keeps each warm-up checkpoint and each checkpoint's
projected gradients there and reuses those of the same identity (config, weights, data, device), so a
killed selection resumes at the last finished piece and gives the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alphatoken.hooks import claim, release
from alphatoken import data as records
from alphatoken.blocks import is_lora_layer, lora_factors
from alphatoken.checkpoint import atomic_torch_save, atomic_write_text
from alphatoken.data import ConfigError, check_choice, check_int, check_number
from alphatoken.losses import IGNORE_INDEX, kept_count, loss_positions, token_nll
from alphatoken.train.batches import collate, encode_example

log = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)  # the warm-up's AdamW and LESS's preconditioning (obtain_gradients_with_adam)
ADAM_EPS = 1e-8
PROJECTION_BLOCK = 1024  # parameter rows of P drawn per generator (part of P's definition)
BUDGETS = ("examples", "tokens")


@dataclass(frozen=True)
class LessConfig:
    """Warm-up, gradient features and budget of one LESS selection (defaults: the paper's, BASELINES.md)."""

    ratio: float = 0.05  # share of the training pool selected (paper: top 5%)
    budget: str = "examples"  # "examples": ceil(ratio * N) examples; "tokens": ceil(ratio * T) response tokens
    warmup_fraction: float = 0.05  # warm-up pool: ceil(fraction * N) training examples, a seeded draw
    warmup_epochs: int = 4  # epochs of the LoRA warm-up; one checkpoint per epoch
    lr: float = 2e-5  # peak learning rate of the warm-up
    warmup_ratio: float = 0.03  # linear warm-up share of the warm-up's steps (Hugging Face `linear` schedule)
    micro_batch_size: int = 1  # examples per forward/backward of the warm-up
    grad_accum_steps: int = 32  # micro-batches per optimizer step (paper: batch 1 x 32)
    max_grad_norm: float | None = 1.0  # gradient clipping of the warm-up (None: off)
    lora_rank: int = 128  # LoRA r
    lora_alpha: float = 512.0  # LoRA alpha (scale alpha / r)
    lora_dropout: float = 0.1  # LoRA dropout during the warm-up (gradients are taken in eval mode)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # adapted projections
    projection_dim: int = 8192  # k: dimensions of the random projection
    projection_seed: int = 0  # seed of the Rademacher matrix
    seed: int = 0  # seed of the warm-up draw, its data order, the adapter's initialisation and its dropout
    max_length: int = 2048  # tokens per example (prompt + response; longer responses are truncated)
    grad_batch_size: int = 4  # examples per forward/backward of the per-example gradients (same values)
    projection_batch: int = 64  # examples whose gradients are projected together (bounds memory)

    def __post_init__(self):
        owner = "LessConfig"
        check_number(owner, "ratio", self.ratio, 0.0, 1.0, low_open=True)
        check_choice(owner, "budget", self.budget, BUDGETS)
        check_number(owner, "warmup_fraction", self.warmup_fraction, 0.0, 1.0, low_open=True)
        check_int(owner, "warmup_epochs", self.warmup_epochs, 1)
        check_number(owner, "lr", self.lr, 0.0, low_open=True)
        check_number(owner, "warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        for name in ("micro_batch_size", "grad_accum_steps", "lora_rank", "projection_dim", "grad_batch_size",
                     "projection_batch"):
            check_int(owner, name, getattr(self, name), 1)
        check_number(owner, "max_grad_norm", self.max_grad_norm, 0.0, low_open=True, optional=True)
        check_number(owner, "lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_number(owner, "lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError("lora_targets", f"expected a non-empty list of module names, got {self.lora_targets!r}", owner)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for name in ("projection_seed", "seed"):
            check_int(owner, name, getattr(self, name), 0)
        check_int(owner, "max_length", self.max_length, 2)


# ---------------------------------------------------------------------------------------------------
# The adapter and its parameters


def add_lora(model: nn.Module, cfg: LessConfig) -> nn.Module:
    """`model` with a fresh LoRA adapter (peft), initialised from seed `cfg.seed`; only its factors train."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none")
    return get_peft_model(model, lora)


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Linear]]:
    """(name, weight, factor linear) of every trainable parameter, in `named_parameters` order (the order of
    LESS's flattened gradients). Every trainable parameter must be a LoRA factor weight (LESS asserts the same)."""
    owners = {}
    for layer in model.modules():
        if is_lora_layer(layer):
            for factors in lora_factors(layer):
                owners[id(factors.lora_A.weight)] = factors.lora_A
                owners[id(factors.lora_B.weight)] = factors.lora_B
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    stray = [name for name, p in trainable if id(p) not in owners]
    if stray or not trainable:
        raise ValueError(f"LESS takes gradients of the LoRA factors only; trainable parameters that are not: "
                         f"{stray[:3]}" if stray else "the model has no trainable LoRA factor")
    return [(name, p, owners[id(p)]) for name, p in trainable]


def mean_response_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """`[B]`: each example's mean NLL over its response tokens (labels != -100)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    labels = batch["labels"]
    nll = token_nll(logits, labels)  # (B, T-1)
    counts = loss_positions(labels).sum(dim=1)  # (B,)
    if bool((counts == 0).any()):
        raise ValueError("an example without response tokens has no mean response loss")
    return nll.sum(dim=1) / counts


def per_example_gradients(model: nn.Module, batch: dict) -> torch.Tensor:
    """`[B, D]`: row b is the gradient of example b's mean response loss with respect to every LoRA factor,
    flattened in `lora_parameters` order, from one batched backward. For a factor linear `u = W a`,
    dl_b/dW = sum_t (dl_b/du[b, t]) a[b, t]^T: its input a is kept by a forward hook and the gradient of its
    output comes from `autograd.grad` of sum_b l_b (examples do not interact: causal attention, right padding).
    Naive equivalent: for each b, l_b.backward() and concatenate `p.grad.reshape(-1)`."""
    params = lora_parameters(model)
    captured: dict = {}

    def keep(module, inputs, output):
        captured[module] = (inputs[0], output)

    claimed = claim("LESS's per-example gradients", [module for _, _, module in params])
    handles = [module.register_forward_hook(keep) for _, _, module in params]
    try:
        losses = mean_response_losses(model, batch)  # (B,)
    finally:
        for handle in handles:
            handle.remove()
        release(claimed)
    outputs = [captured[module][1] for _, _, module in params]
    output_grads = torch.autograd.grad(losses.sum(), outputs)
    rows = []
    for (_, weight, module), grad_out in zip(params, output_grads):
        x = captured[module][0]  # (B, T, in)
        per = torch.einsum("bto,bti->boi", grad_out.to(weight.dtype), x.to(weight.dtype))  # (B, out, in)
        rows.append(per.reshape(per.shape[0], -1))
    return torch.cat(rows, dim=1)  # (B, D)


def adam_preconditioned(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """LESS's Adam direction of each row of `grads` `[N, D]` from the checkpoint's moments `[D]`, no bias
    correction: m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2, Gamma = m' / sqrt(v' + eps)."""
    m = ADAM_BETAS[0] * exp_avg + (1 - ADAM_BETAS[0]) * grads  # (N, D)
    v = ADAM_BETAS[1] * exp_avg_sq + (1 - ADAM_BETAS[1]) * grads.square()  # (N, D)
    return m / torch.sqrt(v + ADAM_EPS)


# ---------------------------------------------------------------------------------------------------
# The random projection


def block_seed(seed: int, block: int) -> int:
    """The seed of block `block` of the projection of seed `seed`: 32 bits of SHA-256 of "seed/block" (torch's
    CPU generator keeps only the low 32 bits of a seed, so `seed * 2**32 + block` would not tell seeds apart)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{block}".encode()).digest()[:4], "little")


class RademacherProjection:
    """x -> x P for P `[dim_in, dim_out]` with i.i.d. entries +-1/sqrt(dim_out), drawn block by block:
    rows [j * PROJECTION_BLOCK, (j + 1) * PROJECTION_BLOCK) come from `torch.randint(0, 2, ...)` on a CPU
    generator seeded `block_seed(seed, j)`. No block is kept: memory stays at one block whatever dim_in."""

    def __init__(self, dim_in: int, dim_out: int, seed: int):
        self.dim_in, self.dim_out, self.seed = dim_in, dim_out, seed

    def block(self, j: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Rows of block j of P, `[rows, dim_out]`."""
        rows = min(PROJECTION_BLOCK, self.dim_in - j * PROJECTION_BLOCK)
        generator = torch.Generator().manual_seed(block_seed(self.seed, j))
        signs = torch.randint(0, 2, (rows, self.dim_out), generator=generator, dtype=torch.int8)  # (rows, k)
        return ((signs.to(dtype) * 2 - 1) / math.sqrt(self.dim_out)).to(device)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, dim_in] -> [N, dim_out]`."""
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"projection of {self.dim_in} dims got vectors of {x.shape[-1]}")
        out = torch.zeros(x.shape[0], self.dim_out, dtype=x.dtype, device=x.device)  # (N, k)
        for j in range(math.ceil(self.dim_in / PROJECTION_BLOCK)):
            start = j * PROJECTION_BLOCK
            rows = x[:, start:start + PROJECTION_BLOCK]  # (N, rows)
            out += rows @ self.block(j, x.dtype, x.device)
        return out


def gradient_features(model: nn.Module, features: list[dict], pad_id: int, projection: RademacherProjection,
                      cfg: LessConfig, moments: tuple[torch.Tensor, torch.Tensor] | None = None,
                      progress=None) -> torch.Tensor:
    """`[N, k]`: the L2-normalised projections of the examples' gradients at the model's current adapter,
    Adam-preconditioned with `moments` (exp_avg, exp_avg_sq, each `[D]`) when given (training examples)."""
    device = next(model.parameters()).device
    model.eval()
    projected = []
    for start in range(0, len(features), cfg.projection_batch):
        group = features[start:start + cfg.projection_batch]
        grads = []
        for b in range(0, len(group), cfg.grad_batch_size):
            batch = {k: v.to(device) for k, v in collate(group[b:b + cfg.grad_batch_size], pad_id).items()}
            g = per_example_gradients(model, batch).detach()  # (b, D)
            grads.append(adam_preconditioned(g, *moments) if moments is not None else g)
            if progress is not None:
                progress(len(group[b:b + cfg.grad_batch_size]))
        projected.append(projection.project(torch.cat(grads)))  # (group, k)
    return F.normalize(torch.cat(projected), dim=1)  # (N, k)


# ---------------------------------------------------------------------------------------------------
# The warm-up


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Hugging Face's `get_linear_schedule_with_warmup` factor of the update at 0-based step `step`."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def warmup_pool(n: int, cfg: LessConfig) -> list[int]:
    """The warm-up examples: ceil(warmup_fraction * n) indices drawn with seed `cfg.seed`, ascending."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return sorted(order[:kept_count(n, cfg.warmup_fraction)])


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def warm_up(model: nn.Module, features: list[dict], pad_id: int, cfg: LessConfig, start: dict | None = None,
            on_epoch=None) -> list[dict]:
    """Train the adapter of `model` on `features` for `cfg.warmup_epochs` epochs and return one checkpoint
    per epoch: {"epoch" (1-based), "adapter" {name: weight}, "optimizer" (AdamW state_dict), "mean_lr"}.
    `start`, a checkpoint of this warm-up, continues after its epoch (each epoch seeds its own data order
    and dropout, so the continuation is the uninterrupted run); `on_epoch(checkpoint)` is called after each."""
    params = lora_parameters(model)
    weights = [p for _, p, _ in params]
    optimizer = torch.optim.AdamW(weights, lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    device = weights[0].device
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps
    steps_per_epoch = math.ceil(len(features) / per_step)
    total = steps_per_epoch * cfg.warmup_epochs
    warmup = math.ceil(cfg.warmup_ratio * total)  # as Hugging Face's get_warmup_steps
    first = 0
    if start is not None:
        load_adapter(model, start["adapter"])
        optimizer.load_state_dict(_clone_state(start["optimizer"]))  # it would step `start`'s own tensors
        first = start["epoch"]
    checkpoints = []
    model.train()
    for epoch in range(first, cfg.warmup_epochs):
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))  # the adapter dropout of this epoch
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))).tolist()
        lrs = []
        for s in range(steps_per_epoch):
            lr = cfg.lr * linear_schedule(epoch * steps_per_epoch + s, warmup, total)
            chunk = order[s * per_step:(s + 1) * per_step]
            optimizer.zero_grad(set_to_none=True)
            for m in range(0, len(chunk), cfg.micro_batch_size):
                micro = [features[i] for i in chunk[m:m + cfg.micro_batch_size]]
                batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
                (mean_response_losses(model, batch).sum() / len(chunk)).backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(weights, cfg.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            lrs.append(lr)
        checkpoint = {"epoch": epoch + 1, "adapter": {n: p.detach().clone() for n, p, _ in params},
                      "optimizer": optimizer.state_dict(), "mean_lr": sum(lrs) / len(lrs)}
        checkpoint["optimizer"] = _clone_state(checkpoint["optimizer"])
        log.info("LESS warm-up epoch %d/%d: mean lr %.3g", epoch + 1, cfg.warmup_epochs, checkpoint["mean_lr"])
        checkpoints.append(checkpoint)
        if on_epoch is not None:
            on_epoch(checkpoint)
    model.eval()
    return checkpoints


def _clone_state(state: dict) -> dict:
    """A copy of an optimizer state_dict whose tensors do not change with further steps."""
    return {"state": {i: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": [dict(g) for g in state["param_groups"]]}


def load_adapter(model: nn.Module, adapter: dict) -> None:
    """Copy the factor weights of a checkpoint into the model's adapter."""
    params = lora_parameters(model)
    if [n for n, _, _ in params] != list(adapter):
        raise ValueError("the checkpoint's adapter does not match the model's LoRA factors")
    with torch.no_grad():
        for name, p, _ in params:
            p.copy_(adapter[name].to(p.device, p.dtype))


def adam_moments(checkpoint: dict, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) of a checkpoint's AdamW state, each flattened to `[D]` in `lora_parameters` order."""
    params = lora_parameters(model)
    state = checkpoint["optimizer"]["state"]
    device = params[0][1].device
    m = torch.cat([state[i]["exp_avg"].reshape(-1) for i in range(len(params))]).to(device)
    v = torch.cat([state[i]["exp_avg_sq"].reshape(-1) for i in range(len(params))]).to(device)
    return m, v


# ---------------------------------------------------------------------------------------------------
# Scores and the selection


def less_scores(train_features: list[torch.Tensor], val_features: list[torch.Tensor], mean_lrs: list[float]) -> torch.Tensor:
    """`[N]`: score(z) = sum_i eta_i / sum_j eta_j * mean_{z'} <Gamma^_i(z), g^_i(z')> from the normalised
    features of each checkpoint i (`[N, k]` training, `[M, k]` validation) and its mean learning rate."""
    total = float(sum(mean_lrs))
    if not total > 0:
        raise ValueError(f"the warm-up's mean learning rates {mean_lrs} sum to {total}: no checkpoint has a weight "
                         "(more warm-up steps, or a smaller warmup_ratio)")
    score = torch.zeros(train_features[0].shape[0], dtype=torch.float64)
    for eta, train, val in zip(mean_lrs, train_features, val_features):
        score += (eta / total) * (train.double() @ val.double().T).mean(dim=1).cpu()  # (N,)
    return score


def selection_size(ratio: float, budget: str, response_tokens: list[int], order: list[int]) -> int:
    """How many of the ranked examples (`order`, best first) are selected: `ceil(ratio * N)` (examples), or
    the fewest whose response tokens reach `ceil(ratio * T)`, T the pool's response tokens (tokens)."""
    if budget == "examples":
        return kept_count(len(order), ratio)
    target, reached = kept_count(sum(response_tokens), ratio), 0
    for k, i in enumerate(order, start=1):
        reached += response_tokens[i]
        if reached >= target:
            return k
    return len(order)


def rank(scores: torch.Tensor) -> list[int]:
    """Indices by score, best first; ties keep the earlier example (a stable sort)."""
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{int(torch.isnan(scores).sum())} LESS scores are NaN")
    return torch.sort(-scores, stable=True).indices.tolist()


# ---------------------------------------------------------------------------------------------------
# The whole selection


@dataclass
class LessResult:
    """One selection over the training examples as given (indices refer to that list)."""

    scored: list[int]  # the examples that could be encoded (the others are counted in `skipped`)
    scores: list[float]  # score of each scored example (same order as `scored`)
    ranked: list[int]  # the scored examples, best first
    selected: list[int]  # the selected examples: the head of `ranked`
    warmup: list[int]  # the warm-up examples
    mean_lrs: list[float]  # eta_i of each checkpoint, before normalisation
    response_tokens: list[int]  # response tokens of each scored example (after truncation)
    skipped: dict = field(default_factory=dict)  # reason -> count, training examples that cannot train
    val_skipped: dict = field(default_factory=dict)  # reason -> count, validation examples
    gradient_dim: int = 0  # D: trainable LoRA parameters
    reused: list[str] = field(default_factory=list)  # work files of a previous run reused


def encode(tokenizer, examples: list, max_length: int) -> tuple[list[int], list[dict], dict]:
    """(indices kept, their features, skipped reason -> count), as the training loop encodes them."""
    kept, features, skipped = [], [], {}
    for index, example in enumerate(examples):
        try:
            features.append(encode_example(tokenizer, example, index, max_length, False))
            kept.append(index)
        except records.ExampleDropped as drop:
            skipped[drop.reason] = skipped.get(drop.reason, 0) + 1
    return kept, features, skipped


SELECTION_ONLY = ("ratio", "budget")  # settings of the last step only: changing them reuses the gradients


def selection_identity(cfg: LessConfig, weights: str, train: list[dict], val: list[dict], device: str) -> str:
    """SHA-256 of everything the warm-up and the gradient features depend on: the settings (but the budget),
    the base weights, the token ids and labels, the device and torch's version."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SELECTION_ONLY}
    body = {"config": settings, "weights": weights, "device": str(device), "torch": torch.__version__,
            "train": [(f["input_ids"], f["labels"]) for f in train], "val": [(f["input_ids"], f["labels"]) for f in val]}
    digest.update(json.dumps(body, sort_keys=True).encode())
    return digest.hexdigest()


def _cached(path: Path, identity: str):
    """The payload of a work file of this identity, or None (missing, unreadable or another identity)."""
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file is recomputed
        log.warning("%s is unreadable (%s): recomputing it", path, err)
        return None
    return record["payload"] if isinstance(record, dict) and record.get("identity") == identity else None


def _open_work(work: Path, identity: str) -> None:
    """Make `work` the work directory of `identity`: files left by another identity are removed."""
    marker = work / "identity"
    if marker.is_file() and marker.read_text() == identity:
        return
    if work.is_dir():
        for path in list(work.glob("warmup-*.pt")) + list(work.glob("features-*.pt")):
            path.unlink()
    atomic_write_text(marker, identity)


def select_examples(model: nn.Module, tokenizer, train_examples: list, val_examples: list, cfg: LessConfig,
                    pad_id: int, work_dir: str | Path | None = None, progress: bool = False) -> LessResult:
    """The LESS selection of `train_examples` for the target `val_examples` (see the module docstring).
    `model` is the base model (it gets the adapter). With `work_dir`, warm-up checkpoints
    (`warmup-<epoch>.pt`) and projected gradients (`features-<epoch>.pt`) of this identity are reused."""
    from alphatoken.models import weights_fingerprint

    scored, train, skipped = encode(tokenizer, train_examples, cfg.max_length)
    _, val, val_skipped = encode(tokenizer, val_examples, cfg.max_length)
    if not train or not val:
        raise ValueError(f"LESS needs encodable training and validation examples; skipped: train {skipped}, "
                         f"validation {val_skipped}")
    device = next(model.parameters()).device
    identity = selection_identity(cfg, weights_fingerprint(model), train, val, device)
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        _open_work(work, identity)
    reused = []

    def save(name, payload):
        if work is not None:
            atomic_torch_save({"identity": identity, "payload": payload}, work / name)

    model = add_lora(model, cfg)
    pool = warmup_pool(len(train), cfg)
    checkpoints, start = [], None
    for epoch in range(1, cfg.warmup_epochs + 1):
        found = _cached(work / f"warmup-{epoch}.pt", identity) if work is not None else None
        if found is None:
            break
        checkpoints.append(found)
        reused.append(f"warmup-{epoch}.pt")
        start = found
    if len(checkpoints) < cfg.warmup_epochs:
        checkpoints += warm_up(model, [train[i] for i in pool], pad_id, cfg, start=start,
                               on_epoch=lambda c: save(f"warmup-{c['epoch']}.pt", c))
    params = lora_parameters(model)
    dim = sum(p.numel() for _, p, _ in params)
    projection = RademacherProjection(dim, cfg.projection_dim, cfg.projection_seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(checkpoints) * (len(train) + len(val)), desc="LESS gradients")
    train_features, val_features = [], []
    for checkpoint in checkpoints:
        name = f"features-{checkpoint['epoch']}.pt"
        found = _cached(work / name, identity) if work is not None else None
        if found is None:
            load_adapter(model, checkpoint["adapter"])
            tick = bar.update if bar is not None else None
            found = {"train": gradient_features(model, train, pad_id, projection, cfg, adam_moments(checkpoint, model), tick).cpu(),
                     "val": gradient_features(model, val, pad_id, projection, cfg, None, tick).cpu()}
            save(name, found)
        else:
            reused.append(name)
        train_features.append(found["train"])
        val_features.append(found["val"])
    if bar is not None:
        bar.close()
    mean_lrs = [float(c["mean_lr"]) for c in checkpoints]
    scores = less_scores(train_features, val_features, mean_lrs)
    order = rank(scores)
    tokens = [int(sum(1 for label in f["labels"][1:] if label != IGNORE_INDEX)) for f in train]
    chosen = order[:selection_size(cfg.ratio, cfg.budget, tokens, order)]
    return LessResult(scored=scored, scores=scores.tolist(), ranked=[scored[i] for i in order],
                      selected=[scored[i] for i in chosen],
                      warmup=[scored[i] for i in pool], mean_lrs=mean_lrs, response_tokens=tokens, skipped=skipped,
                      val_skipped=val_skipped, gradient_dim=dim, reused=reused)
