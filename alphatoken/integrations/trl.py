"""AlphaToken inside TRL: `AlphaTokenSFTTrainer` and `AlphaTokenDPOTrainer`, subclasses of TRL's
`SFTTrainer` / `DPOTrainer` that override the loss hook (`compute_loss`), with their configs
`AlphaTokenSFTConfig` / `AlphaTokenDPOConfig` (TRL's configs plus the fields of `AlphaTokenArguments`).
Switching an existing TRL script over is a change of class names and a few config fields::

    from alphatoken.integrations.trl import AlphaTokenSFTConfig, AlphaTokenSFTTrainer

    args = AlphaTokenSFTConfig(output_dir="out", policy="alphatoken", rho=0.5, last_k=3, window=32, lam=1.5,
                               val_data="val.jsonl", fisher_path="fisher.safetensors")
    trainer = AlphaTokenSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()

Everything AlphaToken computes is the library's own: the token values (`alphatoken.valuation.TokenValuer`,
observing TRL's training forward with `capture()`), the masks (`alphatoken.policies`), the per-token
losses and the Alpha-SFT / Alpha-DPO objectives (`alphatoken.losses`). One training micro-batch does what
one micro-batch of `alphatoken.train.train_sft` / `train_dpo` does; the naive equivalent is::

    if step % val_refresh_every == 0: valuer.set_validation(val_batch)       # G on the current weights
    with valuer.capture(): logits = model(input_ids, attention_mask).logits   # (B, T, V)
    token_loss = token_nll(logits, labels)                                     # (B, T-1)
    scores = valuer.score_captured(batch, token_loss)                          # values, label-aligned
    weights = policy.weights(TokenContext(valid, token_loss, rho, scores, ...))  # top-rho mask, detached
    loss = (weights * token_loss).sum() / K                                    # K: kept tokens of the step

Normalisation. The library divides the step's summed gradient by K, the kept tokens of all its
micro-batches on all processes (DPO: its pairs). TRL back-propagates each micro-batch's loss on its own,
so K must be known before the first one: it is TRL's own `num_items_in_batch` mechanism, with K in place
of the label count. That is exact for the policies whose kept count follows from the labels alone (a
top-rho mask keeps exactly ceil(rho N) of a micro-batch's N tokens; `full` keeps N) and for the policies
that divide by the response tokens (`talr`); the count is checked against the weights of every
micro-batch. Policies whose normaliser depends on the weights (`soft`), or which need the reference
model's per-token losses, step-0 values or attention (STM, Token Cleaning, Rho-1, FLOW, XTF, ssToken,
ConfPO), are refused with the reason; `alphatoken.train` runs them.

Data order. With `data_order="alphatoken"` (default) the training sampler is the library's seeded
permutation per epoch, so every optimizer step sees the examples `train_sft` / `train_dpo` would see with
the same seed and batch sizes; `"trainer"` keeps the Trainer's own sampler. `sft_dataset` and
`preference_dataset` encode examples the way the library does (its chat template split, labels on the
response); TRL's own text formats work too (TRL then tokenizes and builds the labels).

What works and what does not (see also the README section "Training with TRL"): gradient accumulation
(same step as the library's), gradient checkpointing, PEFT/LoRA (`peft_config`: the valuation then scores
the adapter factors; `lora_dropout` must be 0), accelerate / torchrun data parallelism (the normaliser is
summed over processes and the loss scaled as TRL does; G is computed on each process from the whole
validation batch; tested with two CPU processes). DeepSpeed ZeRO-1/2 keep whole weights on every process
and pass the same checks, but are not tested here. Refused with a clear error: packing and padding-free batches (rows holding several documents, which
the valuation's attention and value paths would mix), FSDP and DeepSpeed ZeRO-3 (the valuation reads the
full scored weights), and TRL's DPO loss variants other than the sigmoid loss. Evaluation
(`trainer.evaluate`) reports TRL's unmasked loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch

try:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as err:  # the core package never imports TRL; this module needs it
    raise ImportError(f"alphatoken.integrations.trl needs TRL ({err}): pip install 'alphatoken[trl]'") from err

from alphatoken.blocks import scored_linears
from alphatoken.data import ConfigError, check_choice, check_int, read_split
from alphatoken.losses import IGNORE_INDEX, alpha_dpo_loss, dpo_logit, dpo_loss, dpo_weight, kept_count, loss_positions, token_nll
from alphatoken.policies import PolicyConfig, TokenContext, get_policy, scores_to_loss_positions
from alphatoken.train.batches import as_batch, encode_dataset
from alphatoken.train.loop import _dpo_objective, _epoch_order, _policy_generator
from alphatoken.valuation import TokenValuer, ValuationConfig

# Policies whose weights are a top-rho mask keeping exactly ceil(rho N) of a micro-batch's (or DPO
# branch's) N response tokens, and `full`, which keeps all N: their normaliser follows from the labels.
EXACT_BUDGET = ("alphatoken", "adaptation_only", "stability_only", "direct_only", "causal_only", "no_fisher", "random", "bottom")
DATA_ORDERS = ("alphatoken", "trainer")


def unsupported_reason(name: str, objective: str) -> str | None:
    """Why the policy `name` cannot train inside TRL's loop for `objective` ("sft", "dpo"), or None."""
    policy = get_policy(name)
    if policy.adapter == "lora":
        return ("it wraps the model in LoRA adapters itself; pass `peft_config=peft.LoraConfig(..., lora_dropout=0)` "
                "to the trainer instead and use the policy 'alphatoken' (it then scores the adapter factors)")
    if objective == "dpo" and policy.sft_only:
        return "it is an SFT method"
    if objective == "sft" and policy.dpo_form == "masked_logit":
        return "it is a preference-optimisation method"
    if policy.needs_reference_loss or policy.precompute is not None or policy.needs_attention or policy.dpo_form != "alpha":
        return ("it needs the reference model's per-token losses, step-0 values or attention maps, which the library's "
                "own loop computes and caches (alphatoken.train.train_sft / train_dpo)")
    kind = policy.normalizer(PolicyConfig(name=name)) if policy.normalizer is not None else "weights"
    if kind == "weights" and name not in EXACT_BUDGET and name != "full":
        return ("its step normaliser (the sum of its weights over the step) is known only once every micro-batch is "
                "weighted, while TRL back-propagates each micro-batch's normalised loss on its own")
    return None


def _supported(objective: str) -> list[str]:
    from alphatoken.policies import POLICIES

    return sorted(n for n in POLICIES if unsupported_reason(n, objective) is None)


@dataclass
class AlphaTokenArguments:
    """The AlphaToken fields of `AlphaTokenSFTConfig` / `AlphaTokenDPOConfig` (paper defaults)."""

    policy: str = field(default="alphatoken", metadata={
        "help": "Token policy, a name of `alphatoken.policies.POLICIES`: 'alphatoken' (the paper's method), an ablation "
                "('adaptation_only', 'stability_only', 'direct_only', 'causal_only', 'no_fisher', 'bottom'), "
                "'random' or 'full' (no mask: standard SFT / DPO)."})
    rho: float = field(default=0.5, metadata={"help": "Retained-token ratio rho in (0, 1]: the top ceil(rho N) tokens of "
                                                      "each micro-batch (each DPO branch) train."})
    rho_end: float | None = field(default=None, metadata={"help": "Final ratio of a rho schedule (None: constant rho)."})
    rho_schedule: str = field(default="constant", metadata={"help": "'constant', 'linear' or 'cosine' from rho to rho_end."})
    last_k: int = field(default=3, metadata={"help": "K: the nn.Linear weights of the last K decoder blocks are scored."})
    window: int = field(default=32, metadata={"help": "W: positions p+1..p+W feed token p's causal value-path score."})
    lam: float = field(default=1.5, metadata={"help": "lambda >= 0: weight of the retention proxy F * (W - W_ref) in the "
                                                      "total value (0 without a Fisher)."})
    signal: str = field(default="self", metadata={"help": "Training error signal: 'self' (d l_p / d z_p, the paper's) or "
                                                          "'total' (d L / d z_p)."})
    val_data: str | None = field(default=None, metadata={
        "help": "Validation (target) examples for the target gradient G: a JSONL split file as written by the pipeline's "
                "prepare_data stage (`alphatoken.data.read_split`); chat examples for SFT, preference pairs for DPO. "
                "The trainer's `val_dataset` argument takes examples or a batch directly instead."})
    fisher_path: str | None = field(default=None, metadata={
        "help": "Diagonal Fisher of the scored weights at the starting model (safetensors written by "
                "`alphatoken.fisher.save_fisher`, the pipeline's fisher stage; checked against the model). None: no "
                "retention proxy. The reference weights of the proxy are the model's weights when the trainer is built."})
    val_refresh_every: int = field(default=1, metadata={"help": "Recompute G every this many optimizer steps (paper: 1)."})
    data_order: str = field(default="alphatoken", metadata={
        "help": "'alphatoken': the library's seeded permutation per epoch (the same steps as alphatoken.train for the "
                "same seed and batch sizes); 'trainer': the Trainer's own sampler."})

    def alphatoken_configs(self) -> tuple[PolicyConfig, ValuationConfig]:
        """(PolicyConfig, ValuationConfig) of these fields (raises ConfigError naming a bad field)."""
        try:
            policy = PolicyConfig(name=self.policy, rho=self.rho, rho_end=self.rho_end, rho_schedule=self.rho_schedule)
            valuation = ValuationConfig(last_k=self.last_k, window=self.window, lam=self.lam, signal=self.signal)
        except ConfigError as err:  # named as this config's field
            raise ConfigError("policy" if err.field == "name" else err.field, err.message, type(self).__name__) from None
        return policy, valuation

    def _check_alphatoken(self, objective: str) -> None:
        owner = type(self).__name__
        self.alphatoken_configs()
        check_int(owner, "val_refresh_every", self.val_refresh_every, 1)
        check_choice(owner, "data_order", self.data_order, DATA_ORDERS)
        reason = unsupported_reason(self.policy, objective)
        if reason is not None:
            raise ConfigError("policy", f"{self.policy!r} cannot run inside TRL's loop: {reason}. Supported here: "
                              f"{_supported(objective)}", owner)
        if getattr(self, "packing", False):
            raise ConfigError("packing", "True packs several documents into one row, whose tokens would then attend to "
                              "each other in the valuation's attention and value paths; set packing=False", owner)
        if getattr(self, "padding_free", False):
            raise ConfigError("padding_free", "True concatenates the batch into one row without an attention mask, which "
                              "the valuation cannot separate into sequences; set padding_free=False", owner)


@dataclass
class AlphaTokenSFTConfig(AlphaTokenArguments, SFTConfig):
    """TRL's `SFTConfig` plus the AlphaToken fields (`AlphaTokenArguments`)."""

    def __post_init__(self):
        super().__post_init__()
        self._check_alphatoken("sft")


@dataclass
class AlphaTokenDPOConfig(AlphaTokenArguments, DPOConfig):
    """TRL's `DPOConfig` plus the AlphaToken fields (`AlphaTokenArguments`). Only TRL's standard sigmoid DPO loss
    is replaced (by Alpha-DPO, Eq. 14); `beta` is the DPO temperature of both."""

    def __post_init__(self):
        super().__post_init__()
        self._check_alphatoken("dpo")
        owner = type(self).__name__
        if list(self.loss_type) != ["sigmoid"] or (self.loss_weights not in (None, [1.0])):
            raise ConfigError("loss_type", f"{self.loss_type!r}: AlphaToken replaces the sigmoid DPO loss only; set "
                              "loss_type='sigmoid' (and no loss_weights)", owner)
        for name, default in (("ld_alpha", None), ("f_divergence_type", "reverse_kl"), ("label_smoothing", 0.0),
                              ("use_weighting", False), ("sync_ref_model", False)):
            value = getattr(self, name)
            if (value.value if hasattr(value, "value") else value) != default:
                raise ConfigError(name, f"{value!r} changes the DPO objective that Alpha-DPO replaces; leave it at "
                                  f"{default!r}", owner)


class EpochOrderSampler(torch.utils.data.Sampler):
    """The library's data order (`alphatoken.train.loop._epoch_order`): a seeded permutation of the n
    examples per epoch; the Trainer calls `set_epoch`."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(_epoch_order(self.n, self.seed, self.epoch))

    def __len__(self) -> int:
        return self.n


def sft_dataset(tokenizer, examples, max_length: int) -> tuple[Dataset, dict]:
    """Examples (anything `alphatoken.train.encode_dataset` reads) -> a pre-tokenized `datasets.Dataset` with
    `input_ids` and `labels` (-100 off the response), which SFTTrainer uses as is; and the encode stats."""
    features, stats = encode_dataset(tokenizer, examples, max_length)
    if not features:
        raise ValueError(f"no usable training example ({stats.as_dict()})")
    return Dataset.from_list(features), stats.as_dict()


def preference_dataset(tokenizer, pairs, max_length: int) -> tuple[Dataset, dict]:
    """Preference pairs -> a pre-tokenized `datasets.Dataset` with TRL's `prompt_ids`, `chosen_ids`,
    `rejected_ids` (the library's encoding: both branches share the prompt tokens), which
    `AlphaTokenDPOTrainer` uses as is; and the encode stats."""
    features, stats = encode_dataset(tokenizer, pairs, max_length, preference=True)
    rows = []
    for index, pair in enumerate(features):
        row = {}
        for branch in ("chosen", "rejected"):
            ids, labels = pair[branch]["input_ids"], pair[branch]["labels"]
            start = next(t for t, y in enumerate(labels) if y != IGNORE_INDEX)
            if any(y == IGNORE_INDEX for y in labels[start:]):
                raise ValueError(f"pair {index}: the {branch} response has unlabelled tokens inside it; TRL's preference "
                                 "batches label every token after the prompt")
            row.setdefault("prompt_ids", ids[:start])
            if row["prompt_ids"] != ids[:start]:
                raise ValueError(f"pair {index}: chosen and rejected do not share the prompt tokens")
            row[f"{branch}_ids"] = ids[start:]
        rows.append(row)
    if not rows:
        raise ValueError(f"no usable preference pair ({stats.as_dict()})")
    return Dataset.from_list(rows), stats.as_dict()


class _AlphaTokenLoss:
    """What both trainers share: the valuer, the step's normaliser, the data order, the checks."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's normaliser K itself
    _objective = "sft"

    def _setup_alphatoken(self, val_dataset, fisher) -> None:
        args = self.args
        if not isinstance(args, AlphaTokenArguments):
            raise TypeError(f"{type(self).__name__} needs an AlphaToken{self._objective.upper()}Config, got "
                            f"{type(args).__name__}")
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError("FSDP shards the weights, while the valuation reads the full scored weights and their "
                             "activations; use DDP (accelerate's MULTI_GPU) or DeepSpeed ZeRO-1/2")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if getattr(self, "is_deepspeed_enabled", False) and plugin is not None and plugin.zero_stage == 3:
            raise ValueError("DeepSpeed ZeRO-3 partitions the weights, while the valuation reads the full scored "
                             "weights; use ZeRO stage 1 or 2")
        self.token_policy_config, valuation = args.alphatoken_configs()
        self.token_policy = get_policy(args.policy)
        self._tokenizer_for_values = getattr(self.processing_class, "tokenizer", self.processing_class)
        self._plan = None  # (step, per-micro-batch normaliser shares, rho) of the current optimizer step
        self._micro = 0  # micro-batches of the current step done on this process
        self._validation_step = None  # the step whose G the valuer holds
        self.valuer = None
        preference = self._objective == "dpo"
        if not self.token_policy.needs_scores:
            return
        model = self.model  # unwrapped (PEFT-wrapped when a peft_config was given)
        device = next(model.parameters()).device
        vcfg = dataclasses.replace(valuation, **self.token_policy.valuation_overrides)
        if val_dataset is None and args.val_data is None:
            raise ValueError(f"policy {args.policy!r} values tokens against validation data: set "
                             f"{type(args).__name__}.val_data (a JSONL split file) or pass val_dataset= to the trainer")
        val = val_dataset if val_dataset is not None else read_split(args.val_data)
        max_length = args.max_length if args.max_length is not None else 10**9
        self._val_batch = {k: v.to(device) for k, v in as_batch(self._tokenizer_for_values, val, max_length, preference).items()}
        if fisher is None and args.fisher_path is not None:
            from alphatoken.fisher import load_fisher

            fisher = load_fisher(args.fisher_path, model)
        reference = None
        if fisher is not None:
            fisher = {k: v.to(device) for k, v in fisher.items()}
            params = dict(model.named_parameters())
            reference = {name: params[name].detach().clone() for name in scored_linears(model, vcfg.last_k)}
        self.valuer = TokenValuer(model, vcfg, fisher=fisher, reference=reference)
        self._val_objective = None
        if preference:
            val_inputs = {"input_ids": self._val_batch["input_ids"], "attention_mask": self._val_batch["attention_mask"],
                          "completion_mask": (self._val_batch["labels"] != IGNORE_INDEX).long()}
            chosen, rejected = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, val_inputs)
            self._val_objective = _dpo_objective(args.beta, torch.cat([chosen, rejected]).detach())  # (2Bv,)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.data_order == "alphatoken" and dataset is not None and hasattr(dataset, "__len__"):
            return EpochOrderSampler(len(dataset), self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _rho(self, step: int) -> float:
        total = max(1, self.state.max_steps)
        return self.token_policy_config.rho_at(step / max(1, total - 1))

    def _share(self, batch: dict, rho: float) -> float:
        """This micro-batch's share of the step's normaliser K, from its labels (see the module docstring)."""
        raise NotImplementedError

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and its normaliser K (summed over processes) as `num_items_in_batch`."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        rho = self._rho(step)
        shares = [self._share(batch, rho) for batch in batch_samples]
        self._plan, self._micro = (step, shares, rho), 0
        total = torch.tensor(float(sum(shares)), dtype=torch.float64, device=device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return batch_samples, total

    def _next_micro_batch(self, num_items_in_batch) -> tuple[int, int, float, float, float]:
        """(step, micro-batch index within the step as the library numbers it, rho, expected share, K)."""
        if self._plan is None or self._plan[0] != self.state.global_step or num_items_in_batch is None:
            raise RuntimeError(f"{type(self).__name__}.compute_loss in training needs the step's normaliser from "
                               "get_batch_samples (Trainer.train's loop)")
        step, shares, rho = self._plan
        j = self._micro
        self._micro += 1
        if j >= len(shares):
            raise RuntimeError(f"step {step}: more micro-batches than get_batch_samples collected ({len(shares)})")
        # accelerate gives process r the batches r, r + world, ... of the step: the library's micro-batch order
        index = j * self.accelerator.num_processes + self.accelerator.process_index
        if self.valuer is not None and step != self._validation_step and (
                step % self.args.val_refresh_every == 0 or self._validation_step is None):
            self.valuer.set_validation(self._val_batch, objective=self._val_objective)
            self._validation_step = step
        return step, index, rho, shares[j], float(num_items_in_batch)

    def _scaled(self, loss_sum: torch.Tensor, normaliser: float) -> torch.Tensor:
        """sum / K, times the number of processes: data parallelism averages the gradients, K counts all processes."""
        if normaliser == 0:  # nothing kept in the whole step: a zero gradient
            return loss_sum * 0.0
        return loss_sum * (self.accelerator.num_processes / normaliser)

    def _check_share(self, step: int, weights_share: float, expected: float) -> None:
        if abs(weights_share - expected) > 1e-9 * max(1.0, expected):
            raise RuntimeError(f"step {step}: policy {self.token_policy.name!r} kept {weights_share} (normaliser share), "
                               f"the labels predicted {expected}")


class AlphaTokenSFTTrainer(_AlphaTokenLoss, SFTTrainer):
    """TRL's `SFTTrainer` training with AlphaToken masks (Alpha-SFT, Eq. 13). Takes `SFTTrainer`'s arguments,
    `args` an `AlphaTokenSFTConfig`, and optionally `val_dataset` (validation examples or a batch dict, instead
    of `args.val_data`) and `fisher` (a dict parameter name -> tensor, instead of `args.fisher_path`)."""

    _objective = "sft"

    def __init__(self, *args, val_dataset=None, fisher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_alphatoken(val_dataset, fisher)

    def _share(self, batch: dict, rho: float) -> float:
        labels = batch["labels"]
        n = int(loss_positions(labels).sum())
        kind = self.token_policy.normalizer(self.token_policy_config) if self.token_policy.normalizer else "weights"
        if kind == "tokens" or self.token_policy.name == "full":
            return float(n)
        if kind == "sequences":
            return float(labels.shape[0])
        return float(kept_count(n, rho)) if n else 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: TRL's unmasked loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "attention_mask" not in inputs:
            raise ValueError("the batch has no attention_mask (padding-free or packed rows); AlphaToken needs padded rows")
        step, index, rho, expected, normaliser = self._next_micro_batch(num_items_in_batch)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": inputs["labels"]}
        capture = self.valuer.capture() if self.valuer is not None else contextlib.nullcontext()
        with capture:
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        token_loss = token_nll(outputs.logits, batch["labels"])  # (B, T-1), graph
        valid = loss_positions(batch["labels"])  # (B, T-1)
        scores = None
        if self.valuer is not None:
            scores = scores_to_loss_positions(self.valuer.score_captured(batch, token_loss, components=False))
        ctx = TokenContext(valid, token_loss.detach(), rho, scores, None, _policy_generator(self.args.seed, step, index, 0))
        weights = self.token_policy.weights(ctx, self.token_policy_config)  # (B, T-1) detached
        self._check_share(step, float(self.token_policy.normalizer_share(weights, valid, self.token_policy_config)), expected)
        loss_sum = (weights * token_loss).sum()  # unnormalised, as in alphatoken.train
        n_valid = max(1.0, float(valid.sum()))
        self._metrics["train"]["kept_fraction"].append(float(weights.sum()) / n_valid)
        self._metrics["train"]["token_loss"].append(float((token_loss.detach() * valid).sum()) / n_valid)
        loss = self._scaled(loss_sum, normaliser)
        return (loss, outputs) if return_outputs else loss


class AlphaTokenDPOTrainer(_AlphaTokenLoss, DPOTrainer):
    """TRL's `DPOTrainer` training with AlphaToken masks (Alpha-DPO, Eq. 14: omega from the unmasked logit,
    top-rho per branch). The reference log-probs are TRL's (its `ref_model`, the adapter-free PEFT model, or
    `precompute_ref_log_probs`). Arguments as `DPOTrainer`'s, plus `val_dataset` (validation pairs) and `fisher`
    as in `AlphaTokenSFTTrainer`. A pre-tokenized dataset with `prompt_ids`, `chosen_ids`, `rejected_ids`
    (`preference_dataset`) is used as is."""

    _objective = "dpo"

    def __init__(self, *args, val_dataset=None, fisher=None, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "_is_vision_dataset", False):
            raise ValueError("AlphaTokenDPOTrainer trains text-only preference data")
        self._setup_alphatoken(val_dataset, fisher)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = set(next(iter(dataset)).keys())
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:  # already tokenized (preference_dataset)
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length)
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _share(self, batch: dict, rho: float) -> float:
        return float(batch["input_ids"].shape[0] // 2)  # pairs: rows [:B] chosen, [B:] rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: TRL's DPO loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        step, index, rho, _, normaliser = self._next_micro_batch(num_items_in_batch)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)  # (2b, T)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
        b = labels.shape[0] // 2
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, inputs)
        capture = self.valuer.capture() if self.valuer is not None else contextlib.nullcontext()
        with capture:
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        token_loss = token_nll(outputs.logits, labels)  # (2b, T-1), graph
        valid = loss_positions(labels)  # (2b, T-1)
        logps = -token_loss.sum(dim=1)  # (2b,)
        beta = self.args.beta
        logit = dpo_logit(logps[:b], logps[b:], ref_chosen.to(logps).detach(), ref_rejected.to(logps).detach(), beta)  # (b,)
        omega = dpo_weight(logit, beta)  # (b,) detached, from the unmasked logit
        scores = None
        if self.valuer is not None:
            scale = torch.cat([omega, -omega]).to(token_loss.dtype)  # (2b,) +omega chosen, -omega rejected
            scores = self.valuer.score_captured(batch, token_loss, example_scale=scale, components=False)
        weights = []
        for branch, rows in enumerate((slice(0, b), slice(b, 2 * b))):  # top-rho per branch
            branch_scores = scores_to_loss_positions(scores, rows) if scores is not None else None
            ctx = TokenContext(valid[rows], token_loss[rows].detach(), rho, branch_scores, None,
                               _policy_generator(self.args.seed, step, index, branch))
            weights.append(self.token_policy.weights(ctx, self.token_policy_config))
        loss_sum = alpha_dpo_loss(token_loss[:b], token_loss[b:], weights[0], weights[1], omega, normalizer=1.0)
        with torch.no_grad():
            self._metrics["train"]["dpo_loss"].append(float(dpo_loss(logit.detach())))
            self._metrics["train"]["rewards/accuracies"].append(float((logit > 0).double().mean()))
            self._metrics["train"]["kept_fraction"].append(float(weights[0].sum() + weights[1].sum()) / max(1.0, float(valid.sum())))
        loss = self._scaled(loss_sum, normaliser)
        return (loss, outputs) if return_outputs else loss
