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
so a checkpoint (model, optimizer, scheduler, RNG states, step, counters, metric history, and the
valuer's G and P when they were computed before the checkpoint's step) resumes the exact run: a
resumed run ends with weights bit-identical to an uninterrupted one, for every `val_refresh_every`.

The run directory (`output_dir`) is the run's own: `run_identity.json` records everything that changes
the result (`_run_identity`: the result-relevant TrainConfig fields, the policy and valuation config,
the weights, data, Fisher and reference identities, seed, world size, device, library versions) and
the digests of the values computed at step 0 (reference losses, reference weights, the LoRA factors'
Fisher). A checkpoint left by a run of another identity is refused (RunMismatchError, naming the
fields); without a checkpoint, files of another identity are removed and the run starts over. Every
file is written atomically (`alphatoken.checkpoint`); an unreadable cache is recomputed, an
unreadable checkpoint (or a recomputed step-0 value that differs from the one it was trained with)
restarts the run from step 0, with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from alphatoken import __version__
from alphatoken.blocks import scored_linears
from alphatoken.checkpoint import (
    IDENTITY_FILE, TMP_SUFFIX, CheckpointError, PreemptionFlag, RunMismatchError, apply_checkpoint, atomic_torch_save,
    atomic_write, atomic_write_text, file_sha256, has_checkpoint, identity_differences, read_checkpoint,
    read_run_identity, remove_directory, remove_path, save_checkpoint, seed_everything, tensor_digest, write_directory,
    write_run_identity,
)
from alphatoken.losses import (
    IGNORE_INDEX,
    alpha_dpo_loss,
    dpo_logit,
    dpo_loss,
    dpo_weight,
    loss_positions,
    masked_dpo_loss,
    position_kl,
    selective_mean_losses,
    tdpo_pair_losses,
    token_nll,
    triplet_losses,
)
from alphatoken.policies import StepZeroInputs, TokenContext, get_policy, scores_to_loss_positions
from alphatoken.policy_inputs import AttentionCapture, embedding_importance, sample_anchor
from alphatoken.train.config import TrainConfig
from alphatoken.train.batches import as_batch, collate, collate_pairs, encode_dataset, pad_token_id
from alphatoken.train.reference import (
    batch_sha256, features_sha256, load_reference_logps, reference_sequence_logps, reference_token_losses,
)
from alphatoken.train.token_rewards import load_token_rewards

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
METRICS = "metrics.json"
TIMING = "timing.json"  # optimizer-step seconds of this process, mean and per step (a measurement, outside the run's identity)
LIVE_DIR = "dvclive"
REFERENCE_LOSSES = "reference_losses.pt"
REFERENCE_WEIGHTS = "reference_weights.pt"
POLICY_VALUES = "policy_values.pt"  # the policy's own step-0 values (Policy.precompute: FLOW, XTF)
FISHER = "fisher.safetensors"  # the Fisher computed at step 0 from `fisher_prompts`
STEP0_FILES = (REFERENCE_LOSSES, REFERENCE_WEIGHTS, FISHER, POLICY_VALUES)  # values computed once at step 0, reused on resume
# TrainConfig fields that do not change the result (weights, metrics.json, the dvclive rows, which are
# rebuilt from the checkpoint's history): a run may resume with other values of them.
RESULT_NEUTRAL_FIELDS = ("output_dir", "progress", "log_every", "checkpoint_every")


@dataclass
class TrainResult:
    """What a run produced."""

    model: torch.nn.Module  # the trained model (LoRA adapters merged)
    steps: int  # optimizer steps completed (including skipped ones)
    preempted: bool  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint
    final_dir: Path | None  # HF checkpoint directory (None when preempted)
    metrics: dict = field(default_factory=dict)  # summary also written to metrics.json
    start_step: int = 0  # the step this run resumed from (0: it started from scratch)


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


def _step0_fisher(model, tokenizer, fisher_prompts, last_k: int, run: "_RunDirectory", device, progress: bool) -> dict:
    """The Fisher of the scored parameters of `model` at step 0 (for LoRA: of the freshly initialised
    factors), computed from `fisher_prompts` once and cached in the run directory. A cached file is
    checked by `load_fisher` against `model`, which here still holds the step-0 weights (a checkpoint is
    loaded later; the adapters' initialisation is seeded), against the Fisher configuration and
    against the digest recorded when it was computed."""
    from alphatoken.fisher import FisherPrompts, compute_fisher, load_fisher, save_fisher

    if not isinstance(fisher_prompts, FisherPrompts):
        raise TypeError(f"fisher_prompts: expected an alphatoken.fisher.FisherPrompts, got {type(fisher_prompts).__name__}")
    cfg = fisher_prompts.config
    if cfg.last_k < last_k:
        raise ValueError(f"fisher_prompts.config.last_k={cfg.last_k} is below valuation.last_k={last_k}: "
                         "the Fisher would lack scored parameters")
    fisher = run.step0_value(
        FISHER,
        load=lambda path: load_fisher(path, model, cfg),
        compute=lambda: {name: value.detach().cpu() for name, value in compute_fisher(
            model, tokenizer, fisher_prompts.prompts, cfg, responses=fisher_prompts.responses, progress=progress).items()},
        save=lambda path, value: atomic_write(path, lambda tmp: save_fisher(tmp, value, model, cfg, len(fisher_prompts.prompts))),
    )
    return {name: value.to(device) for name, value in fisher.items()}


class _RunDirectory:
    """The run's own files in `out`: the identity check on entry, the step-0 caches, the decision to
    resume or to restart. Rank 0 reads and writes the files; its decisions reach every rank."""

    def __init__(self, out: Path, identity: dict | None, rank: int, world: int, device):
        self.out, self.identity, self.rank, self.world, self.device = out, identity, rank, world, device
        self.checkpoint_dir = out / CHECKPOINT_DIR
        self.step0: dict = {}  # name -> tensor_digest of the values computed at step 0
        self.resuming = False  # a checkpoint of this identity is there
        self.restart = False  # the checkpoint cannot be used after all: train from step 0

    def _broadcast(self, value: int) -> int:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        flag = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(flag, src=0)
        return int(flag.item())

    def open(self) -> bool:
        """Compare the directory's identity with this run's; True when a checkpoint of it is there
        (resume). Without a checkpoint, files of another (or an unknown) identity are removed and the
        run starts over; a checkpoint of another identity raises RunMismatchError."""
        decision, message = 0, ""  # 0: start, 1: resume, 2: refuse
        if self.rank == 0:
            record, problem = read_run_identity(self.out)
            checkpoint = has_checkpoint(self.checkpoint_dir)
            if record is not None and record["identity"] == self.identity:
                self.step0 = dict(record["step0"])
                decision = 1 if checkpoint else 0
            elif record is not None and checkpoint:
                decision = 2
                differences = identity_differences(self.identity, record["identity"])
                message = (f"{self.out}: the checkpoint there belongs to a run with other settings, so resuming "
                           f"would train on with weights made by those; differing: {'; '.join(differences)}. "
                           f"Restore those values to resume it, or delete {self.out} to start over.")
            else:
                why = problem if record is None else "it was written by a run with other settings (" + "; ".join(
                    identity_differences(self.identity, record["identity"])) + ")"
                removed = self._remove_run_files(keep_step0=False)
                if removed:
                    log.warning("%s: starting over, the run's files cannot be reused: %s; removed %s", self.out, why,
                                ", ".join(removed))
            if decision == 0:
                self._remove_run_files(keep_step0=True)  # outputs and leftovers of an earlier attempt
                write_run_identity(self.out, self.identity, self.step0)
        decision = self._broadcast(decision)
        if decision == 2:
            raise RunMismatchError(message or f"{self.out}: rank 0 refused the run directory (see its error)")
        self.resuming = decision == 1
        return self.resuming

    def _remove_run_files(self, keep_step0: bool) -> list[str]:
        """Remove what a run writes here (never other files): everything, or all but the step-0 caches
        and the identity. Returns the names removed."""
        names = [CHECKPOINT_DIR, FINAL_DIR, METRICS, TIMING, LIVE_DIR]
        if not keep_step0:
            names += [*STEP0_FILES, IDENTITY_FILE]
        removed = []
        for name in names:
            if (self.out / name).exists():
                removed.append(name)
            if name in (CHECKPOINT_DIR, FINAL_DIR):
                remove_directory(self.out / name)
            else:
                remove_path(self.out / name)
        self._remove_leftovers()
        return removed

    def _remove_leftovers(self) -> None:
        """Temporary files of interrupted atomic writes (save_fisher writes its own `.partial` first)."""
        for name in (*STEP0_FILES, IDENTITY_FILE, METRICS, TIMING):
            remove_path(self.out / (name + TMP_SUFFIX))
        for name in (FISHER + ".partial", FISHER + TMP_SUFFIX + ".partial"):
            remove_path(self.out / name)
        for name in (CHECKPOINT_DIR, FINAL_DIR):
            remove_path(self.out / (name + TMP_SUFFIX))

    def step0_value(self, name: str, load, compute, save):
        """The value cached as `out/name`: `load(path)` when it is readable and its digest is the one
        recorded when it was computed, else `compute()` (written with `save(path, value)` and its
        digest recorded). When the recomputed value differs from the recorded one while resuming, the
        checkpoint was trained with other values: the run restarts from step 0. Other ranks wait for
        rank 0 and load its file."""
        path = self.out / name
        if self.rank != 0:
            dist.barrier()
            return load(path)
        recorded = self.step0.get(name)
        value = None
        if path.is_file():
            try:
                value = load(path)
            except Exception as err:  # truncated or corrupt: several error types
                log.warning("%s is unreadable (%s: %s): computing it again", path, type(err).__name__, err)
            else:
                if recorded is not None and tensor_digest(value) != recorded:
                    log.warning("%s differs from the values recorded when it was computed: computing it again", path)
                    value = None
        if value is None:
            value = compute()
            digest = tensor_digest(value)
            if self.resuming and digest != recorded:
                log.warning("%s: the recomputed %s differ from those the checkpoint was trained with: restarting "
                            "from step 0", self.out, name)
                self.restart = True
            save(path, value)
            self.step0[name] = digest
            write_run_identity(self.out, self.identity, self.step0)
        elif recorded is None:
            self.step0[name] = tensor_digest(value)
            write_run_identity(self.out, self.identity, self.step0)
        if self.world > 1:
            dist.barrier()
        return value

    def read_state(self, needs_valuation_at) -> dict | None:
        """The checkpoint's state when resuming, or None to start from step 0 (no checkpoint, or one
        that cannot be used: unreadable, without the valuer's G and P its step needs, or trained with
        other step-0 values). `needs_valuation_at(step) -> bool`: whether that step needs the saved
        G and P."""
        state, problem = None, ""
        if self.resuming and not self.restart:
            try:
                state = read_checkpoint(self.checkpoint_dir)
                if needs_valuation_at is not None and needs_valuation_at(int(state["step"])) and not state["extra"].get("valuation"):
                    raise CheckpointError(f"{self.checkpoint_dir}: step {state['step']} needs the validation gradient "
                                          "of an earlier step, which the checkpoint does not hold")
            except CheckpointError as err:
                state, problem = None, str(err)
        usable = torch.tensor([1 if (state is not None or not self.resuming) else 0], dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if self.resuming and (state is None or not usable.item()):
            if problem:
                log.warning("%s: restarting from step 0", problem)
            state = None
            if self.rank == 0:
                remove_directory(self.checkpoint_dir)
            if self.world > 1:
                dist.barrier()
        return state

    def finish(self) -> None:
        """After the final model and metrics are written: the resumable checkpoint (and any leftover of
        an interrupted write) is no longer needed."""
        remove_directory(self.checkpoint_dir)
        self._remove_leftovers()


def _config_digest(model) -> str:
    """SHA-256 of the model's architecture config (without its path, library version and cache flag)."""
    config = getattr(model, "config", None)
    values = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    values = {k: v for k, v in values.items() if k not in ("_name_or_path", "transformers_version", "use_cache")}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(prefix: str, values: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in values.items()}


def _run_identity(objective: str, config: TrainConfig, policy, vcfg, model, features: list, val_batch: dict | None, pad_id: int,
                  world: int, device, fisher, reference, reference_model, reference_logps, fisher_prompts,
                  uses_reference_losses: bool, token_rewards=None) -> dict:
    """Everything that changes the result of the run, as JSON values: the TrainConfig fields except
    RESULT_NEUTRAL_FIELDS (the valuation config and `val_refresh_every` only for the policies that score
    tokens, `dpo_beta` only for DPO), the step-0 weights (`weights_fingerprint`) and architecture, the
    encoded training data and validation batch (SHA-256), the Fisher, reference weights, reference
    model or reference log-prob file given (those the policy uses), the Fisher hold-out, world size,
    device type and the versions of alphatoken, torch and transformers. `model` must hold the step-0
    weights."""
    import transformers

    from alphatoken.models import weights_fingerprint

    settings = config.to_dict()
    for name in RESULT_NEUTRAL_FIELDS:
        settings.pop(name)
    settings.pop("valuation")
    if not policy.needs_scores:
        settings.pop("val_refresh_every")
    if objective != "dpo":
        settings.pop("dpo_beta")
    policy_settings = settings.pop("policy")
    identity = {"objective": objective, **settings, **_flatten("policy.", policy_settings)}
    if vcfg is not None:
        identity.update(_flatten("valuation.", dataclasses.asdict(vcfg)))
    hold_out = None
    if fisher_prompts is not None:
        hold_out = hashlib.sha256(json.dumps({"prompts": fisher_prompts.prompts, "responses": fisher_prompts.responses,
                                              "config": dataclasses.asdict(fisher_prompts.config)},
                                             sort_keys=True, default=str).encode()).hexdigest()
    identity.update({
        "world_size": world,
        "device": torch.device(device).type,
        "model.weights_fingerprint": weights_fingerprint(model),
        "model.config_sha256": _config_digest(model),
        "model.attn_implementation": str(getattr(getattr(model, "config", None), "_attn_implementation", "") or ""),
        "data.train_sha256": features_sha256(features, objective == "dpo"),
        "data.val_sha256": batch_sha256(val_batch) if val_batch is not None else None,
        "data.pad_token_id": pad_id,
        "fisher": tensor_digest(fisher) if fisher is not None and policy.needs_scores else None,  # unused otherwise
        "fisher_prompts": hold_out,
        "reference": tensor_digest(reference) if reference is not None and policy.needs_scores else None,
        "reference_model": (weights_fingerprint(reference_model)
                            if reference_model is not None and ((uses_reference_losses and reference_logps is None)
                                                                or policy.dpo_form == "tdpo") else None),
        "reference_logps": file_sha256(reference_logps) if uses_reference_losses and reference_logps is not None else None,
        "version.alphatoken": __version__,
        "version.torch": torch.__version__,
        "version.transformers": transformers.__version__,
    })
    if token_rewards is not None:  # only then: the identities of the other runs stay as they were
        identity["token_rewards"] = file_sha256(token_rewards)
    return json.loads(json.dumps(identity, default=str))  # tuples -> lists, as read back from the file


def _valuer_state(valuer) -> dict:
    """The valuer's directions as of its last `set_validation` (G per scored weight, and P), on CPU:
    what a resumed run needs when its first step falls inside a refresh period."""
    def cpu(t):
        return t.detach().cpu() if t is not None else None

    target = {name: {"form": d.form, "matrix": cpu(d.matrix), "val_x": cpu(d.val_x), "val_e": cpu(d.val_e)}
              for name, d in (valuer._target or {}).items()}
    proxy = {name: cpu(p) for name, p in valuer._proxy.items()} if valuer._proxy is not None else None
    return {"target": target, "proxy": proxy}


def _restore_valuer_state(valuer, state: dict, device) -> None:
    """Inverse of `_valuer_state`: the saved G and P, bit for bit, on `device`."""
    from alphatoken.valuation.valuer import TargetDirection

    def dev(t):
        return t.to(device) if t is not None else None

    valuer._target = {name: TargetDirection(d["form"], dev(d["matrix"]), dev(d["val_x"]), dev(d["val_e"]))
                      for name, d in state["target"].items()}
    valuer._proxy = {name: dev(p) for name, p in state["proxy"].items()} if state["proxy"] is not None else None


def _log_live_row(live, row: dict) -> None:
    """One history row as dvclive metrics at step `row["step"] - 1` (finite values only)."""
    live.step = row["step"] - 1
    for key, value in row.items():
        if key not in ("step", "skipped") and math.isfinite(value):
            live.log_metric(f"train/{key}", value)


def _optimizer(model, config: TrainConfig):
    """AdamW (or SGD, `config.optimizer`); no weight decay on 1-D parameters (biases, norms), as is
    customary for transformers."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.sgd_momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas, eps=config.adam_eps)


def _freeze_unscored(model, config: TrainConfig, policy) -> None:
    """`trainable: scored`: only the scored weights (nn.Linear weights of the last valuation.last_k
    blocks) keep requires_grad; every other parameter is frozen."""
    if config.trainable != "scored":
        return
    if policy.adapter == "lora":
        raise ValueError(f"trainable='scored' trains the scored full weights; policy {policy.name!r} trains LoRA "
                         "adapters instead: use trainable='all'")
    from alphatoken.valuation import ValuationConfig

    last_k = (config.valuation or ValuationConfig()).last_k
    scored = set(scored_linears(model, last_k))
    for name, p in model.named_parameters():
        p.requires_grad_(name in scored)


def _probe_features(tokenizer, data, max_length: int, what: str) -> list[dict]:
    """Encoded examples of a realisation probe set (a list of examples, or a ready batch dict)."""
    if isinstance(data, dict):  # a padded batch: its rows, without the padding
        lengths = data["attention_mask"].sum(dim=1).tolist()
        return [{"input_ids": data["input_ids"][i, :n].tolist(), "labels": data["labels"][i, :n].tolist()}
                for i, n in enumerate(lengths)]
    if not data:
        raise ValueError(f"realisation_every is set but the {what} probe set is empty")
    features, _ = encode_dataset(tokenizer, data, max_length, False)
    return features


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


def _anchor_log_ratios(model, ref_net, batch: dict, b: int, pcfg, max_length: int, pad_id: int, generator: torch.Generator,
                       stop_ids: list[int], autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """TI-DPO's anchors for the b pairs of a micro-batch: one response per prompt sampled from the current
    policy (`sample_anchor`, rows in order from one seeded generator, at most
    min(tidpo_anchor_max_new_tokens, max_length - prompt) tokens), then its per-token log-ratio
    `log pi - log pi_ref` (graph through the policy). Returns `(b, T_a - 1)` ratios and loss positions."""
    labels = batch["labels"]
    anchors = []
    for row in range(b):  # the chosen rows hold the prompts
        response = (labels[row] != IGNORE_INDEX).nonzero()
        start = int(response[0]) if response.numel() else int(batch["attention_mask"][row].sum())
        prompt = batch["input_ids"][row, :start].tolist()
        budget = min(pcfg.tidpo_anchor_max_new_tokens, max_length - len(prompt))
        sampled = sample_anchor(model, prompt, budget, generator, pcfg.tidpo_anchor_temperature, pcfg.tidpo_anchor_top_k,
                                pcfg.tidpo_anchor_top_p, stop_ids) if budget > 0 else []
        anchors.append({"input_ids": prompt + sampled, "labels": [IGNORE_INDEX] * len(prompt) + sampled})
    anchor = _to(collate(anchors, pad_id), batch["input_ids"].device)
    with autocast:
        logits = model(input_ids=anchor["input_ids"], attention_mask=anchor["attention_mask"]).logits  # (b, T_a, V)
        with torch.no_grad():
            ref_logits = ref_net(input_ids=anchor["input_ids"], attention_mask=anchor["attention_mask"]).logits
    policy_loss = token_nll(logits, anchor["labels"])  # (b, T_a - 1)
    ratio = token_nll(ref_logits, anchor["labels"]).to(policy_loss.dtype) - policy_loss
    return ratio, loss_positions(anchor["labels"])


def _tidpo_loss_sum(model, ref_net, batch: dict, logits: torch.Tensor, token_loss: torch.Tensor, weights: list, pcfg,
                    config: TrainConfig, pad_id: int, generator: torch.Generator, stop_ids: list[int], autocast) -> torch.Tensor:
    """TI-DPO's loss of one micro-batch of b pairs, summed over them (the loop divides by the step's
    pairs): TDPO2 on the weighted log-ratios against the reference model `ref_net` (`tdpo_pair_losses`;
    the per-position KL from its full next-token distributions) plus tidpo_gamma times the triplet
    term with a sampled anchor (`triplet_losses`)."""
    b = batch["input_ids"].shape[0] // 2
    labels = batch["labels"]
    with torch.no_grad(), autocast:
        ref_logits = ref_net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2b, T, V)
    ratio = token_nll(ref_logits, labels).to(token_loss.dtype) - token_loss  # (2b, T-1) log pi - log pi_ref, graph
    kl = position_kl(logits, ref_logits, labels).to(token_loss.dtype)  # (2b, T-1)
    pair = tdpo_pair_losses(ratio[:b], ratio[b:], weights[0], weights[1], kl[:b], kl[b:], config.dpo_beta, pcfg.tidpo_alpha)  # (b,)
    if pcfg.tidpo_gamma > 0:
        valid = loss_positions(labels)  # (2b, T-1)
        anchor_ratio, anchor_valid = _anchor_log_ratios(model, ref_net, batch, b, pcfg, config.max_length, pad_id, generator,
                                                        stop_ids, autocast)
        pair = pair + pcfg.tidpo_gamma * triplet_losses(anchor_ratio, anchor_valid, ratio[:b], valid[:b], ratio[b:], valid[b:],
                                                        pcfg.tidpo_triplet_margin)
    return pair.sum()


def train_sft(model, tokenizer, train_examples, val_batch, config: TrainConfig, fisher=None, reference=None, reference_model=None, out_dir=None,
              reference_logps=None, fisher_prompts=None, realisation_data=None) -> TrainResult:
    """Token-masked SFT (Alpha-SFT, Eq. 13) with the configured policy; `full` is standard SFT
    (the warm-start). `val_batch`: a batch dict or a list of examples (only used by policies that need
    token values). `fisher` / `reference`: Fisher (diagonal, or Kronecker factors; `alphatoken.fisher`)
    and reference weights for the retention proxy (tensor name -> tensor); with a Fisher and no
    reference, the weights at step 0 are the reference.
    `reference_model`: the model whose per-token losses reference-based policies (STM, Token Cleaning,
    Rho-1) compare against; default the model itself before training. `reference_logps`: a file of
    those losses (`alphatoken.train.reference`), loaded instead of computing them.
    `fisher_prompts` (an `alphatoken.fisher.FisherPrompts`, instead of `fisher`): the Fisher of the
    scored parameters is computed at step 0 and cached in the output dir. LoRA scoring policies
    (`alphatoken_lora`) score the adapter factors, whose Fisher and reference exist only once the
    adapters are initialised, so they take `fisher_prompts` (or a `fisher` keyed by the factors'
    parameter names of the wrapped model). `realisation_data` (target examples never trained on and
    never in G): with `config.realisation_every`, the value-realisation record of every such step
    (`alphatoken.train.realisation`) is added to the step's history row."""
    return _train("sft", model, tokenizer, train_examples, val_batch, config, fisher, reference, reference_model, out_dir,
                  reference_logps, fisher_prompts, realisation_data)


def train_dpo(model, tokenizer, train_pairs, val_pairs, config: TrainConfig, fisher=None, reference=None, reference_model=None, out_dir=None,
              reference_logps=None, fisher_prompts=None, token_rewards=None) -> TrainResult:
    """Token-masked DPO (Alpha-DPO, Eq. 14; plain DPO with `full`; ConfPO's masked logit with
    `confpo`). The DPO reference model is `reference_model`, default the model itself before training
    (the warm-start checkpoint). Its per-token log-probs of the pairs (and the validation pairs'
    sequence log-probs) come from `reference_logps`, a file written by
    `alphatoken.train.reference.save_reference_logps` for this model, data, max_length and
    micro_batch_size (checked; the pipeline's ref_logps stage), or else are computed here before the
    first update and cached in the output dir (`reference_losses.pt`) for resuming; both give the same
    values bit for bit. `fisher`, `reference`, `fisher_prompts` as in `train_sft`. TI-DPO (`tidpo`) keeps
    the reference model in memory (a frozen copy of `model` before any update when `reference_model` is
    None) for its per-position KL and its anchors' log-ratios. `token_rewards`: a file of per-token
    rewards of `train_pairs` (`alphatoken.train.token_rewards`), which SePO (`sepo`) selects by."""
    return _train("dpo", model, tokenizer, train_pairs, val_pairs, config, fisher, reference, reference_model, out_dir,
                  reference_logps, fisher_prompts, token_rewards=token_rewards)


def _train(objective, model, tokenizer, examples, val_data, config: TrainConfig, fisher, reference, reference_model, out_dir,
           reference_logps=None, fisher_prompts=None, realisation_data=None, token_rewards=None) -> TrainResult:
    preference = objective == "dpo"
    if config.realisation_every and preference:
        raise ValueError("realisation_every: the value-realisation record is defined for SFT (mean token loss probes); "
                         "set it to 0 for DPO")
    if config.realisation_every and realisation_data is None:
        raise ValueError("realisation_every is set: pass realisation_data (held-out target examples, never trained on)")
    out = Path(out_dir or config.output_dir)
    rank, world = _dist_info()
    policy, pcfg = get_policy(config.policy.name), config.policy
    if policy.dpo_form != "alpha" and not preference:
        raise ValueError(f"policy {policy.name!r} is a preference-optimisation policy; use train_dpo")
    if policy.needs_token_rewards and token_rewards is None:
        raise ValueError(f"policy {policy.name!r} selects tokens by per-token rewards: pass token_rewards (a file of "
                         "alphatoken.train.token_rewards.save_token_rewards; the pipeline's sepo_scores rule)")
    if token_rewards is not None and not policy.needs_token_rewards:
        raise ValueError(f"token_rewards: policy {policy.name!r} does not use per-token rewards")
    if policy.sft_only and preference:
        raise ValueError(f"policy {policy.name!r} is an SFT method; use train_sft")
    device = next(model.parameters()).device
    seed_everything(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / CHECKPOINT_DIR

    # ---- data
    features, stats = encode_dataset(tokenizer, examples, config.max_length, preference)
    pad_id = pad_token_id(tokenizer)
    global_batch = config.micro_batch_size * config.grad_accum_steps * world
    steps_per_epoch = len(features) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(features)} usable training examples ({stats.as_dict()}) are fewer than one global batch of {global_batch}")
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    needs_scores = policy.needs_scores
    val_batch = as_batch(tokenizer, val_data, config.max_length, preference) if needs_scores else None
    uses_reference_losses = preference or policy.needs_reference_loss
    vcfg = None
    if needs_scores:
        from alphatoken.valuation import ValuationConfig

        vcfg = dataclasses.replace(config.valuation or ValuationConfig(), **policy.valuation_overrides)

    # ---- the run directory: resume a checkpoint of this very run, refuse one of another, or start over
    identity = None
    if rank == 0:  # `model` still holds the step-0 weights
        identity = _run_identity(objective, config, policy, vcfg, model, features, val_batch, pad_id, world, device, fisher,
                                 reference, reference_model, reference_logps, fisher_prompts, uses_reference_losses,
                                 token_rewards)
    run = _RunDirectory(out, identity, rank, world, device)
    run.open()

    # ---- reference per-token losses: from the given file (checked against the reference model and
    # the data), or computed once here (before any update) and cached on disk
    ref_losses, ref_val = None, None
    if uses_reference_losses and reference_logps is not None:
        ref_model = reference_model if reference_model is not None else model  # the weights before any update
        loaded = load_reference_logps(reference_logps, ref_model, features, val_batch if preference else None,
                                      config.max_length, config.micro_batch_size, preference)
        ref_losses, ref_val = loaded.train, loaded.val
    elif uses_reference_losses:
        ref_model = reference_model if reference_model is not None else model

        def load_losses(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if len(saved["train"]) != len(features):
                raise ValueError(f"cached for {len(saved['train'])} examples, the data has {len(features)}")
            return saved

        def compute_losses():
            train = reference_token_losses(ref_model, features, pad_id, device, config.micro_batch_size, preference, "reference losses")
            val = reference_sequence_logps(ref_model, val_batch, device) if preference and val_batch is not None else None  # (2Bv,)
            return {"train": train, "val": val}

        saved = run.step0_value(REFERENCE_LOSSES, load_losses, compute_losses, lambda path, value: atomic_torch_save(value, path))
        ref_losses, ref_val = saved["train"], saved.get("val")

    # ---- TI-DPO: the frozen reference model in memory (full next-token distributions for the KL term)
    ref_net, stop_ids = None, []
    if policy.dpo_form == "tdpo":
        from alphatoken.fisher import stop_token_ids

        ref_net = reference_model if reference_model is not None else copy.deepcopy(model)  # step-0 weights
        ref_net.eval().requires_grad_(False)
        stop_ids = stop_token_ids(model, tokenizer)

    # ---- the policy's own step-0 values (FLOW's weights, XTF's masks): once, from the reference model;
    # SePO's token rewards: from the given file, checked against the data
    policy_values = None
    if policy.needs_token_rewards:
        policy_values = load_token_rewards(token_rewards, features)
    if policy.precompute is not None:
        inputs = StepZeroInputs(reference_model if reference_model is not None else model, tokenizer, features, ref_losses,
                                pad_id, device, config.micro_batch_size)

        def load_values(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if len(saved) != len(features):
                raise ValueError(f"cached for {len(saved)} examples, the data has {len(features)}")
            return saved

        policy_values = run.step0_value(POLICY_VALUES, load_values,
                                        lambda: [v.detach().cpu() for v in policy.precompute(inputs, pcfg)],
                                        lambda path, value: atomic_torch_save(value, path))

    # ---- LoRA adapters, before the valuer: a LoRA scoring policy scores the factors
    if policy.adapter == "lora":
        model = _wrap_lora(model, pcfg)

    # ---- valuer (policies that need token values)
    valuer = None
    if fisher_prompts is not None and not needs_scores:
        raise ValueError(f"fisher_prompts: policy {policy.name!r} does not score tokens, so it uses no Fisher")
    if needs_scores:
        from alphatoken.valuation import TokenValuer

        if fisher_prompts is not None:
            if fisher is not None:
                raise ValueError("pass either `fisher` or `fisher_prompts` (to compute it at step 0), not both")
            fisher = _step0_fisher(model, tokenizer, fisher_prompts, vcfg.last_k, run, device, config.progress)
        if fisher is not None and reference is None:
            params = dict(model.named_parameters())
            reference = run.step0_value(
                REFERENCE_WEIGHTS,
                load=lambda path: torch.load(path, map_location=device, weights_only=True),
                compute=lambda: {name: params[name].detach().clone() for name in scored_linears(model, vcfg.last_k)},
                save=lambda path, value: atomic_torch_save({k: v.cpu() for k, v in value.items()}, path),
            )
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
    _freeze_unscored(model, config, policy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(model, config)
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, total_steps, config.lr_schedule))

    # ---- resume: the checkpoint's state, including G and P when its step falls inside a refresh period
    refresh = config.val_refresh_every
    start_step, counters, history = 0, {"nonfinite_steps": 0, "all_masked_steps": 0, "consecutive_nonfinite": 0}, []
    restored_valuation = False
    state = run.read_state((lambda step: step % refresh != 0) if valuer is not None else None)
    if state is not None:
        start_step, extra = apply_checkpoint(state, model, optimizer, scheduler)
        counters, history = extra["counters"], extra["history"]
        if valuer is not None and extra.get("valuation"):
            _restore_valuer_state(valuer, extra["valuation"], device)
            restored_valuation = True
        del state
        log.info("%s: resuming from the checkpoint of step %d", out, start_step)
    if world > 1:
        dist.barrier()

    live = None
    if rank == 0:
        from dvclive import Live

        live_dir = out / LIVE_DIR
        # a fresh dvclive directory with the checkpoint's rows replayed: equal, row for row, to the
        # rows of an uninterrupted run (no duplicates of steps logged after the checkpoint)
        live = Live(str(live_dir), save_dvc_exp=False, resume=False, dvcyaml=str(live_dir / "dvc.yaml"))
        live.log_params({"objective": objective, "policy": policy.name, "rho": pcfg.rho, "seed": config.seed, "world_size": world})
        logged = [row for row in history if row["step"] % config.log_every == 0]
        for row in logged:
            _log_live_row(live, row)
        if logged:
            live.next_step()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (config.bf16 and device.type == "cuda") else contextlib.nullcontext()
    realisation = None
    if config.realisation_every and rank == 0:  # replicated weights: rank 0 records for all
        from alphatoken.train.realisation import ValueRealisation
        from alphatoken.valuation import ValuationConfig

        scored_names = set(scored_linears(model, (vcfg or config.valuation or ValuationConfig()).last_k))
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # the order of `trainable`
        probes = {"val": _probe_features(tokenizer, val_data, config.max_length, "validation"),
                  "heldout": _probe_features(tokenizer, realisation_data, config.max_length, "held-out")}
        realisation = ValueRealisation(probes, [p for _, p in named], [name in scored_names for name, _ in named],
                                       pad_id, device, chunk=config.micro_batch_size, autocast=autocast)
    step_seconds = []  # per optimizer step of this process, without the realisation probes
    step_cpu_seconds = []  # the same steps' CPU time of this process (all its threads)
    bar = tqdm(total=total_steps, initial=start_step, desc=f"{objective}:{policy.name}", disable=not (config.progress and rank == 0))
    orders: dict[int, list[int]] = {}
    preempted = False

    def checkpoint(step_done: int):
        if rank == 0:
            extra = {"counters": counters, "history": history}
            if valuer is not None and step_done % refresh != 0:  # the resumed step reuses this G and P
                extra["valuation"] = _valuer_state(valuer)
            save_checkpoint(ckpt_dir, model, optimizer, scheduler, step_done, extra)
        if world > 1:
            dist.barrier()

    # ssToken: the last block's attention of every training forward (open across the backward, so that
    # gradient checkpointing recomputes that block with the same kernel)
    attention_capture = AttentionCapture(model, last_k=1) if policy.needs_attention else None
    with PreemptionFlag() as flag, (attention_capture or contextlib.nullcontext()):
        for step in range(start_step, total_steps):
            t0, c0 = time.perf_counter(), time.process_time()
            epoch, position = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: _epoch_order(len(features), config.seed, epoch)}
            step_indices = orders[epoch][position * global_batch : (position + 1) * global_batch]
            mb = config.micro_batch_size
            chunks = [step_indices[j * mb : (j + 1) * mb] for j in range(config.grad_accum_steps * world)]
            rho = pcfg.rho_at(step / max(1, total_steps - 1))
            if valuer is not None and (step % refresh == 0 or (step == start_step and not restored_valuation)):
                valuer.set_validation(val_batch, objective=val_objective)
            probe_state, probe_seconds, probe_cpu = None, 0.0, 0.0
            if realisation is not None and (step + 1) % config.realisation_every == 0:  # every n-th step
                t_probe, c_probe = time.perf_counter(), time.process_time()
                probe_state = realisation.before(model)
                probe_seconds += time.perf_counter() - t_probe
                probe_cpu += time.process_time() - c_probe

            optimizer.zero_grad(set_to_none=True)
            # (sum w*l, K, n valid, sum l, n tokens, non-finite, dpo loss sum, correct pairs, pairs)
            acc = torch.zeros(10, dtype=torch.float64)  # ..., [9] the SFT normaliser K (Policy.normalizer_share)
            for micro_index in range(rank, len(chunks), world):
                chunk = chunks[micro_index]
                if preference:
                    batch = _to(collate_pairs([features[i] for i in chunk], pad_id), device)
                else:
                    batch = _to(collate([features[i] for i in chunk], pad_id), device)
                importance = None
                if policy.needs_importance:  # TI-DPO: on this step's weights, before the training forward
                    with autocast:
                        importance = embedding_importance(model, batch["input_ids"], batch["attention_mask"])  # (2b, T)
                capture = valuer.capture(share_head=True) if valuer is not None else contextlib.nullcontext()
                if attention_capture is not None:
                    attention_capture.reset()
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
                    values = None
                    if policy_values is not None:  # SePO's token rewards, per branch
                        values = _pad_rows([policy_values[i]["chosen"] for i in chunk] + [policy_values[i]["rejected"] for i in chunk], width, token_loss)  # (2b, T-1)
                    weights = []
                    for branch, rows in enumerate((slice(0, b), slice(b, 2 * b))):  # separate top-rho per branch
                        branch_scores = scores_to_loss_positions(scores, rows) if scores is not None else None
                        ctx = TokenContext(valid[rows], token_loss[rows].detach(), rho, branch_scores, ref[rows], _policy_generator(config.seed, step, micro_index, branch),
                                           precomputed=values[rows] if values is not None else None,
                                           importance=importance[rows, 1:] if importance is not None else None, branch=branch)
                        weights.append(policy.weights(ctx, pcfg))
                    if policy.dpo_form == "masked_logit":
                        loss_sum = masked_dpo_loss(token_loss[:b], token_loss[b:], ref[:b], ref[b:], weights[0], weights[1], config.dpo_beta, normalizer=1.0)
                    elif policy.dpo_form == "tdpo":
                        loss_sum = _tidpo_loss_sum(model, ref_net, batch, logits, token_loss, weights, pcfg, config, pad_id,
                                                   _policy_generator(config.seed, step, micro_index, 2), stop_ids, autocast)
                    elif policy.dpo_form == "selective_mean":
                        loss_sum = selective_mean_losses(token_loss[:b], token_loss[b:], weights[0], weights[1]).sum()
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
                    values = _pad_rows([policy_values[i] for i in chunk], width, token_loss) if policy_values is not None else None
                    attention = attention_capture.values[0] if attention_capture is not None else None  # (B, T, T)
                    first = position * global_batch + micro_index * mb  # epoch position of the chunk's first example
                    ctx = TokenContext(valid, token_loss.detach(), rho, scores, ref, _policy_generator(config.seed, step, micro_index, 0),
                                       precomputed=values, attention=attention,
                                       epoch_position=torch.arange(first, first + len(chunk), device=valid.device))
                    w = policy.weights(ctx, pcfg)  # (B, T-1) detached
                    loss_sum = (w * token_loss).sum()  # unnormalised; divided by the step's K below
                    kept = w.sum()
                    acc[9] += float(policy.normalizer_share(w, valid, pcfg))
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
            normaliser = acc[8].item() if preference else acc[9].item()
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
                    step_lr = optimizer.param_groups[0]["lr"]
                    step_grads = [p.grad.detach().clone() for p in trainable] if probe_state is not None else None
                    optimizer.step()
                    if probe_state is not None:
                        t_probe, c_probe = time.perf_counter(), time.process_time()
                        realised = realisation.after(model, probe_state, step_grads, step_lr)
                        probe_seconds += time.perf_counter() - t_probe
                        probe_cpu += time.process_time() - c_probe
                        del step_grads
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

            elapsed = time.perf_counter() - t0 - probe_seconds
            step_seconds.append(elapsed)
            step_cpu_seconds.append(time.process_time() - c0 - probe_cpu)
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
            if probe_state is not None and skipped is None:
                row.update(realised)
            history.append(row)
            if live is not None and (step + 1) % config.log_every == 0:
                _log_live_row(live, row)
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
        return TrainResult(model, summary["steps"], True, None, summary, start_step)

    if policy.adapter == "lora":
        model = model.merge_and_unload()
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if broken:  # never a final checkpoint (and exit status 0) with non-finite weights
        if live is not None:
            live.end()
        raise FloatingPointError(
            f"after {total_steps} steps {len(broken)} parameter tensors hold non-finite values (first: {broken[0]}); "
            f"no final checkpoint is written to {out / FINAL_DIR}. Lower the learning rate (lr={config.lr}) or "
            "set max_grad_norm, then delete the run directory to start over")
    final_dir = None
    if rank == 0:
        from alphatoken.models import save_pretrained

        def write_final(tmp: Path):
            save_pretrained(model, tokenizer, tmp)
            (tmp / "train_config.json").write_text(json.dumps({"objective": objective, **config.to_dict()}, indent=2, default=str))

        final_dir = write_directory(out / FINAL_DIR, write_final)
        atomic_write_text(out / METRICS, json.dumps(summary, indent=2))
        atomic_write_text(out / TIMING, json.dumps({
            "mean_step_seconds": sum(step_seconds) / max(1, len(step_seconds)), "steps_timed": len(step_seconds),
            "step_seconds": step_seconds,  # each timed step in order (a benchmark drops the first ones as warm-up)
            "step_cpu_seconds": step_cpu_seconds,  # their CPU time: less sensitive than wall time to other jobs
            "device": device.type,
            "threads": torch.get_num_threads(), "world_size": world,
            "note": "wall-clock seconds per optimizer step of this process (a resumed run times only its own steps; "
                    "the value-realisation probes are excluded)"}, indent=2))
        live.end()
        run.finish()  # the checkpoint is removed only once final/ and metrics.json are complete
    if world > 1:
        dist.barrier()
    return TrainResult(model, total_steps, False, final_dir or out / FINAL_DIR, summary, start_step)
