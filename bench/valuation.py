"""Cost of AlphaToken scoring on SmolLM2-135M-Instruct, measured side by side in one run.

    python bench/valuation.py                      # small default sizes, a few minutes on 2 CPU cores
    python bench/valuation.py --global-batch 64 --micro-batch 8 --val-batch 32 --seq-len 256   # the paper's step

Every mode runs in its own subprocess on the same converted checkpoint (so peak memory is the
resident-set growth of that mode alone), one after the other, and prints one JSON line; the parent
prints the table and the ratios:

1. `plain`: a plain SFT optimizer step (global batch, micro-batches with gradient accumulation).
   `alpha-self` / `alpha-total`: the same step with AlphaToken at the given K, W: the validation
   gradient G refreshed once per optimizer step (`--refresh-every r` refreshes it every r steps and
   is reported on its own), every micro-batch observed with `valuer.capture(share_head=True)`, scored
   with `score_captured`, masked to the top rho of Phi, then the masked loss's `valuer.backward`
   (as the training loop does: the head-input gradient from scoring is reused).
2. `score`: `TokenValuer.score` of one sequence of `--naive-seq-len` tokens (all four components)
   against `naive`: the per-token autograd loop (one forward, then for each response position p the
   grad of l_p w.r.t. the scored weights, then <grad, G> + lam <grad, P>). The loop is timed on
   `--naive-positions` positions and extrapolated linearly to all positions (printed as such).
   Both start with the same model forward; the figures are given end to end and also beyond that
   forward (what each adds to a training step, which runs the forward anyway): for `score` that is
   `score_captured` on the observed training forward, total only, as the training loop calls it.
3. Peak memory: growth of the process's maximum resident set size (`ru_maxrss`) from after the model
   is loaded to the end of the mode: what the mode adds on top of the weights (CPU RAM).

Token ids are random (uniform over the vocabulary) with the first quarter of each sequence as the
prompt: the cost of these computations does not depend on which tokens they are.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from alphatoken.blocks import scored_linears
from alphatoken.losses import loss_positions, masked_sft_loss, to_loss_positions, token_nll, top_rho_mask
from alphatoken.models import ModelSpec, load_model, save_pretrained
from alphatoken.valuation import TokenValuer, ValuationConfig

MODES = ("plain", "alpha-total", "alpha-self", "score", "naive")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def make_batch(generator: torch.Generator, n: int, seq_len: int, vocab: int) -> dict:
    input_ids = torch.randint(0, vocab, (n, seq_len), generator=generator)  # (n, T)
    labels = input_ids.clone()
    labels[:, : seq_len // 4] = -100  # the prompt
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def split(batch: dict, size: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def reference_and_fisher(model, last_k: int, generator: torch.Generator) -> tuple[dict, dict]:
    """A reference equal to the weights moved by a small random step, and a positive diagonal Fisher:
    the proxy term then does the same arithmetic as with a real Fisher cache."""
    reference, fisher = {}, {}
    for name, linear in scored_linears(model, last_k).items():
        w = linear.weight.detach()
        reference[name] = w - 1e-3 * torch.randn(w.shape, generator=generator, dtype=w.dtype)
        fisher[name] = torch.rand(w.shape, generator=generator, dtype=w.dtype)
    return reference, fisher


def timed(fn):
    began = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - began


def run_training(args, mode: str, model) -> dict:
    """Optimizer steps of `mode`; returns the median seconds of each part over the measured steps."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    valuer = None
    if mode != "plain":
        reference, fisher = reference_and_fisher(model, args.last_k, generator)
        config = ValuationConfig(last_k=args.last_k, window=args.window, lam=1.5, signal=mode.removeprefix("alpha-"))
        valuer = TokenValuer(model, config, fisher=fisher, reference=reference)
        val_batch = make_batch(generator, args.val_batch, args.seq_len, vocab)
    parts = {"forward_backward": [], "refresh": [], "scoring": [], "optimizer": [], "step": []}
    for step in range(args.warmup_steps + args.steps):
        batch = make_batch(generator, args.global_batch, args.seq_len, vocab)
        micro = split(batch, args.micro_batch)
        n_tokens = int(loss_positions(batch["labels"]).sum())
        t = dict.fromkeys(parts, 0.0)
        began = time.perf_counter()
        if valuer is not None and step % args.refresh_every == 0:
            _, t["refresh"] = timed(lambda: valuer.set_validation(val_batch))
        for mb in micro:
            t0 = time.perf_counter()
            if valuer is None:
                out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
                token_loss = token_nll(out.logits, mb["labels"])  # (b, T-1)
                weights = loss_positions(mb["labels"]).float()
                t1 = t2 = time.perf_counter()
            else:
                with valuer.capture(share_head=True):
                    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
                token_loss = token_nll(out.logits, mb["labels"])  # (b, T-1)
                t1 = time.perf_counter()
                scores = valuer.score_captured(mb, token_loss, components=False)  # as the training loop does
                weights = top_rho_mask(to_loss_positions(scores.total), loss_positions(mb["labels"]), args.rho).float()
                t2 = time.perf_counter()
            loss = masked_sft_loss(token_loss, weights, normalizer=n_tokens)
            valuer.backward(loss, token_loss) if valuer is not None else loss.backward()  # as the training loop does
            t3 = time.perf_counter()
            t["forward_backward"] += (t1 - t0) + (t3 - t2)
            t["scoring"] += t2 - t1
        _, t["optimizer"] = timed(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
        t["step"] = time.perf_counter() - began
        if step >= args.warmup_steps:
            for key in parts:
                parts[key].append(t[key])
        print(f"[{mode}] step {step} ({'warm-up' if step < args.warmup_steps else 'measured'}): {t['step']:.2f} s",
              file=sys.stderr, flush=True)
    return {key: statistics.median(values) for key, values in parts.items()}


def run_scoring(args, mode: str, model) -> dict:
    """`score` of one long sequence, or the naive per-token loop on a subset of its positions."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    reference, fisher = reference_and_fisher(model, args.last_k, generator)
    config = ValuationConfig(last_k=args.last_k, window=args.window, lam=1.5, signal="self")
    valuer = TokenValuer(model, config, fisher=fisher, reference=reference)
    valuer.set_validation(make_batch(generator, args.val_batch, args.naive_seq_len, vocab))
    batch = make_batch(generator, 1, args.naive_seq_len, vocab)
    n_positions = int(loss_positions(batch["labels"]).sum())
    if mode == "score":
        valuer.score(batch)  # warm-up
        _, seconds = timed(lambda: valuer.score(batch))

        def captured():
            with valuer.capture():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            token_loss = token_nll(out.logits, batch["labels"])  # (1, T-1)
            _, scoring = timed(lambda: valuer.score_captured(batch, token_loss, components=False))
            return scoring

        captured()  # warm-up
        return {"seconds": seconds, "beyond_forward": captured(), "positions": n_positions, "measured_positions": n_positions}
    # naive: explicit G and P, then one autograd call per position
    linears = scored_linears(model, args.last_k)
    params = [linear.weight for linear in linears.values()]
    target = {}
    for name, linear in linears.items():
        direction = valuer._target[name]
        target[name] = direction.matrix if direction.form == "contract" else direction.val_e.T @ direction.val_x
    proxy = valuer._proxy
    positions = loss_positions(batch["labels"])[0].nonzero().squeeze(1)  # (n_positions,)
    measured = positions[torch.linspace(0, len(positions) - 1, args.naive_positions).long()]

    def forward():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return token_nll(out.logits, batch["labels"])[0]  # (T-1,)

    def loop(token_loss):
        values = []
        for p in measured.tolist():
            grads = torch.autograd.grad(token_loss[p], params, retain_graph=True)
            values.append(sum(float((g * target[n]).sum() + 1.5 * (g * proxy[n]).sum()) for g, n in zip(grads, linears)))
        return values

    torch.autograd.grad(forward()[int(measured[0])], params)  # warm-up: one position
    token_loss, forward_seconds = timed(forward)
    _, loop_seconds = timed(lambda: loop(token_loss))
    beyond = loop_seconds * n_positions / len(measured)
    return {"seconds": forward_seconds + beyond, "beyond_forward": beyond,
            "measured_seconds": forward_seconds + loop_seconds, "positions": n_positions,
            "measured_positions": len(measured)}


def load_checkpoint(checkpoint: str, threads: int):
    """(model, tokenizer) of the converted checkpoint in a mode's subprocess: float32, sdpa, train mode with
    dropout off (the same arithmetic in every mode), `threads` torch threads."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model, tokenizer = load_model(ModelSpec(source="hub", name_or_path=checkpoint, dtype="float32",
                                            attn_implementation="sdpa"))
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer


def save_embedded_checkpoint(path: str) -> None:
    """The embedded SmolLM2-135M-Instruct as a safetensors checkpoint in `path`, which every mode loads."""
    print("converting the embedded SmolLM2-135M-Instruct to a safetensors checkpoint ...", file=sys.stderr)
    model, tokenizer = load_model(ModelSpec(source="embedded", dtype="float32"))
    save_pretrained(model, tokenizer, path)


def worker(args) -> None:
    model, _ = load_checkpoint(args.checkpoint, args.threads)
    loaded = maxrss_mb()
    if args.worker in ("score", "naive"):
        result = run_scoring(args, args.worker, model)
    else:
        result = run_training(args, args.worker, model)
    result.update(mode=args.worker, peak_mb=maxrss_mb() - loaded, weights_mb=loaded)
    print(json.dumps(result), flush=True)


def run_mode(args, mode: str, checkpoint: str, script: str = __file__) -> dict:
    """Mode `mode` of `script` in its own subprocess (the parent's flags passed on): its last stdout line, a JSON object."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "checkpoint", "modes")]
    cmd = [sys.executable, script, "--worker", mode, "--checkpoint", checkpoint, *flags]
    print(f"== {mode}", file=sys.stderr, flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (paper: 64)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    parser.add_argument("--val-batch", type=int, default=4, help="validation sequences in G (paper B_val: 32)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--last-k", type=int, default=3, help="K: scored blocks (paper: 3)")
    parser.add_argument("--window", type=int, default=32, help="W: causal band (paper: 32)")
    parser.add_argument("--rho", type=float, default=0.6, help="kept-token ratio")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per mode (median)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--refresh-every", type=int, default=1, help="r: refresh G every r steps (paper: 1)")
    parser.add_argument("--naive-seq-len", type=int, default=256, help="T of the scoring comparison")
    parser.add_argument("--naive-positions", type=int, default=8, help="positions the naive loop is timed on")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        save_embedded_checkpoint(tmp)
        results = {mode: run_mode(args, mode, tmp) for mode in modes}

    print(f"\nSmolLM2-135M-Instruct, CPU float32, {args.threads} threads, load {os.getloadavg()[0]:.2f} "
          f"(1-min average at the end); K={args.last_k} W={args.window} rho={args.rho}")
    print(f"training step: {args.global_batch} sequences x {args.seq_len} tokens in micro-batches of "
          f"{args.micro_batch}; validation batch {args.val_batch}, refreshed every {args.refresh_every} step(s); "
          f"median of {args.steps} step(s)")
    header = f"{'mode':<12} {'step s':>8} {'fwd+bwd s':>10} {'refresh s':>10} {'scoring s':>10} {'optim s':>8} {'ratio':>7} {'peak MB':>8}"
    training = [m for m in ("plain", "alpha-total", "alpha-self") if m in results]
    if training:
        print(header)
        base = results["plain"]["step"] if "plain" in results else None
        for mode in training:
            r = results[mode]
            ratio = f"{r['step'] / base:.2f}x" if base else "-"
            print(f"{mode:<12} {r['step']:>8.2f} {r['forward_backward']:>10.2f} {r['refresh']:>10.2f} "
                  f"{r['scoring']:>10.2f} {r['optimizer']:>8.2f} {ratio:>7} {r['peak_mb']:>8.0f}")
            if base and mode != "plain":
                rest = (r["step"] - r["refresh"]) / base
                print(f"{'':<12} without the refresh of G: {rest:.2f}x (refresh alone: {r['refresh'] / base:.2f}x "
                      f"of a plain step)")
    if "score" in results and "naive" in results:
        s, n = results["score"], results["naive"]
        print(f"\nscoring one sequence of {args.naive_seq_len} tokens ({s['positions']} response positions), signal self:")
        print(f"  TokenValuer.score        {s['seconds']:>9.2f} s   peak +{s['peak_mb']:.0f} MB")
        print(f"  naive per-token autograd {n['seconds']:>9.2f} s   peak +{n['peak_mb']:.0f} MB   "
              f"(one forward + {n['measured_positions']} per-position backwards timed: {n['measured_seconds']:.2f} s; "
              f"the backwards extrapolated linearly to all positions)")
        print(f"  speed-up {n['seconds'] / s['seconds']:.0f}x end to end (both include one model forward)")
        print(f"  beyond the forward: score_captured (total only) {s['beyond_forward']:.3f} s vs the naive loop "
              f"{n['beyond_forward']:.2f} s: {n['beyond_forward'] / s['beyond_forward']:.0f}x")


if __name__ == "__main__":
    main()
