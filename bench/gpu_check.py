"""GPU check of the valuation, FSDP2 and the step cost, one command on a CUDA machine.

    python bench/gpu_check.py              # every visible GPU; a few minutes on an A100
    python bench/gpu_check.py --quick      # smaller sizes, to check the script itself

1. precision: the token values of a small Llama-style model (random weights from a config, no download)
   on CUDA in float32 and with the training forward under bf16 autocast, against the float64 CPU
   reference of the same weights. bf16 cannot meet the 1e-6 of the exactness tests, so it prints the
   Spearman rank correlation of the values over the batch's response tokens, the top-rho overlap
   (|top(a) & top(ref)| / |top(ref)|, rho = 0.5, against about 0.5 for a random choice) and the largest
   relative error. The path is the training loop's: `capture(share_head=True)` around the (autocast)
   forward, `score_captured` after it, G from `set_validation` outside autocast.
2. fsdp: one process per visible GPU (NCCL), every decoder block but the last K sharded with
   `fully_shard` (`alphatoken.train.distributed.shard_blocks`); each rank scores its rows of a batch,
   with G of the whole validation batch and with G from each rank's share
   (`set_validation_across_ranks`); the largest relative error against the one-process scores
   (float32: about 1e-6 is rounding). Needs at least 2 GPUs.
3. step cost: one optimizer step of plain SFT and of AlphaToken (the same masked-loss step with the
   valuation: G refreshed every step, every micro-batch scored and masked to the top rho) at the
   paper's step, 64 x 1,024 tokens in micro-batches of 8, K=3, W=32, B_val=32, on a ~1.1B Llama-style
   model (TinyLlama's shape, random weights) on one GPU under bf16 autocast with sdpa attention;
   median seconds of the measured steps (after warm-up steps, `torch.cuda.synchronize` around each),
   their ratio, and the peak memory of each (`torch.cuda.max_memory_allocated`).

Without CUDA it says so and runs part 1 on the CPU (float32 and bf16 autocast against float64: a
check of this script, not a GPU figure), skips parts 2 and 3 (tests/test_fsdp_valuation.py checks the
sharded scores on CPU with gloo; bench/valuation.py measures the step ratio on CPU), and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from valuation import make_batch, reference_and_fisher, split  # noqa: E402  (bench/valuation.py)

from alphatoken.losses import loss_positions, masked_sft_loss, to_loss_positions, token_nll, top_rho_mask  # noqa: E402
from alphatoken.valuation import TokenValuer, ValuationConfig  # noqa: E402

RHO = 0.5


def llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, max_len: int,
          dtype: torch.dtype, seed: int = 0):
    """A Llama-style causal LM with random weights (seeded), sdpa attention, dropout off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    return model.train()


def small_model(dtype: torch.dtype):
    return llama(vocab=2048, hidden=256, intermediate=688, layers=6, heads=8, kv_heads=4, max_len=512, dtype=dtype)


def captured_values(valuer: TokenValuer, model, batch: dict, autocast) -> torch.Tensor:
    """Label-aligned total values (B, T) by the training loop's path."""
    with autocast, valuer.capture(share_head=True):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    token_loss = token_nll(logits, batch["labels"])  # (B, T-1)
    values = valuer.score_captured(batch, token_loss, components=False).total
    valuer.backward(token_loss.sum(), token_loss)  # release the graph as the loop does
    return values.detach()


def agreement(values: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    valid = loss_positions(labels)  # (B, T-1)
    a = to_loss_positions(values.double().cpu())[valid]
    b = to_loss_positions(reference.double().cpu())[valid]
    top_a = top_rho_mask(to_loss_positions(values.double().cpu()), valid, RHO)[valid]
    top_b = top_rho_mask(to_loss_positions(reference.double().cpu()), valid, RHO)[valid]
    return {"spearman": float(spearmanr(a.numpy(), b.numpy()).statistic),
            "top_overlap": float((top_a & top_b).sum() / top_b.sum()),
            "max_rel_err": float((a - b).abs().max() / b.abs().max())}


def precision(device: torch.device, args) -> None:
    generator = torch.Generator().manual_seed(0)
    reference_model = small_model(torch.float64)
    config = ValuationConfig(last_k=3, window=32, lam=1.5)
    reference, fisher = reference_and_fisher(reference_model, config.last_k, generator)
    n, seq_len = (4, 128) if args.quick else (8, 512)
    val = make_batch(generator, 8, seq_len, 2048)
    batch = make_batch(generator, n, seq_len, 2048)
    ref_valuer = TokenValuer(reference_model, config, fisher=fisher, reference=reference)
    ref_valuer.set_validation(val)
    expected = captured_values(ref_valuer, reference_model, batch, contextlib.nullcontext())
    print(f"precision: {n} x {seq_len} tokens, 6 blocks (K=3, W=32), against float64 on the CPU")
    for label, amp in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        model = copy.deepcopy(reference_model).float().to(device)
        f32 = {k: v.float().to(device) for k, v in fisher.items()}
        ref32 = {k: v.float().to(device) for k, v in reference.items()}
        valuer = TokenValuer(model, config, fisher=f32, reference=ref32)
        valuer.set_validation({k: v.to(device) for k, v in val.items()})
        autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        got = captured_values(valuer, model, {k: v.to(device) for k, v in batch.items()}, autocast)
        figures = agreement(got, expected, batch["labels"])
        print(f"  {device.type} {label:14s} spearman {figures['spearman']:.6f}  top-{RHO:g} overlap "
              f"{figures['top_overlap']:.4f}  max rel err {figures['max_rel_err']:.2e}")


def _fsdp_worker(rank: int, world: int, port: int, args) -> None:
    from alphatoken.train.distributed import set_validation_across_ranks, shard_blocks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    generator = torch.Generator().manual_seed(0)
    model = small_model(torch.float32).to(device)
    config = ValuationConfig(last_k=3, window=32, lam=1.5)
    reference, fisher = reference_and_fisher(model, config.last_k, generator)
    seq_len = 128 if args.quick else 512
    val = {k: v.to(device) for k, v in make_batch(generator, 2 * world, seq_len, 2048).items()}
    batch = {k: v.to(device) for k, v in make_batch(generator, 2 * world, seq_len, 2048).items()}
    rows = slice(2 * rank, 2 * rank + 2)
    mine = {k: v[rows] for k, v in batch.items()}
    single = TokenValuer(copy.deepcopy(model), config, fisher=fisher, reference=reference)
    single.set_validation(val)
    expected = single.score(batch, components=False).total[rows]
    shard_blocks(model, config.last_k)
    valuer = TokenValuer(model, config, fisher=fisher, reference=reference)
    valuer.set_validation(val)
    whole_g = valuer.score(mine, components=False).total
    set_validation_across_ranks(valuer, val)
    split_g = valuer.score(mine, components=False).total
    errors = torch.tensor([float((whole_g - expected).norm() / expected.norm()),
                           float((split_g - expected).norm() / expected.norm())], device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"fsdp: {world} GPUs, blocks 0-2 of 6 sharded, float32: relative error of the scores "
              f"{errors[0]:.2e} (G of the whole validation batch), {errors[1]:.2e} (G from each rank's share)")
    dist.destroy_process_group()


def fsdp(args) -> None:
    world = torch.cuda.device_count()
    if world < 2:
        print(f"fsdp: skipped, {world} GPU visible (needs 2 or more)")
        return
    mp.spawn(_fsdp_worker, args=(world, args.port, args), nprocs=world, join=True)


def step_seconds(model, valuer, args, device, autocast) -> tuple[float, float]:
    """Median seconds of the measured optimizer steps, and the peak memory (GiB)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    val = {k: v.to(device) for k, v in make_batch(generator, args.val_batch, args.seq_len, vocab).items()}
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup_steps + args.steps):
        batch = {k: v.to(device) for k, v in make_batch(generator, args.global_batch, args.seq_len, vocab).items()}
        n_tokens = int(loss_positions(batch["labels"]).sum())
        torch.cuda.synchronize(device)
        began = time.perf_counter()
        if valuer is not None:
            valuer.set_validation(val)
        for mb in split(batch, args.micro_batch):
            capture = valuer.capture(share_head=True) if valuer is not None else contextlib.nullcontext()
            with autocast, capture:
                logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits
            token_loss = token_nll(logits, mb["labels"])  # (b, T-1)
            valid = loss_positions(mb["labels"])
            if valuer is None:
                weights = valid.float()
            else:
                scores = valuer.score_captured(mb, token_loss, components=False)
                weights = top_rho_mask(to_loss_positions(scores.total), valid, RHO).float()
            loss = masked_sft_loss(token_loss, weights, normalizer=n_tokens)
            valuer.backward(loss, token_loss) if valuer is not None else loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - began)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) / 1024**3


def step_cost(args) -> None:
    device = torch.device("cuda", 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    shape = (dict(vocab=32000, hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4) if args.quick else
             dict(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4))  # TinyLlama-1.1B
    figures = {}
    for mode in ("plain", "alphatoken"):
        model = llama(**shape, max_len=args.seq_len, dtype=torch.float32).to(device)
        valuer = None
        if mode == "alphatoken":
            reference, fisher = reference_and_fisher(model, args.last_k, generator)
            valuer = TokenValuer(model, ValuationConfig(last_k=args.last_k, window=args.window, lam=1.5),
                                 fisher=fisher, reference=reference)
        figures[mode] = step_seconds(model, valuer, args, device, autocast)
        del model, valuer
        torch.cuda.empty_cache()
    n_params = sum(p.numel() for p in llama(**shape, max_len=args.seq_len, dtype=torch.float32).parameters())
    print(f"step cost: {n_params / 1e9:.2f}B parameters, {args.global_batch} x {args.seq_len} tokens in micro-batches of "
          f"{args.micro_batch}, K={args.last_k}, W={args.window}, B_val={args.val_batch}, bf16 autocast, "
          f"{torch.cuda.get_device_name(device)}; median of {args.steps} steps")
    for mode, (seconds, peak) in figures.items():
        print(f"  {mode:10s} {seconds:8.3f} s/step  peak {peak:6.2f} GiB")
    print(f"  ratio alphatoken / plain: {figures['alphatoken'][0] / figures['plain'][0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (checks the script)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--val-batch", type=int, default=32)
    parser.add_argument("--last-k", type=int, default=3)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per mode (median)")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--port", type=int, default=29511, help="rendezvous port of the FSDP2 check")
    args = parser.parse_args()
    if args.quick:
        args.global_batch, args.micro_batch, args.seq_len, args.val_batch = 8, 4, 256, 4
    if not torch.cuda.is_available():
        print("no CUDA GPU found: part 1 runs on the CPU (a check of this script, not a GPU figure); "
              "parts 2 and 3 are skipped (tests/test_fsdp_valuation.py, bench/valuation.py cover them on CPU)")
        precision(torch.device("cpu"), args)
        return
    print(f"{torch.cuda.device_count()} CUDA GPU(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    precision(torch.device("cuda", 0), args)
    fsdp(args)
    step_cost(args)


if __name__ == "__main__":
    main()
