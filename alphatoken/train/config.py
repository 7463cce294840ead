"""The training configuration: one frozen dataclass, a comment per field, validated on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from alphatoken.data import ConfigError, check_bool, check_choice, check_int, check_number
from alphatoken.policies import PolicyConfig

OPTIMIZERS = ("adamw", "sgd")
TRAINABLE = ("all", "scored")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, batching, token policy and bookkeeping of one SFT or DPO run.

    Global batch per optimizer step = micro_batch_size * grad_accum_steps * world_size examples
    (preference pairs for DPO)."""

    output_dir: str = "results/train"  # checkpoints, dvclive metrics, final HF model under `final/`
    lr: float = 2e-5  # peak learning rate
    optimizer: str = "adamw"  # "adamw" (decoupled weight decay, betas, eps below) or "sgd" (with sgd_momentum)
    sgd_momentum: float = 0.0  # SGD: heavy-ball momentum (0: plain SGD, the update is -lr * gradient)
    weight_decay: float = 0.0  # weight decay of 2-D weights (AdamW: decoupled; SGD: L2 added to the gradient)
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    warmup_ratio: float = 0.03  # linear warm-up as a fraction of the total optimizer steps
    warmup_steps: int | None = None  # explicit warm-up steps; overrides warmup_ratio when set
    lr_schedule: str = "cosine"  # "cosine" (to 0 after warm-up) or "constant" (after warm-up)
    micro_batch_size: int = 1  # examples per forward/backward on one process
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step on one process
    max_steps: int | None = None  # optimizer steps; None: `epochs` full passes over the data
    epochs: int = 1  # passes over the training data when max_steps is None
    max_grad_norm: float | None = 1.0  # global gradient-norm clipping; None disables
    seed: int = 0  # seeds python/numpy/torch, the data order and the random policy
    bf16: bool = True  # bf16 autocast on CUDA; ignored on CPU (fp32/fp64 as the model is)
    gradient_checkpointing: bool = False  # recompute activations in backward (HF gradient checkpointing)
    checkpoint_every: int = 0  # optimizer steps between resumable checkpoints; 0: only on preemption
    trainable: str = "all"  # "all" weights, or "scored": only the scored weights (nn.Linear weights of the last
    # valuation.last_k blocks, those the token values are computed on); the rest stays frozen
    realisation_every: int = 0  # record the value realisation of every n-th step (0: none; needs `realisation_data`)
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # token policy, rho and its schedule
    valuation: object = None  # alphatoken.valuation.ValuationConfig; None: its paper defaults
    dpo_beta: float = 0.1  # DPO temperature beta (paper: 0.1)
    val_refresh_every: int = 1  # recompute the validation gradient every r optimizer steps (paper: 1)
    max_length: int = 1024  # maximum tokens per sequence (prompt + response)
    max_nonfinite_steps: int = 10  # consecutive non-finite-loss steps tolerated before stopping (with a checkpoint)
    log_every: int = 1  # optimizer steps between dvclive metric rows
    progress: bool = True  # show a tqdm progress bar on rank 0

    def __post_init__(self):
        owner = "TrainConfig"
        check_number(owner, "lr", self.lr, 0.0, low_open=True)
        check_choice(owner, "optimizer", self.optimizer, OPTIMIZERS)
        check_number(owner, "sgd_momentum", self.sgd_momentum, 0.0, 1.0, high_open=True)
        if self.optimizer != "sgd" and self.sgd_momentum != 0.0:
            raise ConfigError("sgd_momentum", f"{self.sgd_momentum} is used only by optimizer='sgd' (optimizer="
                              f"{self.optimizer!r}): set it to 0 or choose sgd", owner)
        check_choice(owner, "trainable", self.trainable, TRAINABLE)
        check_int(owner, "realisation_every", self.realisation_every, 0)
        check_number(owner, "weight_decay", self.weight_decay, 0.0)
        if not isinstance(self.adam_betas, (list, tuple)) or len(self.adam_betas) != 2:
            raise ConfigError("adam_betas", f"expected two numbers (beta1, beta2), got {self.adam_betas!r}", owner)
        for beta in self.adam_betas:
            check_number(owner, "adam_betas", beta, 0.0, 1.0, high_open=True)
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        check_number(owner, "adam_eps", self.adam_eps, 0.0, low_open=True)
        check_number(owner, "warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        check_int(owner, "warmup_steps", self.warmup_steps, 0, optional=True)
        check_choice(owner, "lr_schedule", self.lr_schedule, ("cosine", "constant"))
        check_int(owner, "micro_batch_size", self.micro_batch_size, 1)
        check_int(owner, "grad_accum_steps", self.grad_accum_steps, 1)
        check_int(owner, "max_steps", self.max_steps, 1, optional=True)
        check_int(owner, "epochs", self.epochs, 1)
        check_number(owner, "max_grad_norm", self.max_grad_norm, 0.0, low_open=True, optional=True)
        check_int(owner, "seed", self.seed, 0)
        for name in ("bf16", "gradient_checkpointing", "progress"):
            check_bool(owner, name, getattr(self, name))
        check_int(owner, "checkpoint_every", self.checkpoint_every, 0)
        if not isinstance(self.policy, PolicyConfig):
            raise ConfigError("policy", f"expected a PolicyConfig, got {type(self.policy).__name__}", owner)
        check_number(owner, "dpo_beta", self.dpo_beta, 0.0, low_open=True)
        check_int(owner, "val_refresh_every", self.val_refresh_every, 1)
        check_int(owner, "max_length", self.max_length, 2)
        check_int(owner, "max_nonfinite_steps", self.max_nonfinite_steps, 1)
        check_int(owner, "log_every", self.log_every, 1)

    def to_dict(self) -> dict:
        """JSON-ready view (the valuation config as its own field dict)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["policy"] = dataclasses.asdict(self.policy)
        if dataclasses.is_dataclass(self.valuation):
            data["valuation"] = dataclasses.asdict(self.valuation)
        return data
