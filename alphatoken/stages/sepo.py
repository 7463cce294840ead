"""Stage sepo: SePO's inputs on the DPO route. `subset` (section `sepo`) writes the oracle's training
pairs, a seeded random subset of the DPO training pairs (`sepo.oracle_fraction`, `sepo.oracle_seed`;
the oracle is then DPO-trained on them by the train stage, policy `full`); `scores` (section `dpo`)
writes the per-token rewards r = log pi_oracle - log pi_ref of every DPO training pair
(`alphatoken.train.token_rewards`), encoded and batched as the DPO runs do (the section's max_length,
micro_batch_size, dtype, attn_implementation: the keys of the ref_logps stage).

    python -m alphatoken.stages.sepo subset --params params.yaml --section sepo \
        --train-data results/dpo/data/train.jsonl --out results/dpo/sepo/oracle_train.jsonl
    python -m alphatoken.stages.sepo scores --params params.yaml --section dpo \
        --oracle results/dpo/sepo/oracle/final --model results/dpo/warmstart/final \
        --train-data results/dpo/data/train.jsonl --out results/dpo/sepo/token_rewards.safetensors
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alphatoken.checkpoint import atomic_write_bytes
from alphatoken.data import DataError, read_split
from alphatoken.models import ModelSpec, load_model
from alphatoken.stages.common import ParamsError, fail, log_run_environment, pick_device, read_section, stage_parser
from alphatoken.stages.ref_logps import read_settings as read_dpo_settings
from alphatoken.train.batches import encode_dataset, pad_token_id
from alphatoken.train.token_rewards import save_token_rewards, token_rewards

DEFAULTS = {"oracle_fraction": 0.5, "oracle_seed": 0}  # the sepo keys this stage reads (seeds: the rules')


def subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """The oracle's pairs: `ceil(fraction * n)` of the n training pairs drawn without replacement by a
    generator seeded with `seed`, in file order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"oracle_fraction={fraction} must be in (0, 1]")
    k = min(n, math.ceil(round(fraction * n, 9)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:k])


def write_subset(train_path: str | Path, out: str | Path, fraction: float, seed: int) -> tuple[int, int]:
    """Copy the chosen lines of the training split (validated with `read_split`) to `out`, byte for
    byte and atomically; returns (pairs kept, pairs in the split)."""
    examples = read_split(train_path)
    lines = [line for line in Path(train_path).read_bytes().splitlines(keepends=True) if line.strip()]
    if len(lines) != len(examples):
        raise DataError(f"{train_path}: {len(lines)} non-empty lines but {len(examples)} records")
    keep = subset_indices(len(lines), fraction, seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(out), b"".join(lines[i] for i in keep))
    return len(keep), len(lines)


def read_settings(params: list, section_name: str) -> dict:
    section = read_section(params, section_name)
    return {key: section.values.get(key, default) for key, default in DEFAULTS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("command", choices=("subset", "scores"))
    parser.add_argument("--train-data", required=True, help="the DPO training pairs")
    parser.add_argument("--out", required=True, help="subset: JSONL to write; scores: safetensors to write")
    parser.add_argument("--oracle", help="scores: the oracle checkpoint (DPO-trained on the subset)")
    parser.add_argument("--model", help="scores: the reference checkpoint (the warm-start)")
    args = parser.parse_args(argv)
    try:
        own = read_settings(args.params, args.section) if args.command == "subset" else None
        dpo = read_dpo_settings(args.params, args.section) if args.command == "scores" else None
    except ParamsError as err:
        fail(str(err))
    if args.command == "subset":
        try:
            kept, total = write_subset(args.train_data, args.out, own["oracle_fraction"], own["oracle_seed"])
        except (DataError, FileNotFoundError) as err:
            fail(f"{err} (rerun prepare_preference)")
        print(f"[sepo] oracle subset: {kept} of {total} pairs (fraction {own['oracle_fraction']}, seed "
              f"{own['oracle_seed']}) -> {args.out}")
        return
    if not args.oracle or not args.model:
        fail("sepo scores: pass --oracle (the oracle checkpoint) and --model (the reference checkpoint)")
    device = pick_device()
    log_run_environment("sepo_scores", device, args.params)
    spec = dict(source="hub", dtype=dpo["dtype"], attn_implementation=dpo["attn_implementation"])
    reference, tokenizer = load_model(ModelSpec(name_or_path=args.model, **spec), device)
    oracle, _ = load_model(ModelSpec(name_or_path=args.oracle, **spec), device)
    try:
        features, stats = encode_dataset(tokenizer, read_split(args.train_data), dpo["max_length"], preference=True)
    except (DataError, FileNotFoundError) as err:
        fail(f"{err} (rerun prepare_preference)")
    if not features:
        fail(f"{args.train_data}: no usable pair within {args.section}.max_length={dpo['max_length']} ({stats.as_dict()})")
    rewards = token_rewards(oracle, reference, features, pad_token_id(tokenizer), device, dpo["micro_batch_size"])
    save_token_rewards(args.out, rewards, features, oracle, reference, dpo["max_length"], dpo["micro_batch_size"])
    print(f"[sepo] token rewards of {len(features)} pairs (skipped: {stats.as_dict()['skipped']}) -> {args.out}")


if __name__ == "__main__":
    main()
