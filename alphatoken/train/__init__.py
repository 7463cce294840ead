"""Training: token-masked SFT and DPO loops (`train_sft`, `train_dpo`), their config and data encoding."""

from alphatoken.train.config import TrainConfig
from alphatoken.train.batches import EncodeStats, collate, collate_pairs, encode_dataset
from alphatoken.train.loop import TrainResult, train_dpo, train_sft

__all__ = [
    "EncodeStats",
    "TrainConfig",
    "TrainResult",
    "collate",
    "collate_pairs",
    "encode_dataset",
    "train_dpo",
    "train_sft",
]
