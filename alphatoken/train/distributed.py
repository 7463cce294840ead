"""AlphaToken under PyTorch's distributed engine: which weights FSDP2 shards, and the validation
gradient computed with each rank running a share of the validation batch.

The valuation reads, for the scored weights of the last K decoder blocks, the whole weight W, its
target direction G, the proxy direction P, the Fisher F and the reference W_ref, and it re-runs those
blocks on captured activations. So the last K blocks stay unsharded and replicated on every rank, and
FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every decoder block before them, one FSDP unit per
block (`shard_blocks`). The valuation then runs unchanged: a sharded block's forward all-gathers its
parameters and reshards them after use, and the scored blocks' modules are the model's own. Memory:
the scored blocks' weights, gradients and optimizer state are replicated (K of L blocks), the rest is
divided by the world size (`alphatoken.plan`, "valuation ... replicated on every rank").

`set_validation_across_ranks` splits the validation sequences across the ranks: rank r runs its
contiguous share (`torch.tensor_split`), its objective is its share's token-loss sum divided by the
token count of the whole validation batch, and the per-weight directions are summed across ranks. The
sum of the ranks' objectives is the single-process objective, so the G it gives is the single-process
G (up to the order of floating-point sums), at 1/world of the validation cost per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from alphatoken.blocks import decoder_blocks
from alphatoken.losses import token_nll


def shard_blocks(model: nn.Module, last_k: int, mp_policy=None, mesh=None) -> list[int]:
    """Apply `fully_shard` to every decoder block of `model` except the last `last_k` (the valuation's
    scored blocks, which stay whole on every rank). Returns the indices of the sharded blocks.

    mp_policy: a `torch.distributed.fsdp.MixedPrecisionPolicy` (on CUDA: bf16 parameters, fp32
    gradient reduction), or None for the parameters' own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = decoder_blocks(model)
    if not 0 <= last_k <= len(blocks):
        raise ValueError(f"last_k={last_k} must be between 0 and the number of decoder blocks ({len(blocks)})")
    sharded = list(range(len(blocks) - last_k))
    for index in sharded:
        fully_shard(blocks[index], mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
    return sharded


def validation_share(val_batch: dict, rank: int, world: int) -> dict:
    """Rank `rank`'s contiguous share of the validation sequences (`torch.tensor_split` over rows)."""
    n = val_batch["input_ids"].shape[0]
    if n < world:
        raise ValueError(f"the validation batch has {n} sequences, fewer than the {world} ranks it is split "
                         "across: raise train.val_examples (B_val) to at least the world size")
    return {key: torch.tensor_split(value, world)[rank] for key, value in val_batch.items()}


def set_validation_across_ranks(valuer, val_batch: dict, group=None) -> None:
    """`valuer.set_validation` of the whole `val_batch` (every rank passes the same one), each rank
    running `validation_share` of it; the default objective (mean token loss over all validation
    response tokens) only. One process (no process group): plain `set_validation`."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        valuer.set_validation(val_batch)
        return
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    labels = val_batch["labels"]
    n_tokens = int((labels[:, 1:] != -100).sum())  # of the whole batch: the same on every rank
    if n_tokens == 0:
        raise ValueError("the validation batch has no response tokens (all labels are -100)")
    share = validation_share(val_batch, rank, world)

    def objective(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return token_nll(out.logits, batch["labels"], valuer.compute_dtype).sum() / n_tokens

    def summed(g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group)
        return g

    valuer.set_validation(share, objective=objective, reduce=summed)
