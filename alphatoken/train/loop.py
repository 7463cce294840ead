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

The code reads as a recipe: `_setup` builds a `_Run` (data, run directory, step-0 values, LoRA,
valuer, optimizer, resume, dvclive, probes), then `_train_step` per optimizer step: `_sft_micro_step`
or `_dpo_micro_step` per micro-batch, adding to the step's `StepStats`; `_reduce_and_update`;
`_log_step`; `_end_step` (stop or checkpoint); and `_finish` writes the final model and metrics.
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
from alphatoken.policies import Policy, StepZeroInputs, TokenContext, get_policy, scores_to_loss_positions
from alphatoken.policy_inputs import AttentionCapture, embedding_importance, sample_anchor
from alphatoken.train.config import TrainConfig
from alphatoken.train.batches import EncodeStats, as_batch, collate, collate_pairs, encode_dataset, pad_token_id
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


@dataclass
class StepStats:
    """What one optimizer step measured: python floats summed over its micro-batches in order (float64
    sums), then over the processes by `all_reduce` (one float64 tensor holding the fields)."""

    loss_sum: float = 0.0  # the unnormalised loss: sum_p w_p l_p (SFT), or the DPO surrogate summed over pairs
    kept: float = 0.0  # sum of the policy's weights (the kept tokens)
    valid_tokens: float = 0.0  # response (loss) positions
    token_loss_sum: float = 0.0  # sum of the per-position NLL over the response positions
    tokens: float = 0.0  # non-padding tokens (attention mask) of the micro-batches
    nonfinite: float = 0.0  # micro-batches whose loss was not finite (the step is skipped)
    dpo_loss_sum: float = 0.0  # DPO: the plain DPO loss summed over the pairs
    correct_pairs: float = 0.0  # DPO: pairs whose implicit reward margin is positive
    pairs: float = 0.0  # DPO: pairs of the step, its normaliser K
    sft_normaliser: float = 0.0  # SFT: the step's normaliser K (sum of Policy.normalizer_share)

    def add_micro_batch(self, loss_sum: torch.Tensor, kept: torch.Tensor, valid: torch.Tensor, token_loss: torch.Tensor,
                        attention_mask: torch.Tensor) -> None:
        """The sums every micro-batch adds, once its backward is done."""
        self.loss_sum += float(loss_sum.detach())
        self.kept += float(kept)
        self.valid_tokens += float(valid.sum())
        self.token_loss_sum += float((token_loss.detach() * valid).sum())
        self.tokens += float(attention_mask.sum())

    def all_reduce(self, world: int) -> None:
        """Every field summed over the processes, in one all-reduce of one float64 tensor."""
        names = [f.name for f in dataclasses.fields(self)]
        total = _all_reduce(torch.tensor([getattr(self, name) for name in names], dtype=torch.float64), world)
        for name, value in zip(names, total.tolist()):
            setattr(self, name, value)

    def normaliser(self, preference: bool) -> float:
        """The step's K: pairs (DPO) or the policy's normaliser (SFT)."""
        return self.pairs if preference else self.sft_normaliser


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where the process group reduces: NCCL takes CUDA tensors only (the current device), gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Sum `tensor` over the processes in place; a tensor on another device than the backend's (the step's
    statistics and the stop flag are built on the CPU) is reduced there and copied back."""
    if world > 1:
        device = _collective_device()
        if tensor.device == device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:
            moved = tensor.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved)
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


@dataclass
class _Run:
    """One training run: what the setup functions below build, in this order (`_start`, the run
    directory, the step-0 values, LoRA, the valuer, the optimizer, resume, dvclive, the probes), and
    what the step functions read and update."""

    objective: str  # "sft" or "dpo"
    config: TrainConfig
    policy: Policy
    tokenizer: object
    model: torch.nn.Module  # LoRA-wrapped once `policy.adapter == "lora"`
    rank: int
    world: int
    device: torch.device
    out: Path  # the run directory
    features: list  # the encoded training examples (pairs for DPO), in dataset order
    data_stats: EncodeStats  # how many examples were kept and skipped
    pad_id: int
    global_batch: int  # micro_batch_size * grad_accum_steps * world examples per optimizer step
    steps_per_epoch: int
    total_steps: int
    val_batch: dict | None  # the validation batch of G (policies that score tokens)
    vcfg: object | None  # the ValuationConfig with the policy's overrides (policies that score tokens)
    autocast: object  # bf16 autocast on CUDA, else a null context
    directory: _RunDirectory | None = None
    ref_losses: list | None = None  # per example: the reference model's per-position NLL (chosen/rejected for DPO)
    ref_val: torch.Tensor | None = None  # (2Bv,) DPO: the reference's sequence log-probs of the validation pairs
    ref_net: torch.nn.Module | None = None  # TI-DPO: the frozen reference model
    stop_ids: list = field(default_factory=list)  # TI-DPO: the tokens that end a sampled anchor
    policy_values: list | None = None  # the policy's step-0 values (FLOW, XTF) or SePO's token rewards, per example
    valuer: object | None = None  # TokenValuer (policies that score tokens)
    val_objective: object | None = None  # DPO: the valuer's validation objective (mean DPO loss)
    trainable: list = field(default_factory=list)  # parameters with requires_grad, in model order
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object | None = None
    start_step: int = 0  # the checkpoint's step when resuming
    counters: dict = field(default_factory=lambda: {"nonfinite_steps": 0, "all_masked_steps": 0, "consecutive_nonfinite": 0})
    history: list = field(default_factory=list)  # one row per optimizer step done (replayed from the checkpoint)
    restored_valuation: bool = False  # the checkpoint's G and P were restored into the valuer
    live: object | None = None  # dvclive on rank 0
    realisation: object | None = None  # ValueRealisation on rank 0 when `realisation_every` is set
    attention_capture: AttentionCapture | None = None  # ssToken: the last block's attention of each forward
    bar: object | None = None  # the progress bar
    orders: dict = field(default_factory=dict)  # epoch -> its data order (the current epoch only)
    step_seconds: list = field(default_factory=list)  # per optimizer step of this process, without the realisation probes
    step_cpu_seconds: list = field(default_factory=list)  # the same steps' CPU time of this process (all its threads)

    @property
    def preference(self) -> bool:
        return self.objective == "dpo"

    @property
    def uses_reference_losses(self) -> bool:
        return self.preference or self.policy.needs_reference_loss


def _start(objective, model, tokenizer, examples, val_data, config: TrainConfig, out_dir, realisation_data, token_rewards) -> _Run:
    """The arguments checked against each other, the seed set, the data encoded and the run sized."""
    preference = objective == "dpo"
    if config.realisation_every and preference:
        raise ValueError("realisation_every: the value-realisation record is defined for SFT (mean token loss probes); "
                         "set it to 0 for DPO")
    if config.realisation_every and realisation_data is None:
        raise ValueError("realisation_every is set: pass realisation_data (held-out target examples, never trained on)")
    out = Path(out_dir or config.output_dir)
    rank, world = _dist_info()
    policy = get_policy(config.policy.name)
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

    features, data_stats = encode_dataset(tokenizer, examples, config.max_length, preference)
    pad_id = pad_token_id(tokenizer)
    global_batch = config.micro_batch_size * config.grad_accum_steps * world
    steps_per_epoch = len(features) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{len(features)} usable training examples ({data_stats.as_dict()}) are fewer than one global batch "
                         f"of {global_batch}")
    val_batch = as_batch(tokenizer, val_data, config.max_length, preference) if policy.needs_scores else None
    vcfg = None
    if policy.needs_scores:
        from alphatoken.valuation import ValuationConfig

        vcfg = dataclasses.replace(config.valuation or ValuationConfig(), **policy.valuation_overrides)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (config.bf16 and device.type == "cuda") else contextlib.nullcontext()
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    return _Run(objective, config, policy, tokenizer, model, rank, world, device, out, features, data_stats, pad_id,
                global_batch, steps_per_epoch, total_steps, val_batch, vcfg, autocast)


def _open_directory(run: _Run, fisher, reference, reference_model, reference_logps, fisher_prompts, token_rewards) -> None:
    """The run directory: resume a checkpoint of this very run, refuse one of another, or start over
    (`run.model` still holds the step-0 weights its identity records)."""
    identity = None
    if run.rank == 0:
        identity = _run_identity(run.objective, run.config, run.policy, run.vcfg, run.model, run.features, run.val_batch,
                                 run.pad_id, run.world, run.device, fisher, reference, reference_model, reference_logps,
                                 fisher_prompts, run.uses_reference_losses, token_rewards)
    run.directory = _RunDirectory(run.out, identity, run.rank, run.world, run.device)
    run.directory.open()


def _setup_reference_losses(run: _Run, reference_model, reference_logps) -> None:
    """The reference per-token losses: from the given file (checked against the reference model and the
    data), or computed once here (before any update) and cached in the run directory."""
    if not run.uses_reference_losses:
        return
    config, features, preference = run.config, run.features, run.preference
    ref_model = reference_model if reference_model is not None else run.model  # the weights before any update
    if reference_logps is not None:
        loaded = load_reference_logps(reference_logps, ref_model, features, run.val_batch if preference else None,
                                      config.max_length, config.micro_batch_size, preference)
        run.ref_losses, run.ref_val = loaded.train, loaded.val
        return

    def load_losses(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if len(saved["train"]) != len(features):
            raise ValueError(f"cached for {len(saved['train'])} examples, the data has {len(features)}")
        return saved

    def compute_losses():
        train = reference_token_losses(ref_model, features, run.pad_id, run.device, config.micro_batch_size, preference,
                                       "reference losses")
        val = None
        if preference and run.val_batch is not None:
            val = reference_sequence_logps(ref_model, run.val_batch, run.device)  # (2Bv,)
        return {"train": train, "val": val}

    saved = run.directory.step0_value(REFERENCE_LOSSES, load_losses, compute_losses,
                                      lambda path, value: atomic_torch_save(value, path))
    run.ref_losses, run.ref_val = saved["train"], saved.get("val")


def _setup_tidpo_reference(run: _Run, reference_model) -> None:
    """TI-DPO: the frozen reference model in memory (full next-token distributions for the KL term)."""
    if run.policy.dpo_form != "tdpo":
        return
    from alphatoken.fisher import stop_token_ids

    run.ref_net = reference_model if reference_model is not None else copy.deepcopy(run.model)  # step-0 weights
    run.ref_net.eval().requires_grad_(False)
    run.stop_ids = stop_token_ids(run.model, run.tokenizer)


def _setup_policy_values(run: _Run, reference_model, token_rewards) -> None:
    """The policy's own step-0 values (FLOW's weights, XTF's masks): once, from the reference model,
    cached in the run directory; SePO's token rewards: from the given file, checked against the data."""
    policy, features = run.policy, run.features
    if policy.needs_token_rewards:
        run.policy_values = load_token_rewards(token_rewards, features)
    if policy.precompute is None:
        return
    inputs = StepZeroInputs(reference_model if reference_model is not None else run.model, run.tokenizer, features,
                            run.ref_losses, run.pad_id, run.device, run.config.micro_batch_size)

    def load_values(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if len(saved) != len(features):
            raise ValueError(f"cached for {len(saved)} examples, the data has {len(features)}")
        return saved

    run.policy_values = run.directory.step0_value(POLICY_VALUES, load_values,
                                                  lambda: [v.detach().cpu() for v in policy.precompute(inputs, run.config.policy)],
                                                  lambda path, value: atomic_torch_save(value, path))


def _setup_valuer(run: _Run, fisher, reference, fisher_prompts) -> None:
    """The valuer of the policies that score tokens, with the Fisher (given, or computed at step 0 from
    `fisher_prompts`) and the reference weights of the retention proxy (given, or the step-0 weights)."""
    if fisher_prompts is not None and not run.policy.needs_scores:
        raise ValueError(f"fisher_prompts: policy {run.policy.name!r} does not score tokens, so it uses no Fisher")
    if not run.policy.needs_scores:
        return
    from alphatoken.valuation import TokenValuer

    model, vcfg, device = run.model, run.vcfg, run.device
    if fisher_prompts is not None:
        if fisher is not None:
            raise ValueError("pass either `fisher` or `fisher_prompts` (to compute it at step 0), not both")
        fisher = _step0_fisher(model, run.tokenizer, fisher_prompts, vcfg.last_k, run.directory, device, run.config.progress)
    if fisher is not None and reference is None:
        params = dict(model.named_parameters())
        reference = run.directory.step0_value(
            REFERENCE_WEIGHTS,
            load=lambda path: torch.load(path, map_location=device, weights_only=True),
            compute=lambda: {name: params[name].detach().clone() for name in scored_linears(model, vcfg.last_k)},
            save=lambda path, value: atomic_torch_save({k: v.cpu() for k, v in value.items()}, path),
        )
    run.valuer = TokenValuer(model, vcfg, fisher=fisher, reference=reference)
    run.val_batch = _to(run.val_batch, device)
    run.val_objective = _dpo_objective(run.config.dpo_beta, run.ref_val) if run.preference else None


def _setup_optimizer(run: _Run) -> None:
    """Gradient checkpointing, the weights of rank 0 on every rank, the trainable parameters, the
    optimizer and the learning-rate schedule."""
    model, config = run.model, run.config
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    if run.world > 1:
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
    _freeze_unscored(model, config, run.policy)
    run.trainable = [p for p in model.parameters() if p.requires_grad]
    run.optimizer = _optimizer(model, config)
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * run.total_steps)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer,
                                                      lambda s: _lr_factor(s, warmup, run.total_steps, config.lr_schedule))


def _resume(run: _Run) -> None:
    """The checkpoint's state when resuming, including G and P when its step falls inside a refresh
    period."""
    refresh = run.config.val_refresh_every
    state = run.directory.read_state((lambda step: step % refresh != 0) if run.valuer is not None else None)
    if state is not None:
        run.start_step, extra = apply_checkpoint(state, run.model, run.optimizer, run.scheduler)
        run.counters, run.history = extra["counters"], extra["history"]
        if run.valuer is not None and extra.get("valuation"):
            _restore_valuer_state(run.valuer, extra["valuation"], run.device)
            run.restored_valuation = True
        log.info("%s: resuming from the checkpoint of step %d", run.out, run.start_step)
    if run.world > 1:
        dist.barrier()


def _open_live(run: _Run) -> None:
    """dvclive on rank 0: a fresh directory with the checkpoint's rows replayed, equal, row for row, to
    the rows of an uninterrupted run (no duplicates of steps logged after the checkpoint)."""
    if run.rank != 0:
        return
    from dvclive import Live

    live_dir = run.out / LIVE_DIR
    run.live = Live(str(live_dir), save_dvc_exp=False, resume=False, dvcyaml=str(live_dir / "dvc.yaml"))
    run.live.log_params({"objective": run.objective, "policy": run.policy.name, "rho": run.config.policy.rho,
                         "seed": run.config.seed, "world_size": run.world})
    logged = [row for row in run.history if row["step"] % run.config.log_every == 0]
    for row in logged:
        _log_live_row(run.live, row)
    if logged:
        run.live.next_step()


def _setup_realisation(run: _Run, val_data, realisation_data) -> None:
    """The value-realisation probes of every `realisation_every`-th step, on rank 0 (the weights are
    replicated: rank 0 records for all)."""
    config = run.config
    if not (config.realisation_every and run.rank == 0):
        return
    from alphatoken.train.realisation import ValueRealisation
    from alphatoken.valuation import ValuationConfig

    scored_names = set(scored_linears(run.model, (run.vcfg or config.valuation or ValuationConfig()).last_k))
    named = [(name, p) for name, p in run.model.named_parameters() if p.requires_grad]  # the order of `trainable`
    probes = {"val": _probe_features(run.tokenizer, val_data, config.max_length, "validation"),
              "heldout": _probe_features(run.tokenizer, realisation_data, config.max_length, "held-out")}
    run.realisation = ValueRealisation(probes, [p for _, p in named], [name in scored_names for name, _ in named],
                                       run.pad_id, run.device, chunk=config.micro_batch_size, autocast=run.autocast)


def _setup(objective, model, tokenizer, examples, val_data, config: TrainConfig, fisher, reference, reference_model, out_dir,
           reference_logps, fisher_prompts, realisation_data, token_rewards) -> _Run:
    """Every piece of the run before its first step, in the order that fixes the RNG draws."""
    run = _start(objective, model, tokenizer, examples, val_data, config, out_dir, realisation_data, token_rewards)
    _open_directory(run, fisher, reference, reference_model, reference_logps, fisher_prompts, token_rewards)
    _setup_reference_losses(run, reference_model, reference_logps)
    _setup_tidpo_reference(run, reference_model)
    _setup_policy_values(run, reference_model, token_rewards)
    if run.policy.adapter == "lora":  # before the valuer: a LoRA scoring policy scores the factors
        run.model = _wrap_lora(run.model, config.policy)
    _setup_valuer(run, fisher, reference, fisher_prompts)
    _setup_optimizer(run)
    _resume(run)
    _open_live(run)
    _setup_realisation(run, val_data, realisation_data)
    return run


def _train(objective, model, tokenizer, examples, val_data, config: TrainConfig, fisher, reference, reference_model, out_dir,
           reference_logps=None, fisher_prompts=None, realisation_data=None, token_rewards=None) -> TrainResult:
    """Setup, then one `_train_step` per optimizer step until the end or a preemption, then `_finish`."""
    run = _setup(objective, model, tokenizer, examples, val_data, config, fisher, reference, reference_model, out_dir,
                 reference_logps, fisher_prompts, realisation_data, token_rewards)
    run.bar = tqdm(total=run.total_steps, initial=run.start_step, desc=f"{objective}:{run.policy.name}",
                   disable=not (config.progress and run.rank == 0))
    # ssToken: the last block's attention of every training forward (open across the backward, so that
    # gradient checkpointing recomputes that block with the same kernel)
    run.attention_capture = AttentionCapture(run.model, last_k=1) if run.policy.needs_attention else None
    preempted = False
    with PreemptionFlag() as flag, (run.attention_capture or contextlib.nullcontext()):
        for step in range(run.start_step, run.total_steps):
            if _train_step(run, step, flag):
                preempted = True
                break
    run.bar.close()
    return _finish(run, preempted)


def _train_step(run: _Run, step: int, flag: PreemptionFlag) -> bool:
    """One optimizer step (the module docstring's steps 1-4), its history row and its checkpoint; True
    when the run is preempted (the checkpoint of this step is written)."""
    config = run.config
    t0, c0 = time.perf_counter(), time.process_time()
    epoch, position = divmod(step, run.steps_per_epoch)
    if epoch not in run.orders:
        run.orders = {epoch: _epoch_order(len(run.features), config.seed, epoch)}
    step_indices = run.orders[epoch][position * run.global_batch : (position + 1) * run.global_batch]
    mb = config.micro_batch_size
    chunks = [step_indices[j * mb : (j + 1) * mb] for j in range(config.grad_accum_steps * run.world)]
    rho = config.policy.rho_at(step / max(1, run.total_steps - 1))
    without_directions = step == run.start_step and not run.restored_valuation  # no G and P from a checkpoint
    if run.valuer is not None and (step % config.val_refresh_every == 0 or without_directions):
        run.valuer.set_validation(run.val_batch, objective=run.val_objective)
    probe_state, probe_seconds, probe_cpu = None, 0.0, 0.0
    if run.realisation is not None and (step + 1) % config.realisation_every == 0:  # every n-th step
        t_probe, c_probe = time.perf_counter(), time.process_time()
        probe_state = run.realisation.before(run.model)
        probe_seconds += time.perf_counter() - t_probe
        probe_cpu += time.process_time() - c_probe

    run.optimizer.zero_grad(set_to_none=True)
    stats = StepStats()
    micro_step = _dpo_micro_step if run.preference else _sft_micro_step
    for micro_index in range(run.rank, len(chunks), run.world):  # this process's micro-batches
        if not micro_step(run, stats, chunks[micro_index], micro_index, step, position, rho):
            break  # a non-finite loss: the step is skipped
    update = _reduce_and_update(run, stats, probe_state)
    probe_seconds += update.probe_seconds
    probe_cpu += update.probe_cpu_seconds
    _count_skipped(run.counters, update.skipped)
    elapsed = time.perf_counter() - t0 - probe_seconds
    run.step_seconds.append(elapsed)
    run.step_cpu_seconds.append(time.process_time() - c0 - probe_cpu)
    _log_step(run, step, stats, update, rho, elapsed)
    return _end_step(run, step, flag)


def _sft_micro_step(run: _Run, stats: StepStats, chunk: list[int], micro_index: int, step: int, position: int,
                    rho: float) -> bool:
    """One SFT micro-batch: forward (inside the valuer's capture when scoring), per-position NLL, token
    values, the policy's detached weights w, then backward of the unnormalised sum_p w_p l_p (Eq. 13;
    divided by the step's K after the reduce). False when the loss is not finite."""
    config, policy, valuer = run.config, run.policy, run.valuer
    batch = _to(collate([run.features[i] for i in chunk], run.pad_id), run.device)
    capture = valuer.capture(share_head=True) if valuer is not None else contextlib.nullcontext()
    if run.attention_capture is not None:
        run.attention_capture.reset()
    with run.autocast, capture:
        logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    token_loss = token_nll(logits, batch["labels"])  # (B, T-1), graph
    valid = loss_positions(batch["labels"])  # (B, T-1)
    width = token_loss.shape[1]
    if not torch.isfinite(token_loss).all():
        stats.nonfinite += 1
        return False
    scores = None
    if valuer is not None:
        scores = scores_to_loss_positions(valuer.score_captured(batch, token_loss, components=False))
    ref = values = None
    if run.ref_losses is not None:
        ref = _pad_rows([run.ref_losses[i] for i in chunk], width, token_loss)  # (B, T-1)
    if run.policy_values is not None:
        values = _pad_rows([run.policy_values[i] for i in chunk], width, token_loss)  # (B, T-1)
    attention = run.attention_capture.values[0] if run.attention_capture is not None else None  # (B, T, T)
    first = position * run.global_batch + micro_index * config.micro_batch_size  # epoch position of the first example
    ctx = TokenContext(valid, token_loss.detach(), rho, scores, ref, _policy_generator(config.seed, step, micro_index, 0),
                       precomputed=values, attention=attention,
                       epoch_position=torch.arange(first, first + len(chunk), device=valid.device))
    w = policy.weights(ctx, config.policy)  # (B, T-1) detached
    loss_sum = (w * token_loss).sum()  # unnormalised; divided by the step's K after the reduce
    kept = w.sum()
    stats.sft_normaliser += float(policy.normalizer_share(w, valid, config.policy))
    if not torch.isfinite(loss_sum):
        stats.nonfinite += 1
        return False
    if valuer is not None:  # the same gradients, without the head's input gradient a second time
        valuer.backward(loss_sum, token_loss)
    else:
        loss_sum.backward()
    stats.add_micro_batch(loss_sum, kept, valid, token_loss, batch["attention_mask"])
    return True


def _dpo_micro_step(run: _Run, stats: StepStats, chunk: list[int], micro_index: int, step: int, position: int,
                    rho: float) -> bool:
    """One DPO micro-batch of b pairs (rows: b chosen, then b rejected): forward, per-position NLL, the
    DPO logit against the reference losses and its weight omega_sg, token values scaled by +-omega, the
    policy's weights per branch, then backward of the policy's loss summed over the pairs (Alpha-DPO,
    Eq. 14, by default; divided by the step's pairs after the reduce). False when the loss is not finite."""
    config, valuer = run.config, run.valuer
    batch = _to(collate_pairs([run.features[i] for i in chunk], run.pad_id), run.device)
    importance = None
    if run.policy.needs_importance:  # TI-DPO: on this step's weights, before the training forward
        with run.autocast:
            importance = embedding_importance(run.model, batch["input_ids"], batch["attention_mask"])  # (2b, T)
    capture = valuer.capture(share_head=True) if valuer is not None else contextlib.nullcontext()
    with run.autocast, capture:
        logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2b, T, V)
    token_loss = token_nll(logits, batch["labels"])  # (2b, T-1), graph
    valid = loss_positions(batch["labels"])  # (2b, T-1)
    width = token_loss.shape[1]
    if not torch.isfinite(token_loss).all():
        stats.nonfinite += 1
        return False
    b = len(chunk)
    rows = [run.ref_losses[i]["chosen"] for i in chunk] + [run.ref_losses[i]["rejected"] for i in chunk]
    ref = _pad_rows(rows, width, token_loss)  # (2b, T-1)
    logps, ref_logps = -token_loss.sum(dim=1), -ref.sum(dim=1)  # (2b,)
    logit = dpo_logit(logps[:b], logps[b:], ref_logps[:b], ref_logps[b:], config.dpo_beta)  # (b,)
    omega = dpo_weight(logit, config.dpo_beta)  # (b,)
    scores = None
    if valuer is not None:
        scale = torch.cat([omega, -omega]).to(token_loss.dtype)  # (2b,) +omega chosen, -omega rejected
        scores = valuer.score_captured(batch, token_loss, example_scale=scale, components=False)  # label-aligned (2b, T)
    values = None
    if run.policy_values is not None:  # SePO's token rewards, per branch
        rows = [run.policy_values[i]["chosen"] for i in chunk] + [run.policy_values[i]["rejected"] for i in chunk]
        values = _pad_rows(rows, width, token_loss)  # (2b, T-1)
    weights = _dpo_branch_weights(run, token_loss, valid, ref, scores, values, importance, rho, step, micro_index, b)
    loss_sum = _dpo_loss_sum(run, batch, logits, token_loss, ref, weights, omega, step, micro_index, b)
    kept = weights[0].sum() + weights[1].sum()
    with torch.no_grad():
        stats.dpo_loss_sum += float(dpo_loss(logit.detach(), normalizer=1.0))
        stats.correct_pairs += float((logit > 0).sum())
        stats.pairs += b
    if not torch.isfinite(loss_sum):
        stats.nonfinite += 1
        return False
    if valuer is not None:  # the same gradients, without the head's input gradient a second time
        valuer.backward(loss_sum, token_loss)
    else:
        loss_sum.backward()
    stats.add_micro_batch(loss_sum, kept, valid, token_loss, batch["attention_mask"])
    return True


def _dpo_branch_weights(run: _Run, token_loss, valid, ref, scores, values, importance, rho: float, step: int,
                        micro_index: int, b: int) -> list[torch.Tensor]:
    """The policy's detached weights of the chosen rows, then of the rejected rows: a separate top-rho
    per branch, each with its own seeded generator. Returns two `(b, T-1)` tensors."""
    weights = []
    for branch, rows in enumerate((slice(0, b), slice(b, 2 * b))):
        branch_scores = scores_to_loss_positions(scores, rows) if scores is not None else None
        ctx = TokenContext(valid[rows], token_loss[rows].detach(), rho, branch_scores, ref[rows],
                           _policy_generator(run.config.seed, step, micro_index, branch),
                           precomputed=values[rows] if values is not None else None,
                           importance=importance[rows, 1:] if importance is not None else None, branch=branch)
        weights.append(run.policy.weights(ctx, run.config.policy))
    return weights


def _dpo_loss_sum(run: _Run, batch: dict, logits, token_loss, ref, weights: list, omega, step: int, micro_index: int,
                  b: int) -> torch.Tensor:
    """The policy's DPO loss of the micro-batch, summed over its pairs (`Policy.dpo_form`)."""
    config, form = run.config, run.policy.dpo_form
    if form == "masked_logit":  # ConfPO: the masks inside the DPO logit
        return masked_dpo_loss(token_loss[:b], token_loss[b:], ref[:b], ref[b:], weights[0], weights[1], config.dpo_beta,
                               normalizer=1.0)
    if form == "tdpo":
        return _tidpo_loss_sum(run.model, run.ref_net, batch, logits, token_loss, weights, config.policy, config, run.pad_id,
                               _policy_generator(config.seed, step, micro_index, 2), run.stop_ids, run.autocast)
    if form == "selective_mean":  # SePO
        return selective_mean_losses(token_loss[:b], token_loss[b:], weights[0], weights[1]).sum()
    return alpha_dpo_loss(token_loss[:b], token_loss[b:], weights[0], weights[1], omega, normalizer=1.0)


@dataclass
class _Update:
    """What the reduce-and-update of one optimizer step did."""

    skipped: str | None = None  # "nonfinite" or "all_masked": no optimizer step
    grad_norm: float = float("nan")  # before clipping (when max_grad_norm is set)
    realised: dict | None = None  # the value-realisation record of the step
    probe_seconds: float = 0.0  # spent in the realisation probe after the update
    probe_cpu_seconds: float = 0.0  # its CPU time


def _reduce_and_update(run: _Run, stats: StepStats, probe_state) -> _Update:
    """The step's statistics and gradients summed over the processes, the gradient divided by the step's
    K, clipped, and the optimizer step (followed by the realisation probe when `probe_state` is set);
    skipped for a non-finite loss or gradient, or K = 0 (every token masked). The schedule advances
    in every case."""
    config, update = run.config, _Update()
    stats.all_reduce(run.world)
    normaliser = stats.normaliser(run.preference)
    if stats.nonfinite > 0:
        update.skipped = "nonfinite"
    elif normaliser == 0:
        update.skipped = "all_masked"
    if update.skipped is None:
        if not _reduce_gradients(run, normaliser):
            update.skipped = "nonfinite"
        else:
            if config.max_grad_norm is not None:
                update.grad_norm = float(torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm))
            step_lr = run.optimizer.param_groups[0]["lr"]
            step_grads = [p.grad.detach().clone() for p in run.trainable] if probe_state is not None else None
            run.optimizer.step()
            if probe_state is not None:
                t_probe, c_probe = time.perf_counter(), time.process_time()
                update.realised = run.realisation.after(run.model, probe_state, step_grads, step_lr)
                update.probe_seconds = time.perf_counter() - t_probe
                update.probe_cpu_seconds = time.process_time() - c_probe
                del step_grads
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped step advances the schedule without optimizer.step()
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        run.scheduler.step()
    return update


def _reduce_gradients(run: _Run, normaliser: float) -> bool:
    """Each trainable parameter's gradient summed over the processes (one all-reduce of the flat
    gradient) and divided by the step's K; True when it is finite."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in run.trainable]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _all_reduce(flat, run.world)
    flat /= normaliser
    offset = 0
    for p in run.trainable:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    return bool(torch.isfinite(flat).all())


def _count_skipped(counters: dict, skipped: str | None) -> None:
    """The run's counters of skipped steps (`consecutive_nonfinite` stops the run)."""
    if skipped == "nonfinite":
        counters["nonfinite_steps"] += 1
        counters["consecutive_nonfinite"] += 1
    else:
        counters["consecutive_nonfinite"] = 0
        if skipped == "all_masked":
            counters["all_masked_steps"] += 1


def _log_step(run: _Run, step: int, stats: StepStats, update: _Update, rho: float, elapsed: float) -> None:
    """The step's history row (the checkpoint keeps them), its dvclive row every `log_every` steps, and
    the progress bar."""
    row = {
        "step": step + 1,
        "loss": stats.loss_sum / stats.normaliser(run.preference) if update.skipped is None else float("nan"),
        "token_loss": stats.token_loss_sum / max(1.0, stats.valid_tokens),
        "kept_fraction": stats.kept / max(1.0, stats.valid_tokens),
        "lr": run.scheduler.get_last_lr()[0],
        "tokens_per_s": stats.tokens / max(elapsed, 1e-9),
        "grad_norm": update.grad_norm,
        "rho": rho,
        "skipped": update.skipped or "",
    }
    if run.preference:
        row["dpo_loss"] = stats.dpo_loss_sum / max(1.0, stats.pairs)
        row["reward_accuracy"] = stats.correct_pairs / max(1.0, stats.pairs)
    if update.realised is not None:
        row.update(update.realised)
    run.history.append(row)
    if run.live is not None and (step + 1) % run.config.log_every == 0:
        _log_live_row(run.live, row)
        run.live.next_step()
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{row['kept_fraction']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")


def _end_step(run: _Run, step: int, flag: PreemptionFlag) -> bool:
    """After step `step`: stop on too many non-finite steps in a row (RuntimeError) or on preemption
    (True), each after a checkpoint; otherwise the periodic checkpoint."""
    counters, config = run.counters, run.config
    if counters["consecutive_nonfinite"] >= config.max_nonfinite_steps:
        _checkpoint(run, step + 1)
        run.bar.close()
        raise RuntimeError(
            f"non-finite loss or gradient in {counters['consecutive_nonfinite']} consecutive optimizer steps "
            f"(last: step {step + 1}); checkpoint saved to {run.directory.checkpoint_dir}"
        )
    stop = torch.tensor([1.0 if flag.raised else 0.0])
    _all_reduce(stop, run.world)
    if stop.item() > 0:
        _checkpoint(run, step + 1)
        return True
    if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < run.total_steps:
        _checkpoint(run, step + 1)
    return False


def _checkpoint(run: _Run, step_done: int) -> None:
    """The resumable checkpoint after `step_done` steps, written by rank 0 (with the valuer's G and P
    when the resumed step falls inside a refresh period and reuses them)."""
    if run.rank == 0:
        extra = {"counters": run.counters, "history": run.history}
        if run.valuer is not None and step_done % run.config.val_refresh_every != 0:
            extra["valuation"] = _valuer_state(run.valuer)
        save_checkpoint(run.directory.checkpoint_dir, run.model, run.optimizer, run.scheduler, step_done, extra)
    if run.world > 1:
        dist.barrier()


def _summary(run: _Run, preempted: bool) -> dict:
    """The run's summary (metrics.json) from its history."""
    history = run.history
    summary = {
        "objective": run.objective,
        "policy": run.policy.name,
        "steps": len(history) and history[-1]["step"],
        "total_steps": run.total_steps,
        "world_size": run.world,
        "data": run.data_stats.as_dict(),
        "nonfinite_steps": run.counters["nonfinite_steps"],
        "all_masked_steps": run.counters["all_masked_steps"],
        "final_loss": next((r["loss"] for r in reversed(history) if not r["skipped"]), float("nan")),
        "mean_kept_fraction": sum(r["kept_fraction"] for r in history) / max(1, len(history)),
        "final_token_loss": history[-1]["token_loss"] if history else float("nan"),
        "preempted": preempted,
    }
    if run.preference and history:
        summary["final_dpo_loss"] = history[-1]["dpo_loss"]
        summary["final_reward_accuracy"] = history[-1]["reward_accuracy"]
    return summary


def _finish(run: _Run, preempted: bool) -> TrainResult:
    """A preempted run returns as it is (its checkpoint resumes it); a finished one merges LoRA, refuses
    non-finite weights, and (rank 0) writes final/, metrics.json and timing.json, then removes the
    checkpoint."""
    summary = _summary(run, preempted)
    if preempted:
        if run.live is not None:
            run.live.end()
        return TrainResult(run.model, summary["steps"], True, None, summary, run.start_step)

    model, config, out = run.model, run.config, run.out
    if run.policy.adapter == "lora":
        model = model.merge_and_unload()
    broken = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if broken:  # never a final checkpoint (and exit status 0) with non-finite weights
        if run.live is not None:
            run.live.end()
        raise FloatingPointError(
            f"after {run.total_steps} steps {len(broken)} parameter tensors hold non-finite values (first: {broken[0]}); "
            f"no final checkpoint is written to {out / FINAL_DIR}. Lower the learning rate (lr={config.lr}) or "
            "set max_grad_norm, then delete the run directory to start over")
    final_dir = None
    if run.rank == 0:
        final_dir = _write_outputs(run, model, summary)
    if run.world > 1:
        dist.barrier()
    return TrainResult(model, run.total_steps, False, final_dir or out / FINAL_DIR, summary, run.start_step)


def _write_outputs(run: _Run, model, summary: dict) -> Path:
    """Rank 0: final/ (the HF checkpoint and train_config.json), metrics.json and timing.json; the
    checkpoint is removed only once they are complete. Returns final/."""
    from alphatoken.models import save_pretrained

    def write_final(tmp: Path):
        save_pretrained(model, run.tokenizer, tmp)
        settings = {"objective": run.objective, **run.config.to_dict()}
        (tmp / "train_config.json").write_text(json.dumps(settings, indent=2, default=str))

    out, step_seconds = run.out, run.step_seconds
    final_dir = write_directory(out / FINAL_DIR, write_final)
    atomic_write_text(out / METRICS, json.dumps(summary, indent=2))
    atomic_write_text(out / TIMING, json.dumps({
        "mean_step_seconds": sum(step_seconds) / max(1, len(step_seconds)), "steps_timed": len(step_seconds),
        "step_seconds": step_seconds,  # each timed step in order (a benchmark drops the first ones as warm-up)
        "step_cpu_seconds": run.step_cpu_seconds,  # their CPU time: less sensitive than wall time to other jobs
        "device": run.device.type,
        "threads": torch.get_num_threads(), "world_size": run.world,
        "note": "wall-clock seconds per optimizer step of this process (a resumed run times only its own steps; "
                "the value-realisation probes are excluded)"}, indent=2))
    run.live.end()
    run.directory.finish()
    return final_dir
