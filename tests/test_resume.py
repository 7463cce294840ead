"""Resume after a kill: a training run killed with SIGKILL right after a checkpoint (or preempted
with SIGUSR1, as SLURM does before a time limit) and restarted with the same command ends with
weights bit-identical to an uninterrupted run. Each run is its own Python process on CPU."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = r'''
import json, os, signal, sys
import torch
import alphatoken.train.loop as loop
from alphatoken.models import build_tiny_model, byte_tokenizer
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, train_sft

out, policy, kill_after, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
save_checkpoint = loop.save_checkpoint

def save_then_signal(directory, model, optimizer, scheduler, step, extra=None):
    path = save_checkpoint(directory, model, optimizer, scheduler, step, extra)
    if step == kill_after:
        os.kill(os.getpid(), getattr(signal, how))  # SIGKILL: dies here; SIGUSR1: stops after this step
    return path

loop.save_checkpoint = save_then_signal
examples = [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(16)]
config = TrainConfig(output_dir=out, lr=1e-3, micro_batch_size=2, grad_accum_steps=2, max_steps=5, warmup_steps=1,
                     checkpoint_every=1, policy=PolicyConfig(name=policy, rho=0.5), progress=False, max_length=64)
result = train_sft(build_tiny_model("llama", dtype=torch.float32), byte_tokenizer(), examples[2:], examples[:2], config)
if result.preempted:
    print(json.dumps({"preempted": True, "steps": result.steps}))
else:
    torch.save(result.model.state_dict(), os.path.join(out, "weights.pt"))
    print(json.dumps({"preempted": False, "steps": result.steps}))
'''


def run(tmp_path: Path, out: Path, policy: str, kill_after: int = -1, how: str = "SIGKILL") -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.run([sys.executable, str(script), str(out), policy, str(kill_after), how],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def final_weights(out: Path) -> dict:
    return torch.load(out / "weights.pt", weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """Final weights of uninterrupted runs, per policy (computed once)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    weights = {}
    for policy in ("random", "alphatoken"):
        done = run(tmp_path, tmp_path / policy, policy)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"preempted": False, "steps": 5}
        weights[policy] = final_weights(tmp_path / policy)
    return weights


def test_sigkill_then_rerun_gives_identical_weights(tmp_path, straight):
    """AlphaToken policy: the valuer, the reference weights and the data order survive the kill."""
    killed = run(tmp_path, tmp_path / "killed", "alphatoken", kill_after=2, how="SIGKILL")
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed: rc={killed.returncode}\n{killed.stderr[-2000:]}"
    assert not (tmp_path / "killed" / "weights.pt").exists()
    state = torch.load(tmp_path / "killed" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2

    resumed = run(tmp_path, tmp_path / "killed", "alphatoken")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"preempted": False, "steps": 5}
    assert_identical(final_weights(tmp_path / "killed"), straight["alphatoken"])


def test_sigusr1_checkpoints_stops_and_resumes(tmp_path, straight):
    """Random policy: the RNG state is part of the checkpoint."""
    preempted = run(tmp_path, tmp_path / "preempted", "random", kill_after=1, how="SIGUSR1")
    assert preempted.returncode == 0, preempted.stderr[-2000:]
    report = json.loads(preempted.stdout.strip().splitlines()[-1])
    assert report["preempted"] is True and report["steps"] < 5, report
    state = torch.load(tmp_path / "preempted" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == report["steps"]

    resumed = run(tmp_path, tmp_path / "preempted", "random")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_identical(final_weights(tmp_path / "preempted"), straight["random"])
