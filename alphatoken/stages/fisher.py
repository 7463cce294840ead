"""Stage fisher: the Monte-Carlo Fisher of the scored weights at the reference model, over the
Fisher hold-out prompts (diagonal, or the Kronecker factors with `fisher.kind: kronecker`); cached
as safetensors with its provenance in the metadata.

    python -m alphatoken.stages.fisher --params params.yaml --section fisher --model results/model \
        --prompts results/data/fisher.jsonl --out results/fisher.safetensors --summary results/fisher.json
"""

from __future__ import annotations

import time

import torch

from alphatoken.blocks import decoder_blocks
from alphatoken.data import DataError, read_split
from alphatoken.fisher import FisherConfig, compute_fisher, encode_fisher_prompts, save_fisher
from alphatoken.models import ModelSpec, load_model
from alphatoken.stages.common import (
    FISHER_STAGE_KEYS, ParamsError, fail, log_run_environment, pick_device, read_section, split_section, stage_parser,
    to_config, write_json,
)

OWN_KEYS = FISHER_STAGE_KEYS  # how the stage loads and encodes; the rest is FisherConfig


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    for flag, what in (("--model", "reference checkpoint directory"), ("--prompts", "Fisher hold-out (JSONL)"),
                       ("--out", "Fisher safetensors to write"), ("--summary", "JSON summary to write")):
        parser.add_argument(flag, required=True, help=what)
    args = parser.parse_args(argv)
    try:
        own, rest = split_section(read_section(args.params, args.section), OWN_KEYS)
        cfg = to_config(rest, FisherConfig)
    except ParamsError as err:
        fail(str(err))
    device = pick_device()
    log_run_environment("fisher", device, args.params)
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=args.model, dtype=own.get("dtype", "float32"),
                                            attn_implementation=own.get("attn_implementation", "sdpa")), device)
    depth = len(decoder_blocks(model))
    if cfg.last_k > depth:
        fail(f"{rest.locate('last_k')}: {cfg.last_k} is more than the {depth} decoder blocks of the model; "
             f"set it to at most {depth}")
    try:
        examples = read_split(args.prompts)
    except (DataError, FileNotFoundError) as err:
        fail(f"{err} (rerun prepare_data)")
    prompts, responses, skipped = encode_fisher_prompts(examples, tokenizer, own.get("max_length", 1024))
    if not prompts:
        fail(f"no usable Fisher prompt in {args.prompts} (skipped: {dict(skipped)}); raise {args.section}.max_length")
    began = time.perf_counter()
    fisher = compute_fisher(model, tokenizer, prompts, cfg, responses=responses if cfg.labels == "empirical" else None)
    save_fisher(args.out, fisher, model, cfg, len(prompts))
    seconds = time.perf_counter() - began
    # the summary is a DVC-tracked output: only deterministic fields (the time goes to the log)
    write_json(args.summary, {
        "num_prompts": len(prompts), "skipped": dict(skipped), "device": device,
        "config": vars(cfg), "total": float(sum(f.sum().item() for f in fisher.values())),
        "torch": torch.__version__,
    })
    print(f"[fisher] {len(prompts)} prompts ({sum(skipped.values())} skipped: {dict(skipped)}) in {seconds:.1f} s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
