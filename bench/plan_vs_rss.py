"""The memory planner's estimate against the measured peak memory of a CPU training run of the embedded model.

    OMP_NUM_THREADS=1 python bench/plan_vs_rss.py [--steps 3 --micro-batch 2 --seq-len 256 --policy full]

Loads the embedded SmolLM2-135M-Instruct (float32, sdpa), records the process's maximum resident set size
(`ru_maxrss`), trains `--steps` optimizer steps of plain SFT (policy `full`, every sequence truncated to
`--seq-len` tokens, no gradient checkpointing, fp32: bf16 autocast is CUDA only), and prints the planner's
estimate of what training adds on top of the loaded weights (gradients + AdamW state + activations, one
process: `alphatoken.plan.estimate` under ddp on 1 GPU), the measured growth of the peak RSS, and their ratio.
RSS also holds the allocator's caches and the Python objects of the run, so the ratio says how far the
planner's arithmetic is from what a real run held, not that either is exact.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alphatoken.models import ModelSpec, load_model  # noqa: E402
from alphatoken.plan import Run, estimate, shape_of_model  # noqa: E402
from alphatoken.policies import PolicyConfig  # noqa: E402
from alphatoken.train import TrainConfig, train_sft  # noqa: E402


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = load_model(ModelSpec(source="embedded", dtype="float32", attn_implementation="sdpa"))
    words = " ".join(f"w{i}" for i in range(4 * args.seq_len))  # longer than seq-len tokens: every sequence is full
    examples = [{"prompt": f"question {i}", "response": words} for i in range(args.micro_batch * args.steps)]
    before = peak_rss_bytes()
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, micro_batch_size=args.micro_batch, grad_accum_steps=1,
                             max_steps=args.steps, max_length=args.seq_len, bf16=False, progress=False,
                             policy=PolicyConfig(name="full"), warmup_steps=0)
        train_sft(model, tokenizer, examples, None, config, out_dir=out)
    measured = peak_rss_bytes() - before
    run = Run("train", "train", args.micro_batch, args.seq_len, "float32", False, False, "sdpa", False, 3, 32, 1, "ddp")
    plan = estimate(shape_of_model(model), run)
    added = plan["total"] - plan["weights"]
    print(json.dumps({"plan_bytes": {k: v for k, v in plan.items()}, "plan_added_bytes": added,
                      "measured_peak_rss_growth_bytes": measured, "ratio_plan_over_measured": added / measured}))
    print(f"planner: {added / 2**20:.0f} MiB added by training (gradients {plan['gradients'] / 2**20:.0f}, AdamW "
          f"{plan['optimizer'] / 2**20:.0f}, activations {plan['activations'] / 2**20:.0f}); measured peak RSS growth "
          f"{measured / 2**20:.0f} MiB; ratio {added / measured:.2f}")


if __name__ == "__main__":
    main()
