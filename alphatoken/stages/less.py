"""Stage less: the LESS selection of training examples (Xia et al., ICML 2024; `alphatoken.less`) before
training. Writes into --out: selection.jsonl (the selected training examples, in the training file's order,
in its format: the `less` runs train on it), manifest.json (scores of every example, counts, budget,
checkpoints, settings) and work/ (warm-up checkpoints and projected gradients, reused by a rerun of the
same settings, model and data, so a killed selection resumes).

    python -m alphatoken.stages.less --params params.yaml --section less --model results/model \
        --train-data results/data/train.jsonl --val-data results/data/val.jsonl --out results/less/selection
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from alphatoken.checkpoint import atomic_write_bytes, atomic_write_text
from alphatoken.data import DataError, read_split, to_json
from alphatoken.less import PROJECTION_BLOCK, LessConfig, select_examples
from alphatoken.models import ModelSpec, load_model
from alphatoken.stages.common import (
    ParamsError, fail, log_run_environment, pick_device, read_section, split_section, stage_parser, to_config,
)
from alphatoken.train.batches import pad_token_id

RULE_KEYS = ("enabled", "seeds")  # read by the rules (is LESS on, which seeds train on the selection)
OWN_KEYS = ("dtype", "attn_implementation", "val_examples")  # how the stage loads the model and the data


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    for flag in ("--model", "--train-data", "--val-data", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    try:
        _, section = split_section(read_section(args.params, args.section), RULE_KEYS)
        own, rest = split_section(section, OWN_KEYS)
        cfg = to_config(rest, LessConfig)
    except ParamsError as err:
        fail(str(err))
    device = pick_device()
    log_run_environment("less", device, args.params)
    try:
        train, val = read_split(args.train_data), read_split(args.val_data)
    except (DataError, FileNotFoundError) as err:
        fail(f"{err} (rerun prepare_data)")
    val = val[: own["val_examples"]] if own.get("val_examples") else val
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=args.model, dtype=own.get("dtype", "float32"),
                                            attn_implementation=own.get("attn_implementation", "eager")), device)
    out = Path(args.out)
    try:
        result = select_examples(model, tokenizer, train, val, cfg, pad_token_id(tokenizer), work_dir=out / "work",
                                 progress=True)
    except ValueError as err:
        fail(f"{err} (check {args.section}.max_length and the data)")
    chosen = set(result.selected)
    data = "".join(json.dumps(to_json(e), ensure_ascii=False, sort_keys=True) + "\n"
                   for i, e in enumerate(train) if i in chosen).encode("utf-8")
    atomic_write_bytes(out / "selection.jsonl", data)
    ranks = {index: r for r, index in enumerate(result.ranked)}
    tokens = dict(zip(result.scored, result.response_tokens))
    manifest = {
        "method": "LESS (Xia et al., ICML 2024), princeton-nlp/LESS",
        "train_data": args.train_data, "val_data": args.val_data, "device": device,
        "counts": {"train": len(train), "scored": len(result.scored), "skipped": result.skipped,
                   "val": len(val) - sum(result.val_skipped.values()), "val_skipped": result.val_skipped,
                   "warmup": len(result.warmup), "selected": len(result.selected)},
        "budget": {"budget": cfg.budget, "ratio": cfg.ratio,
                   "rule": "ceil(ratio * scored examples)" if cfg.budget == "examples"
                   else "fewest best examples whose response tokens reach ceil(ratio * all response tokens)",
                   "selected_tokens": sum(tokens[i] for i in result.selected), "tokens": sum(result.response_tokens)},
        "checkpoints": [{"epoch": i + 1, "mean_lr": lr, "weight": lr / sum(result.mean_lrs)}
                        for i, lr in enumerate(result.mean_lrs)],
        "projection": {"kind": "Rademacher +-1/sqrt(k), drawn in blocks of rows", "dim_in": result.gradient_dim,
                       "dim_out": cfg.projection_dim, "seed": cfg.projection_seed, "block_rows": PROJECTION_BLOCK},
        "settings": {**dataclasses.asdict(cfg), **own},
        "warmup_ids": [train[i].id for i in result.warmup],
        "scores": [{"index": i, "id": train[i].id, "score": s, "rank": ranks.get(i), "selected": i in chosen}
                   for i, s in zip(result.scored, result.scores)],
        "sha256": {"selection.jsonl": hashlib.sha256(data).hexdigest()},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    reused = f" (reused {', '.join(result.reused)})" if result.reused else ""
    print(f"[less] {len(result.selected)} of {len(result.scored)} training examples selected "
          f"({cfg.budget} budget, ratio {cfg.ratio}){reused} -> {out / 'selection.jsonl'}")


if __name__ == "__main__":
    main()
