"""Seconds per optimizer step of every SFT token policy and baseline against plain SFT (the paper's
Tables 7-8 analogue), on SmolLM2-135M-Instruct, measured side by side in one run.

    OMP_NUM_THREADS=1 python bench/policies.py                       # the SFT baselines, small sizes
    OMP_NUM_THREADS=1 python bench/policies.py --modes all           # and AlphaToken's ablations and controls
    OMP_NUM_THREADS=1 python bench/policies.py --modes full,alphatoken,flow --global-batch 8 --seq-len 256

Each mode is one real training run, `alphatoken.train.train_sft` with policy MODE (the loop of every
pipeline run: the policy's own inputs, its weights, the LoRA wrapping, the valuer), in its own
subprocess, one mode after the other, on the same converted checkpoint and the same data
(`bench/valuation.py`'s checkpoint, subprocess and random-Fisher helpers). Its step cost is the loop's
own per-step timing (`timing.json`): every micro-batch's forward, the policy's weights, the backward,
AlphaToken's refresh of G and scoring where the policy scores, gradient clipping and the optimizer
step. The ratios are of the steps' CPU time (`step_cpu_seconds`), which on a machine shared with other
jobs moves far less than their wall time (`step_seconds`, also printed): with one torch thread
(OMP_NUM_THREADS=1) it is the step's work. The first `--warmup-steps` steps are dropped; the median of
the others is reported, and its ratio to the plain SFT step (`full`).

Not in the step: what a run computes once before its first step. `setup` is the run's CPU time minus
its timed steps (data encoding, the run identity, the step-0 values, the final checkpoint's write), and
`setup beyond plain` subtracts plain SFT's, leaving the policy's own step-0 work: the reference model's
per-token losses over the training set (STM, Token Cleaning, Rho-1, XTF, ssToken, FLOW, the stratified
variant), FLOW's weights and dataset temperature, XTF's masks, the LoRA factors' Fisher (`alphatoken_lora`,
from `--fisher-prompts` sampled prompts). Those scale with the training set (`--global-batch` x
(`--warmup-steps` + `--steps`) sequences here), a step does not. Stages outside any run are not
measured: LESS's selection (its runs are plain SFT on the selected examples), Wise-FT's merge (after
training; its run is `wiseft.of`'s) and SePO's oracle (a DPO route).

The Fisher and reference of the scoring policies are random (`bench/valuation.py`): the proxy does the
arithmetic of a real Fisher cache. Token ids are random with the first quarter of every sequence as the
prompt and every sequence `--seq-len` tokens long, so every step trains the same number of tokens: the
cost of these computations does not depend on which tokens they are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]  # this checkout's alphatoken, and bench/valuation.py

import torch  # noqa: E402
from valuation import load_checkpoint, make_batch, maxrss_mb, reference_and_fisher, run_mode, save_embedded_checkpoint  # noqa: E402

from alphatoken.fisher import FisherConfig, FisherPrompts  # noqa: E402
from alphatoken.policies import PolicyConfig, get_policy  # noqa: E402
from alphatoken.train import TrainConfig, train_sft  # noqa: E402
from alphatoken.train.loop import TIMING  # noqa: E402
from alphatoken.valuation import ValuationConfig  # noqa: E402

# Every SFT policy of alphatoken.policies (tests/test_bench_policies.py checks that none is missing). The default
# run: plain SFT first (the baseline of the ratios), then the paper's SFT baselines and AlphaToken; `--modes all`
# adds AlphaToken's ablations and controls, which run AlphaToken's step with some terms switched off.
BASELINES = ("full", "random", "alphatoken", "stm", "token_cleaning", "rho1", "xtf", "sstoken", "talr", "flow", "lora",
             "alphatoken_lora")
ABLATIONS = ("adaptation_only", "stability_only", "direct_only", "causal_only", "no_fisher", "bottom", "soft",
             "alphatoken_stratified")
MODES = BASELINES + ABLATIONS
PLAIN = "full"


def examples(generator: torch.Generator, n: int, seq_len: int, vocab: int) -> list[dict]:
    """`n` pre-tokenised examples of exactly `seq_len` tokens, the first quarter the prompt (unlabelled)."""
    batch = make_batch(generator, n, seq_len, vocab)
    return [{"input_ids": ids.tolist(), "labels": labels.tolist()} for ids, labels in zip(batch["input_ids"], batch["labels"])]


def policy_config(args, mode: str) -> PolicyConfig:
    """The policy's defaults at ratio --rho; ssToken scores with its loss term from the first example (its
    attention-only warm-up, the first 10000 examples of an epoch by default, would cover every step here)."""
    extra = {"sstoken_attention_only_examples": 0} if mode == "sstoken" else {}
    return PolicyConfig(name=mode, rho=args.rho, **extra)


def run_policy(args, mode: str, model, tokenizer) -> dict:
    """One train_sft run of policy `mode`: its per-step seconds (timing.json) and what the run spent besides."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    n_steps = args.warmup_steps + args.steps
    train = examples(generator, args.global_batch * n_steps, args.seq_len, vocab)  # one epoch: n_steps steps
    val = examples(generator, args.val_batch, args.seq_len, vocab)
    policy = get_policy(mode)
    fisher = reference = fisher_prompts = None
    if policy.needs_scores and policy.adapter == "lora":  # the factors' Fisher, computed by the run at step 0
        prompts = [row["input_ids"][: args.seq_len // 4] for row in examples(generator, args.fisher_prompts,
                                                                             args.seq_len, vocab)]
        fisher_prompts = FisherPrompts(prompts, FisherConfig(last_k=args.last_k, max_new_tokens=args.fisher_new_tokens,
                                                             batch_size=args.fisher_prompts))
    elif policy.needs_scores:
        reference, fisher = reference_and_fisher(model, args.last_k, generator)
    config = TrainConfig(
        lr=1e-6, warmup_steps=0, micro_batch_size=args.micro_batch, grad_accum_steps=args.global_batch // args.micro_batch,
        max_steps=n_steps, max_length=args.seq_len, bf16=False, progress=False, policy=policy_config(args, mode),
        valuation=ValuationConfig(last_k=args.last_k, window=args.window, lam=1.5, signal=args.signal),
    )
    with tempfile.TemporaryDirectory() as out:
        began = time.process_time()
        train_sft(model, tokenizer, train, val, config, fisher=fisher, reference=reference, out_dir=out,
                  fisher_prompts=fisher_prompts)
        cpu = time.process_time() - began
        timing = json.loads((Path(out) / TIMING).read_text())
    steps, wall = timing["step_cpu_seconds"], timing["step_seconds"]
    measured = steps[args.warmup_steps:]
    print(f"[{mode}] steps {', '.join(f'{s:.2f}' for s in steps)} CPU s, {', '.join(f'{s:.2f}' for s in wall)} wall s "
          f"(first {args.warmup_steps} warm-up)", file=sys.stderr, flush=True)
    return {"step": statistics.median(measured), "min": min(measured), "max": max(measured), "steps_timed": len(measured),
            "wall": statistics.median(wall[args.warmup_steps:]), "setup": cpu - sum(steps), "threads": timing["threads"]}


def worker(args) -> None:
    model, tokenizer = load_checkpoint(args.checkpoint, args.threads)
    loaded = maxrss_mb()
    result = run_policy(args, args.worker, model, tokenizer)
    result.update(mode=args.worker, peak_mb=maxrss_mb() - loaded)
    print(json.dumps(result), flush=True)


def table(args, results: dict, began: str) -> str:
    """The markdown table of the run: seconds per step, ratio to plain SFT, setup, peak RSS growth."""
    base = results.get(PLAIN)
    lines = [
        f"SmolLM2-135M-Instruct, CPU float32, {args.threads} torch thread(s), load {os.getloadavg()[0]:.2f} (1-min "
        f"average at the end), {began} to {time.strftime('%H:%M UTC', time.gmtime())}; {args.global_batch} sequences "
        f"x {args.seq_len} tokens per step in micro-batches of {args.micro_batch}, rho={args.rho}; scoring: K="
        f"{args.last_k} W={args.window} signal={args.signal}, B_val={args.val_batch} refreshed every step; median of "
        f"{args.steps} step(s) after {args.warmup_steps} warm-up step(s)",
        "",
        "| policy | CPU s / step | min - max | ratio to plain SFT | beyond plain s / step | wall s / step | setup CPU s | "
        "setup beyond plain s | peak RSS growth MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, r in results.items():
        ratio = f"{r['step'] / base['step']:.2f}x" if base else "-"
        extra = f"{r['step'] - base['step']:+.2f}" if base and mode != PLAIN else ""
        beyond = f"{r['setup'] - base['setup']:+.1f}" if base and mode != PLAIN else ""
        lines.append(f"| `{mode}` | {r['step']:.2f} | {r['min']:.2f} - {r['max']:.2f} | {ratio} | {extra} | "
                     f"{r['wall']:.2f} | {r['setup']:.1f} | {beyond} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=2, help="sequences per optimizer step (paper: 64)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per forward/backward")
    parser.add_argument("--val-batch", type=int, default=2, help="validation sequences in G (paper B_val: 32)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--last-k", type=int, default=3, help="K: scored blocks (paper: 3)")
    parser.add_argument("--window", type=int, default=32, help="W: causal band (paper: 32)")
    parser.add_argument("--signal", default="self", help="valuation signal (params.yaml: self)")
    parser.add_argument("--rho", type=float, default=0.5, help="kept-token ratio (paper: 0.5)")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per mode (median)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--fisher-prompts", type=int, default=2, help="alphatoken_lora: prompts of its step-0 Fisher")
    parser.add_argument("--fisher-new-tokens", type=int, default=16, help="alphatoken_lora: tokens sampled per prompt")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--modes", default=",".join(BASELINES), help="comma-separated subset of " + ",".join(MODES)
                        + "; all: every one")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    modes = list(MODES) if args.modes == "all" else args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: {unknown} are not SFT policies of the bench ({', '.join(MODES)})")
    if args.global_batch % args.micro_batch:
        parser.error(f"--global-batch {args.global_batch} is not a multiple of --micro-batch {args.micro_batch}")
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        save_embedded_checkpoint(tmp)
        results = {}
        for mode in modes:
            results[mode] = run_mode(args, mode, tmp, script=__file__)
    print()
    print(table(args, results, began))


if __name__ == "__main__":
    main()
