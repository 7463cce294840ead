"""SePO's per-token rewards of the DPO training pairs, computed once from an oracle and the reference.

For every training pair n, branch y in {chosen, rejected} and loss position p of its response

    r[n, y, p] = log pi_oracle(y_{p+1} | <=p) - log pi_ref(y_{p+1} | <=p) = l_ref[n, y, p] - l_oracle[n, y, p]

(0 off the response), with pi_oracle a model DPO-trained against pi_ref (SteveKGYang/SePO token_score.py:
`dpo_per_token_logps - ref_per_token_logps`). Both per-token losses come from
`alphatoken.train.reference.reference_token_losses` (eval mode, no grad, `micro_batch_size` pairs per
forward), so the rewards of a file and those computed anew are bit-identical on the same device.

The source scores the response from its second token on (its advantages are sliced one position
late, so the first response token is never selected); here every response token is scored, the
project's convention (token t read at loss position t-1).

A file (`save_token_rewards`; the pipeline's sepo_scores stage) holds them for every SePO run on the
same data: safetensors (`chosen` / `rejected` rows concatenated, their lengths), byte-identical on a
rerun, with metadata naming the oracle and reference weights and the encoded data, which
`load_token_rewards` checks against the run's data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alphatoken import __version__
from alphatoken.checkpoint import atomic_write_bytes
from alphatoken.tensorfile import deterministic_safetensors, read_safetensors_metadata
from alphatoken.models import weights_fingerprint
from alphatoken.train.reference import BRANCHES, features_sha256, reference_token_losses

FORMAT = "alphatoken.token_rewards/1"
CHECKED = ("train_count", "train_sha256")  # what must equal the training run's data


class TokenRewardsMismatchError(ValueError):
    """A token-rewards file that does not belong to the run's training data."""


def token_rewards(oracle, reference, features: list[dict], pad_id: int, device, micro_batch_size: int) -> list[dict]:
    """`r = l_ref - l_oracle` per pair and branch: `[{"chosen": (Lc-1,), "rejected": (Lr-1,)}, ...]`
    in feature order (0 off the response), float64 when the models are, else float32."""
    oracle_losses = reference_token_losses(oracle, features, pad_id, device, micro_batch_size, True, "oracle losses")
    reference_losses = reference_token_losses(reference, features, pad_id, device, micro_batch_size, True, "reference losses")
    return [{b: (ref[b] - orc[b]) for b in BRANCHES} for ref, orc in zip(reference_losses, oracle_losses)]


def token_rewards_identity(features: list[dict]) -> dict[str, str]:
    """The metadata fields a rewards file must match for a run on `features`."""
    return {"train_count": str(len(features)), "train_sha256": features_sha256(features, True)}


def save_token_rewards(path: str | Path, rewards: list[dict], features: list[dict], oracle, reference, max_length: int,
                       micro_batch_size: int) -> Path:
    """Write the rewards (safetensors, sorted header: a rerun gives the same bytes), atomically."""
    tensors = {}
    for branch in BRANCHES:
        tensors[branch] = torch.cat([row[branch].reshape(-1) for row in rewards]).contiguous()  # (sum of lengths,)
        tensors[f"{branch}.lengths"] = torch.tensor([row[branch].numel() for row in rewards], dtype=torch.int64)  # (N,)
    metadata = {
        "format": FORMAT,
        "library_version": __version__,
        "oracle_weights_fingerprint": weights_fingerprint(oracle),
        "reference_weights_fingerprint": weights_fingerprint(reference),
        "max_length": str(max_length),
        "micro_batch_size": str(micro_batch_size),
        **token_rewards_identity(features),
    }
    return atomic_write_bytes(Path(path), deterministic_safetensors(tensors, metadata))


def load_token_rewards(path: str | Path, features: list[dict]) -> list[dict]:
    """The rewards of a file written by `save_token_rewards`, after checking that they were computed on
    exactly `features` (count and content hash) and that every row has its sequence's length - 1;
    TokenRewardsMismatchError names the file and the fields that differ."""
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_safetensors_metadata(path, FORMAT, TokenRewardsMismatchError, "token rewards",
                                         "not written by alphatoken.train.token_rewards.save_token_rewards")
    expected = token_rewards_identity(features)
    problems = [f"field {name!r}: expected {expected[name]!r}, found {metadata.get(name)!r}"
                for name in CHECKED if metadata.get(name) != expected[name]]
    if problems:
        raise TokenRewardsMismatchError(f"{path}: token rewards computed for other training data: " + "; ".join(problems)
                                        + " -- recompute them (the sepo_scores stage) with this run's max_length and data")
    tensors = load_file(str(path))
    columns = {b: [row.clone() for row in torch.split(tensors[b], tensors[f"{b}.lengths"].tolist())] for b in BRANCHES}
    rows = [{b: columns[b][i] for b in BRANCHES} for i in range(len(features))]
    for i, (row, feature) in enumerate(zip(rows, features)):
        for b in BRANCHES:
            if row[b].numel() != len(feature[b]["input_ids"]) - 1:
                raise TokenRewardsMismatchError(f"{path}: pair {i} {b}: {row[b].numel()} rewards for a sequence of "
                                                f"{len(feature[b]['input_ids'])} tokens")
    return rows
