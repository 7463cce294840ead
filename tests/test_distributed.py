"""Two CPU processes (torchrun, gloo backend) train to the same weights as one process on the same
global batch: 2 ranks x 1 micro-batch of 2 vs 1 rank x 2 accumulated micro-batches of 2.

Why they agree: both split an optimizer step's examples into the same micro-batches (rank r takes
micro-batches r, r + world, ...), gradients are summed over micro-batches (across ranks by an
all-reduce) and divided by the step's kept-token count summed the same way; token masks are computed
per micro-batch, so per rank per micro-batch; every rank computes the validation gradient on the
same validation batch, so its cross-rank average is that gradient. Only the order of the sums
differs (and Hugging Face RMSNorm rounds in float32 even in float64 models), and AdamW's
m / (sqrt(v) + eps) amplifies that rounding where a gradient is ~0, hence eps = 1e-5 and the 1e-6
relative tolerance (as in tests/test_train.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = r'''
import json, os, sys
import torch
import torch.distributed as dist
from alphatoken.models import build_tiny_model, byte_tokenizer
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, train_sft

out, policy, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
examples = [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(18)]
config = TrainConfig(output_dir=out, lr=1e-3, micro_batch_size=2, grad_accum_steps=accum, max_steps=3, warmup_steps=1, adam_eps=1e-5,
                     policy=PolicyConfig(name=policy, rho=0.5), progress=False, max_length=64)
result = train_sft(build_tiny_model("llama"), byte_tokenizer(), examples[2:], examples[:2], config)
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save(result.model.state_dict(), os.path.join(out, "weights.pt"))
    print(json.dumps({"world_size": result.metrics.get("world_size"), "steps": result.steps}))
if dist.is_initialized():
    dist.destroy_process_group()
'''

BIN = Path(sys.executable).parent


def train(tmp_path: Path, name: str, policy: str, world: int) -> tuple[dict, dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / name
    accum = 2 // world  # the same global batch of 4 examples
    if world == 1:
        cmd = [sys.executable, str(script), str(out), policy, str(accum)]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={world}", str(script), str(out), policy, str(accum)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return torch.load(out / "weights.pt", weights_only=True), report


@pytest.mark.parametrize("policy", ["full", "alphatoken"])
def test_two_gloo_ranks_equal_one_process(tmp_path, policy):
    single, single_report = train(tmp_path, "single", policy, world=1)
    double, double_report = train(tmp_path, "double", policy, world=2)
    assert single_report == {"world_size": 1, "steps": 3}
    assert double_report == {"world_size": 2, "steps": 3}
    initial = build_initial()
    moved = [k for k in single if not torch.equal(single[k], initial[k])]
    assert moved, "training did not change the weights"
    for key in single:
        scale = single[key].abs().max().clamp_min(1e-12)
        err = float((double[key] - single[key]).abs().max() / scale)
        assert err <= 1e-6, f"{policy}: {key} differs between 2 ranks and 1 process by {err:.2e} (relative)"


def build_initial() -> dict:
    from alphatoken.models import build_tiny_model

    return build_tiny_model("llama").state_dict()
