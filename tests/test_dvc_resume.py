"""Resuming under DVC: the training stages' outputs are `persist: true` in the generated dvc.yaml
(DVC otherwise deletes a stage's outputs before rerunning it, checkpoint included), and a `dvc repro`
killed with SIGKILL in the middle of training resumes from the run's checkpoint on the next `dvc
repro`, ending with the weights of an uninterrupted run. The pipeline defaults checkpoint often
enough that a kill loses a bounded number of steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN_MODULE = "python -m alphatoken.stages.train "


def persisted(stage: dict) -> list[str]:
    return [next(iter(out)) for out in stage["outs"] if isinstance(out, dict) and next(iter(out.values())).get("persist")]


def test_training_stages_persist_their_run_directories(tmp_path):
    """Every stage running alphatoken.stages.train (train; warmstart_sft and train_dpo on the DPO route)
    keeps its run directory across reruns; no other output persists."""
    default = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert default["train"]["outs"] == [{"results/train/${item.method}-${item.seed}": {"persist": True}}]
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Snakefile", "params.yaml", "dvc.yaml", "workflow", "profiles", "configs", "alphatoken"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, repo / name)
    done = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use", "configs/smoke.yaml",
                           "--root", str(repo)], capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    both_routes = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name, stage in {**default, **both_routes}.items():
        runs_training = stage["cmd"].startswith(TRAIN_MODULE)
        assert persisted(stage) == ([next(iter(stage["outs"][0]))] if runs_training else []), name
    assert {n for n, s in both_routes.items() if persisted(s)} == {"train", "warmstart_sft", "train_dpo"}


def test_pipeline_defaults_checkpoint_during_training():
    """params.yaml's train, warmstart and dpo sections and every paper config checkpoint every
    `checkpoint_every` > 0 steps (a SIGKILL loses at most checkpoint_every - 1 steps); the default
    runs checkpoint at least once before they end."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in ("train", "warmstart", "dpo"):
        every = params[section].get("checkpoint_every", 0)
        assert 0 < every < params[section]["max_steps"], section
    for config in sorted((REPO / "configs").glob("paper-*.yaml")):
        overlay = yaml.safe_load(config.read_text())
        sections = ["train"] if overlay["routes"] == ["sft"] else ["warmstart", "dpo"]
        for section in sections:
            assert overlay[section].get("checkpoint_every", 0) > 0, (config.name, section)


def chat(n: int, offset: int = 0) -> list[dict]:
    return [{"id": f"x{i}", "source": "test", "messages": [{"role": "user", "content": f"q{i}: add {i} and {i + 1}"},
                                                           {"role": "assistant", "content": f"the sum is {2 * i + 1}."}]}
            for i in range(offset, offset + n)]


@pytest.mark.slow
def test_dvc_repro_resumes_a_killed_training_run(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from alphatoken.data import read_split
    from alphatoken.models import ModelSpec, build_tiny_model, load_model, save_pretrained
    from alphatoken.stages.train import read_train_config
    from alphatoken.train import train_sft

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=repo, check=True, env=env, timeout=120)
    save_pretrained(build_tiny_model("llama", dtype=torch.float32), tokenizer, repo / "model")
    for name, rows in (("train.jsonl", chat(12)), ("val.jsonl", chat(2, 20))):
        (repo / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "params.yaml").write_text(
        "train:\n  methods: [random]\n  seeds: [0]\n  lr: 0.01\n  micro_batch_size: 2\n  max_steps: 12\n  warmup_steps: 1\n"
        "  max_length: 64\n  progress: false\n  checkpoint_every: 1\n  dtype: float32\n"
        "valuation:\n  last_k: 2\nresources:\n  train: {threads: 1}\n")
    outs = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["outs"]
    flags = next(iter(outs[0].values()))  # the declaration the generated dvc.yaml gives the run directory
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": ("python -m alphatoken.stages.train --params params.yaml --section train --valuation-section valuation "
                "--objective sft --method random --seed 0 --model model --train-data train.jsonl --val-data val.jsonl "
                "--out run"),
        "deps": ["model", "train.jsonl", "val.jsonl"], "params": ["train", "valuation"], "outs": [{"run": flags}]}}}))

    # a dvc repro killed (SIGKILL, its whole process group) once the first checkpoint is on disk
    first = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state = repo / "run" / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 240
    while not state.is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    log = first.communicate(timeout=60)[0]
    assert state.is_file(), f"no checkpoint appeared before the run ended:\n{log[-3000:]}"
    assert not (repo / "run" / "final").exists()

    second = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(resumed from step " in second.stdout + second.stderr, second.stdout[-3000:] + second.stderr[-3000:]
    assert json.loads((repo / "run" / "metrics.json").read_text())["steps"] == 12
    assert not (repo / "run" / "checkpoint").exists()

    # the same run uninterrupted, here: the same weights bit for bit
    torch.set_num_threads(1)
    model, tok = load_model(ModelSpec(source="hub", name_or_path=str(repo / "model"), dtype="float32",
                                      attn_implementation="eager"))
    _, config = read_train_config([repo / "params.yaml"], "train", "valuation", "random", 0, str(tmp_path / "straight"))
    expected = train_sft(model, tok, read_split(repo / "train.jsonl"), read_split(repo / "val.jsonl"), config).model.state_dict()
    resumed = load_file(str(repo / "run" / "final" / "model.safetensors"))
    assert resumed.keys() <= expected.keys() and resumed
    assert [k for k in resumed if not torch.equal(resumed[k], expected[k])] == []
