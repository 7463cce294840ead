"""SFT and DPO training loops with token policies (paper Algorithm 1), written out plainly.

One optimizer step:
1. every `val_refresh_every` steps the valuer recomputes the validation gradient G on the current
   weights (only for policies that need token values);
2. each micro-batch: forward (inside `valuer.capture()` when scoring), per-position NLL, token values
   from the same graph, detached weights from the policy, then backward of the *unnormalised* sum
   `sum_p w_p l_p` (SFT) or `sum_pairs omega_sg (sum_p m+ l+ - sum_p m- l-)` (Alpha-DPO, Eq. 14);
   when scoring, that backward is `valuer.backward`: the same gradients, reusing the head-input
   gradient d l_p / d u_p that scoring computed instead of back-propagating through the head twice;
3. the accumulated gradient is summed over processes and divided by the step's normaliser K:
   SFT: K = sum of weights (kept tokens) over all micro-batches of the step on all processes, so the
   update is the gradient of the mean loss over the step's kept tokens, independent of how the global
   batch is split into micro-batches and processes; DPO: K = number of pairs in the step;
4. gradient clipping, AdamW, cosine-with-warm-up learning rate.

Masks are computed per process per micro-batch (top-rho within each micro-batch and DPO branch),
exactly as a single process accumulating the same micro-batches would. Multi-process training sums
gradients with one `all_reduce` per optimizer step (the communication pattern of DDP under
`no_sync` accumulation), works with the CPU gloo backend, and each process computes G on the whole
validation batch, so G is the same on every process (the average over processes of identical G).

The data order is a seeded permutation per epoch; the optimizer step number fixes the data position,
so a checkpoint (model, optimizer, scheduler, RNG states, step, counters) resumes the exact run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from alphatoken.blocks import scored_linears
from alphatoken.checkpoint import PreemptionFlag, has_checkpoint, load_checkpoint, save_checkpoint, seed_everything
from alphatoken.losses import (
    alpha_dpo_loss,
    dpo_logit,
    dpo_loss,
    dpo_weight,
    loss_positions,
    masked_dpo_loss,
    token_nll,
)
from alphatoken.policies import TokenContext, get_policy, scores_to_loss_positions
from alphatoken.train.config import TrainConfig
from alphatoken.train.data import as_batch, collate, collate_pairs, encode_dataset, pad_token_id
from alphatoken.train.reference import load_reference_logps, reference_sequence_logps, reference_token_losses

CHECKPOINT_DIR = "checkpoint"
REFERENCE_LOSSES = "reference_losses.pt"
REFERENCE_WEIGHTS = "reference_weights.pt"
FISHER = "fisher.safetensors"  # the Fisher computed at step 0 from `fisher_prompts`


@dataclass
class TrainResult:
    """What a run produced."""

    model: torch.nn.Module  # the trained model (LoRA adapters merged)
    steps: int  # optimizer steps completed (including skipped ones)
    preempted: bool  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint
    final_dir: Path | None  # HF checkpoint directory (None when preempted)
    metrics: dict = field(default_factory=dict)  # summary also written to metrics.json


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensor: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up `step / warmup`, then cosine `(1 + cos(pi * progress)) / 2` to 0 (or constant)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _wrap_lora(model, pcfg):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=pcfg.lora_rank, lora_alpha=pcfg.lora_alpha, lora_dropout=pcfg.lora_dropout, target_modules=list(pcfg.lora_targets), bias="none")
    return get_peft_model(model, lora)


def _step0_fisher(model, tokenizer, fisher_prompts, last_k: int, path: Path, resuming: bool, ckpt_dir: Path, rank: int,
                  device, progress: bool) -> dict:
    """The Fisher of the scored parameters of `model` at step 0 (for LoRA: of the freshly initialised
    factors), computed from `fisher_prompts` once and cached at `path`. A cached file is checked by
    `load_fisher` against `model`, which here still holds the step-0 weights (a checkpoint is loaded
    later; the adapters' initialisation is seeded), and against the Fisher configuration."""
    from alphatoken.fisher import FisherPrompts, compute_fisher, load_fisher, save_fisher

    if not isinstance(fisher_prompts, FisherPrompts):
        raise TypeError(f"fisher_prompts: expected an alphatoken.fisher.FisherPrompts, got {type(fisher_prompts).__name__}")
    cfg = fisher_prompts.config
    if cfg.last_k < last_k:
        raise ValueError(f"fisher_prompts.config.last_k={cfg.last_k} is below valuation.last_k={last_k}: "
                         "the Fisher would lack scored parameters")
    if path.is_file():
        fisher = load_fisher(path, model, cfg)
    elif resuming:
        raise FileNotFoundError(f"{path} is missing but {ckpt_dir} exists: the Fisher must be that of the weights at step 0")
    else:
        fisher = compute_fisher(model, tokenizer, fisher_prompts.prompts, cfg, responses=fisher_prompts.responses, progress=progress)
        if rank == 0:
            save_fisher(path, fisher, model, cfg, len(fisher_prompts.prompts))
    return {name: value.to(device) for name, value in fisher.items()}


def _optimizer(model, config: TrainConfig):
    """AdamW; no weight decay on 1-D parameters (biases, norms), as is customary for transformers."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _policy_generator(seed: int, step: int, micro_index: int, branch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + micro_index * 101 + branch) % (2**62))


def _pad_rows(rows: list[torch.Tensor], width: int, like: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros((len(rows), width), dtype=like.dtype, device=like.device)  # (B, T-1)
    for i, row in enumerate(rows):
        padded[i, : row.numel()] = row.to(like.dtype)
    return padded


def _dpo_objective(beta: float, ref_logps: torch.Tensor):
    """The validation objective of DPO for the valuer: mean DPO loss over the validation pairs."""

    def objective(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
        logps = -token_nll(logits, batch["labels"]).sum(dim=1)  # (2B,)
        b = logps.shape[0] // 2
        ref = ref_logps.to(logps)
        return dpo_loss(dpo_logit(logps[:b], logps[b:], ref[:b], ref[b:], beta))

    return objective


def train_sft(model, tokenizer, train_examples, val_batch, config: TrainConfig, fisher=None, reference=None, reference_model=None, out_dir=None,
              reference_logps=None, fisher_prompts=None) -> TrainResult:
    """Token-masked SFT (Alpha-SFT, Eq. 13) with the configured policy; `full` is standard SFT
    (the warm-start). `val_batch`: a batch dict or a list of examples (only used by policies that need
    token values). `fisher` / `reference`: diagonal Fisher and reference weights for the retention
    proxy (param name -> tensor); with a Fisher and no reference, the weights at step 0 are the reference.
    `reference_model`: the model whose per-token losses reference-based policies (STM, Token Cleaning,
    Rho-1) compare against; default the model itself before training. `reference_logps`: a file of
    those losses (`alphatoken.train.reference`), loaded instead of computing them.
    `fisher_prompts` (an `alphatoken.fisher.FisherPrompts`, instead of `fisher`): the Fisher of the
    scored parameters is computed at step 0 and cached in the output dir. LoRA scoring policies
    (`alphatoken_lora`) score the adapter factors, whose Fisher and reference exist only once the
    adapters are initialised, so they take `fisher_prompts` (or a `fisher` keyed by the factors'
    parameter names of the wrapped model)."""
    return _train("sft", model, tokenizer, train_examples, val_batch, config, fisher, reference, reference_model, out_dir,
                  reference_logps, fisher_prompts)


def train_dpo(model, tokenizer, train_pairs, val_pairs, config: TrainConfig, fisher=None, reference=None, reference_model=None, out_dir=None,
              reference_logps=None, fisher_prompts=None) -> TrainResult:
    """Token-masked DPO (Alpha-DPO, Eq. 14; plain DPO with `full`; ConfPO's masked logit with
    `confpo`). The DPO reference model is `reference_model`, default the model itself before training
    (the warm-start checkpoint). Its per-token log-probs of the pairs (and the validation pairs'
    sequence log-probs) come from `reference_logps`, a file written by
    `alphatoken.train.reference.save_reference_logps` for this model, data, max_length and
    micro_batch_size (checked; the pipeline's ref_logps stage), or else are computed here before the
    first update and cached in the output dir (`reference_losses.pt`) for resuming; both give the same
    values bit for bit. `fisher`, `reference`, `fisher_prompts` as in `train_sft`."""
    return _train("dpo", model, tokenizer, train_pairs, val_pairs, config, fisher, reference, reference_model, out_dir,
                  reference_logps, fisher_prompts)


def _train(objective, model, tokenizer, examples, val_data, config: TrainConfig, fisher, reference, reference_model, out_dir,
           reference_logps=None, fisher_prompts=None) -> TrainResult:
    preference = objective == "dpo"
    out = Path(out_dir or config.output_dir)
    rank, world = _dist_info()
    policy, pcfg = get_policy(config.policy.name), config.policy
    if policy.dpo_form == "masked_logit" and not preference:
        raise ValueError(f"policy {policy.name!r} is a preference-optimisation policy; use train_dpo")
    device = next(model.parameters()).device
    seed_everything(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / CHECKPOINT_DIR
    resuming = has_checkpoint(ckpt_dir)

    # ---- data
    features, stats = encode_dataset(tokenizer, examples, config.max_length, preference)
    pad_id = pad_token_id(tokenizer)
    global_batch = config.micro_batch_size * config.grad_accum_steps * world
    steps_per_epoch = len(features) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(features)} usable training examples ({stats.as_dict()}) are fewer than one global batch of {global_batch}")
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    # ---- reference per-token losses: from the given file (checked against the reference model and
    # the data), or computed once here (before any update) and cached on disk
    ref_losses, ref_val = None, None
    needs_scores = policy.needs_scores
    val_batch = as_batch(tokenizer, val_data, config.max_length, preference) if needs_scores else None
    if (preference or policy.needs_reference_loss) and reference_logps is not None:
        ref_model = reference_model if reference_model is not None else model  # the weights before any update
        loaded = load_reference_logps(reference_logps, ref_model, features, val_batch if preference else None,
                                      config.max_length, config.micro_batch_size, preference)
        ref_losses, ref_val = loaded.train, loaded.val
    elif preference or policy.needs_reference_loss:
        cache = out / REFERENCE_LOSSES
        if cache.is_file():
            saved = torch.load(cache, map_location="cpu", weights_only=False)
            if len(saved["train"]) != len(features):
                raise ValueError(f"{cache}: cached for {len(saved['train'])} examples, the data has {len(features)}; delete it to recompute")
            ref_losses, ref_val = saved["train"], saved.get("val")
        elif resuming:
            raise FileNotFoundError(f"{cache} is missing but {ckpt_dir} exists: the reference losses must come from the model before training")
        else:
            ref_model = reference_model if reference_model is not None else model
            ref_losses = reference_token_losses(ref_model, features, pad_id, device, config.micro_batch_size, preference, "reference losses")
            if preference and val_batch is not None:
                ref_val = reference_sequence_logps(ref_model, val_batch, device)  # (2Bv,)
            if rank == 0:
                torch.save({"train": ref_losses, "val": ref_val}, cache)

    # ---- LoRA adapters, before the valuer: a LoRA scoring policy scores the factors
    if policy.adapter == "lora":
        model = _wrap_lora(model, pcfg)

    # ---- valuer (policies that need token values)
    valuer = None
    if fisher_prompts is not None and not needs_scores:
        raise ValueError(f"fisher_prompts: policy {policy.name!r} does not score tokens, so it uses no Fisher")
    if needs_scores:
        from alphatoken.valuation import TokenValuer, ValuationConfig

        vcfg = dataclasses.replace(config.valuation or ValuationConfig(), **policy.valuation_overrides)
        if fisher_prompts is not None:
            if fisher is not None:
                raise ValueError("pass either `fisher` or `fisher_prompts` (to compute it at step 0), not both")
            fisher = _step0_fisher(model, tokenizer, fisher_prompts, vcfg.last_k, out / FISHER, resuming, ckpt_dir, rank,
                                   device, config.progress)
        if fisher is not None and reference is None:
            ref_path = out / REFERENCE_WEIGHTS
            if ref_path.is_file():
                reference = torch.load(ref_path, map_location=device, weights_only=True)
            elif resuming:
                raise FileNotFoundError(f"{ref_path} is missing but {ckpt_dir} exists: the reference weights must be those before training")
            else:
                params = dict(model.named_parameters())
                reference = {name: params[name].detach().clone() for name in scored_linears(model, vcfg.last_k)}
                if rank == 0:
                    torch.save({k: v.cpu() for k, v in reference.items()}, ref_path)
        valuer = TokenValuer(model, vcfg, fisher=fisher, reference=reference)
        val_batch = _to(val_batch, device)
        val_objective = _dpo_objective(config.dpo_beta, ref_val) if preference else None

    # ---- optimiser, schedule
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    if world > 1:
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, config)
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total_steps, config.lr_schedule))

    start_step, counters, history = 0, {"nonfinite_steps": 0, "all_masked_steps": 0, "consecutive_nonfinite": 0}, []
    if resuming:
        start_step, extra = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        counters, history = extra["counters"], extra["history"]
    if world > 1:
        dist.barrier()

    live = None
    if rank == 0:
        from dvclive import Live

        live_dir = out / "dvclive"
        live = Live(str(live_dir), save_dvc_exp=False, resume=resuming, dvcyaml=str(live_dir / "dvc.yaml"))
        live.log_params({"objective": objective, "policy": policy.name, "rho": pcfg.rho, "seed": config.seed, "world_size": world})

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (config.bf16 and device.type == "cuda") else contextlib.nullcontext()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"{objective}:{policy.name}", disable=not (config.progress and rank == 0))
    orders: dict[int, list[int]] = {}
    preempted = False

    def checkpoint(step_done: int):
        if rank == 0:
            save_checkpoint(ckpt_dir, model, optimizer, scheduler, step_done, {"counters": counters, "history": history})
        if world > 1:
            dist.barrier()

    with PreemptionFlag() as flag:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            epoch, position = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: _epoch_order(len(features), config.seed, epoch)}
            step_indices = orders[epoch][position * global_batch : (position + 1) * global_batch]
            mb = config.micro_batch_size
            chunks = [step_indices[j * mb : (j + 1) * mb] for j in range(config.grad_accum_steps * world)]
            rho = pcfg.rho_at(step / max(1, total_steps - 1))
            if valuer is not None and (step % config.val_refresh_every == 0 or step == start_step):
                valuer.set_validation(val_batch, objective=val_objective)

            optimizer.zero_grad(set_to_none=True)
            # (sum w*l, K, n valid, sum l, n tokens, non-finite, dpo loss sum, correct pairs, pairs)
            acc = torch.zeros(9, dtype=torch.float64)
            for micro_index in range(rank, len(chunks), world):
                chunk = chunks[micro_index]
                if preference:
                    batch = _to(collate_pairs([features[i] for i in chunk], pad_id), device)
                else:
                    batch = _to(collate([features[i] for i in chunk], pad_id), device)
                capture = valuer.capture(share_head=True) if valuer is not None else contextlib.nullcontext()
                with autocast, capture:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
                token_loss = token_nll(logits, batch["labels"])  # (B, T-1), graph
                valid = loss_positions(batch["labels"])  # (B, T-1)
                width = token_loss.shape[1]
                if not torch.isfinite(token_loss).all():
                    acc[5] += 1
                    break
                if preference:
                    b = len(chunk)
                    ref = _pad_rows([ref_losses[i]["chosen"] for i in chunk] + [ref_losses[i]["rejected"] for i in chunk], width, token_loss)  # (2b, T-1)
                    logps, ref_logps = -token_loss.sum(dim=1), -ref.sum(dim=1)  # (2b,)
                    logit = dpo_logit(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], config.dpo_beta)  # (b,)
                    omega = dpo_weight(logit, config.dpo_beta)  # (b,)
                    scores = None
                    if valuer is not None:
                        scale = torch.cat([omega, -omega]).to(token_loss.dtype)  # (2b,) +omega chosen, -omega rejected
                        scores = valuer.score_captured(batch, token_loss, example_scale=scale, components=False)  # label-aligned (2b, T)
                    weights = []
                    for branch, rows in enumerate((slice(0, b), slice(b, 2 * b))):  # separate top-rho per branch
                        branch_scores = scores_to_loss_positions(scores, rows) if scores is not None else None
                        ctx = TokenContext(valid[rows], token_loss[rows].detach(), rho, branch_scores, ref[rows], _policy_generator(config.seed, step, micro_index, branch))
                        weights.append(policy.weights(ctx, pcfg))
                    if policy.dpo_form == "masked_logit":
                        loss_sum = masked_dpo_loss(token_loss[:b], token_loss[b:], ref[:b], ref[b:], weights[0], weights[1], config.dpo_beta, normalizer=1.0)
                    else:
                        loss_sum = alpha_dpo_loss(token_loss[:b], token_loss[b:], weights[0], weights[1], omega, normalizer=1.0)
                    kept = weights[0].sum() + weights[1].sum()
                    with torch.no_grad():
                        acc[6] += float(dpo_loss(logit.detach(), normalizer=1.0))
                        acc[7] += float((logit > 0).sum())
                        acc[8] += b
                else:
                    scores = None
                    if valuer is not None:
                        scores = scores_to_loss_positions(valuer.score_captured(batch, token_loss, components=False))
                    ref = _pad_rows([ref_losses[i] for i in chunk], width, token_loss) if ref_losses is not None else None
                    ctx = TokenContext(valid, token_loss.detach(), rho, scores, ref, _policy_generator(config.seed, step, micro_index, 0))
                    w = policy.weights(ctx, pcfg)  # (B, T-1) detached
                    loss_sum = (w * token_loss).sum()  # unnormalised; divided by the step's K below
                    kept = w.sum()
                if not torch.isfinite(loss_sum):
                    acc[5] += 1
                    break
                if valuer is not None:  # the same gradients, without the head's input gradient a second time
                    valuer.backward(loss_sum, token_loss)
                else:
                    loss_sum.backward()
                acc[0] += float(loss_sum.detach())
                acc[1] += float(kept)
                acc[2] += float(valid.sum())
                acc[3] += float((token_loss.detach() * valid).sum())
                acc[4] += float(batch["attention_mask"].sum())
            _all_reduce(acc, world)
            normaliser = acc[8].item() if preference else acc[1].item()
            skipped = None
            if acc[5] > 0:
                skipped = "nonfinite"
            elif normaliser == 0:
                skipped = "all_masked"
            grad_norm = float("nan")
            if skipped is None:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
                flat = torch.cat([g.reshape(-1) for g in grads])
                _all_reduce(flat, world)
                flat /= normaliser
                offset = 0
                for p in trainable:
                    n = p.numel()
                    p.grad = flat[offset : offset + n].view_as(p).clone()
                    offset += n
                if not torch.isfinite(flat).all():
                    skipped = "nonfinite"
                else:
                    if config.max_grad_norm is not None:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm))
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped step advances the schedule without optimizer.step()
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                scheduler.step()

            if skipped == "nonfinite":
                counters["nonfinite_steps"] += 1
                counters["consecutive_nonfinite"] += 1
            else:
                counters["consecutive_nonfinite"] = 0
                if skipped == "all_masked":
                    counters["all_masked_steps"] += 1

            elapsed = time.perf_counter() - t0
            row = {
                "step": step + 1,
                "loss": acc[0].item() / normaliser if skipped is None else float("nan"),
                "token_loss": acc[3].item() / max(1.0, acc[2].item()),
                "kept_fraction": acc[1].item() / max(1.0, acc[2].item()),
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": acc[4].item() / max(elapsed, 1e-9),
                "grad_norm": grad_norm,
                "rho": rho,
                "skipped": skipped or "",
            }
            if preference:
                row["dpo_loss"] = acc[6].item() / max(1.0, acc[8].item())
                row["reward_accuracy"] = acc[7].item() / max(1.0, acc[8].item())
            history.append(row)
            if live is not None and (step + 1) % config.log_every == 0:
                live.step = step
                for key, value in row.items():
                    if key not in ("step", "skipped") and math.isfinite(value):
                        live.log_metric(f"train/{key}", value)
                live.next_step()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{row['kept_fraction']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")

            if counters["consecutive_nonfinite"] >= config.max_nonfinite_steps:
                checkpoint(step + 1)
                bar.close()
                raise RuntimeError(
                    f"non-finite loss or gradient in {counters['consecutive_nonfinite']} consecutive optimizer steps "
                    f"(last: step {step + 1}); checkpoint saved to {ckpt_dir}"
                )
            stop = torch.tensor([1.0 if flag.raised else 0.0])
            _all_reduce(stop, world)
            if stop.item() > 0:
                checkpoint(step + 1)
                preempted = True
                break
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                checkpoint(step + 1)
    bar.close()

    summary = {
        "objective": objective,
        "policy": policy.name,
        "steps": len(history) and history[-1]["step"],
        "total_steps": total_steps,
        "world_size": world,
        "data": stats.as_dict(),
        "nonfinite_steps": counters["nonfinite_steps"],
        "all_masked_steps": counters["all_masked_steps"],
        "final_loss": next((r["loss"] for r in reversed(history) if not r["skipped"]), float("nan")),
        "mean_kept_fraction": sum(r["kept_fraction"] for r in history) / max(1, len(history)),
        "final_token_loss": history[-1]["token_loss"] if history else float("nan"),
        "preempted": preempted,
    }
    if preference and history:
        summary["final_dpo_loss"] = history[-1]["dpo_loss"]
        summary["final_reward_accuracy"] = history[-1]["reward_accuracy"]
    if preempted:
        if live is not None:
            live.end()
        return TrainResult(model, summary["steps"], True, None, summary)

    if policy.adapter == "lora":
        model = model.merge_and_unload()
    final_dir = None
    if rank == 0:
        from alphatoken.models import save_pretrained

        final_dir = save_pretrained(model, tokenizer, out / "final")
        (final_dir / "train_config.json").write_text(json.dumps({"objective": objective, **config.to_dict()}, indent=2, default=str))
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
        live.end()
    if world > 1:
        dist.barrier()
    return TrainResult(model, total_steps, False, final_dir or out / "final", summary)
