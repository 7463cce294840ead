"""Resume after a kill: a training run killed (SIGKILL) right after a checkpoint, or preempted with
SIGUSR1 as SLURM does before a time limit, and restarted with the same command ends with weights
bit-identical to an uninterrupted run, for every `val_refresh_every` r: the checkpoint holds the
validation gradient G (and the proxy P) of the last refresh when its step falls inside a refresh
period. The run's files survive a kill in the middle of any write (atomic writes; a truncated or
corrupt file is recomputed, or the run restarts); a checkpoint of another configuration, model or
data is refused by name; the dvclive rows of a resumed run equal those of an uninterrupted one.

The first two tests kill real processes (SIGKILL, SIGUSR1). The others run in this process and
stand for SIGKILL by raising `Killed` (a BaseException no code of the loop catches) right after the
checkpoint of the step is written, or right after a dvclive row is written: nothing after that point
runs, so the run directory is what `kill -9` there leaves. Tiny models, a few steps, one thread.
"""

import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import alphatoken.train.loop as loop
from alphatoken.blocks import scored_linears
from alphatoken.checkpoint import IDENTITY_FILE, RunMismatchError, read_checkpoint
from alphatoken.fisher import FisherConfig, FisherPrompts
from alphatoken.models import build_tiny_model, save_pretrained
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, train_dpo, train_sft
from alphatoken.train.batches import as_batch
from alphatoken.valuation import TokenValuer, ValuationConfig

WORKER = r'''
import json, os, signal, sys
import torch
import alphatoken.train.loop as loop
from alphatoken.models import build_tiny_model, byte_tokenizer
from alphatoken.policies import PolicyConfig
from alphatoken.train import TrainConfig, train_sft

torch.set_num_threads(1)
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
                     checkpoint_every=1, policy=PolicyConfig(name=policy, rho=0.5), progress=False, max_length=64,
                     val_refresh_every=3)
result = train_sft(build_tiny_model("llama", dtype=torch.float32), byte_tokenizer(), examples[2:], examples[:2], config)
if result.preempted:
    print(json.dumps({"preempted": True, "steps": result.steps}))
else:
    torch.save(result.model.state_dict(), os.path.join(out, "weights.pt"))
    print(json.dumps({"preempted": False, "steps": result.steps}))
'''


def run_worker(tmp_path: Path, out: Path, policy: str, kill_after: int = -1, how: str = "SIGKILL") -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.run([sys.executable, str(script), str(out), policy, str(kill_after), how],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def final_weights(out: Path) -> dict:
    return torch.load(out / "weights.pt", weights_only=True)


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not different, f"weights differ after resume (max abs diff per tensor): {different}"


@pytest.fixture(scope="module")
def straight_processes(tmp_path_factory) -> dict:
    """Final weights of uninterrupted runs in their own processes, per policy (computed once)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    weights = {}
    for policy in ("random", "alphatoken"):
        done = run_worker(tmp_path, tmp_path / policy, policy)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"preempted": False, "steps": 5}
        weights[policy] = final_weights(tmp_path / policy)
    return weights


def test_sigkill_then_rerun_gives_identical_weights(tmp_path, straight_processes):
    """AlphaToken policy, r = 3, killed after step 2 (inside the first refresh period): the valuer's G
    and P, the data order and the RNG states survive the kill."""
    killed = run_worker(tmp_path, tmp_path / "killed", "alphatoken", kill_after=2, how="SIGKILL")
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed: rc={killed.returncode}\n{killed.stderr[-2000:]}"
    assert not (tmp_path / "killed" / "weights.pt").exists()
    state = torch.load(tmp_path / "killed" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["extra"]["valuation"]["target"]

    resumed = run_worker(tmp_path, tmp_path / "killed", "alphatoken")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"preempted": False, "steps": 5}
    assert_identical(final_weights(tmp_path / "killed"), straight_processes["alphatoken"])
    assert not (tmp_path / "killed" / "checkpoint").exists()  # a finished run removes its checkpoint


def test_sigusr1_checkpoints_stops_and_resumes(tmp_path, straight_processes):
    """Random policy: the RNG state is part of the checkpoint."""
    preempted = run_worker(tmp_path, tmp_path / "preempted", "random", kill_after=1, how="SIGUSR1")
    assert preempted.returncode == 0, preempted.stderr[-2000:]
    report = json.loads(preempted.stdout.strip().splitlines()[-1])
    assert report["preempted"] is True and report["steps"] < 5, report
    state = torch.load(tmp_path / "preempted" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == report["steps"]

    resumed = run_worker(tmp_path, tmp_path / "preempted", "random")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_identical(final_weights(tmp_path / "preempted"), straight_processes["random"])


# ---------------------------------------------------------------------------------------------------
# In-process kills: SFT, DPO and alphatoken_lora, r in {1, 3}


class Killed(BaseException):
    """Stands for SIGKILL at the point where it is raised."""


@contextlib.contextmanager
def kill_after_checkpoint(monkeypatch, kill_after: int):
    """The block must end in `Killed`, raised right after the training loop writes its checkpoint of
    step `kill_after`."""
    save = loop.save_checkpoint

    def save_then_kill(directory, model, optimizer, scheduler, step, extra=None):
        path = save(directory, model, optimizer, scheduler, step, extra)
        if step == kill_after:
            raise Killed
        return path

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", save_then_kill)
        with pytest.raises(Killed):
            yield


KINDS = ("sft", "dpo", "lora")
STEPS = 5


def chat(n, offset=0):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "response": f"the sum is {2 * i + 1}."} for i in range(offset, offset + n)]


def pairs(n, offset=0):
    return [{"prompt": f"q{i}: add {i} and {i + 1}", "chosen": f"the sum is {2 * i + 1}.", "rejected": f"it is {i * 3 + 2}!"}
            for i in range(offset, offset + n)]


def fisher_of(model):
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(l.weight.shape, generator=g, dtype=l.weight.dtype) for n, l in scored_linears(model, 2).items()}


def run_config(out: Path, kind: str, r: int, **overrides) -> TrainConfig:
    policy = (PolicyConfig(name="alphatoken_lora", rho=0.5, lora_rank=4, lora_alpha=8.0) if kind == "lora"
              else PolicyConfig(name="alphatoken", rho=0.5))
    base = dict(output_dir=str(out), lr=1e-2 if kind == "lora" else 1e-3, micro_batch_size=2, grad_accum_steps=2,
                max_steps=STEPS, warmup_steps=1, checkpoint_every=1, val_refresh_every=r, policy=policy,
                valuation=ValuationConfig(last_k=2, window=4), progress=False, max_length=64, adam_eps=1e-5)
    base.update(overrides)
    return TrainConfig(**base)


def train(kind: str, out: Path, tokenizer, r: int = 3, model=None, data=None, **overrides):
    """One run of `kind` (14 examples / pairs: an epoch is 3 steps, so 5 steps cross into the second)."""
    torch.set_num_threads(1)
    config = run_config(out, kind, r, **overrides)
    model = model if model is not None else build_tiny_model("llama")
    if kind == "dpo":
        return train_dpo(model, tokenizer, data or pairs(14), pairs(2, 20), config, fisher=fisher_of(model))
    if kind == "lora":
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"what is {i} + {i}?"}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False) for i in range(3)]
        return train_sft(model, tokenizer, data or chat(14), chat(2, 20), config,
                         fisher_prompts=FisherPrompts(prompts, FisherConfig(last_k=2, max_new_tokens=4, batch_size=2)))
    return train_sft(model, tokenizer, data or chat(14), chat(2, 20), config, fisher=fisher_of(model))


def train_killed(kind: str, out: Path, tokenizer, kill_after: int, monkeypatch, r: int = 3, **overrides) -> None:
    """A run killed right after writing its checkpoint of step `kill_after`."""
    with kill_after_checkpoint(monkeypatch, kill_after):
        train(kind, out, tokenizer, r, **overrides)
    assert read_checkpoint(out / "checkpoint")["step"] == kill_after


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tokenizer):
    """Uninterrupted runs, per (kind, r), computed on first use: their weights and output directory."""
    cache = {}

    def get(kind: str, r: int = 3) -> tuple[dict, Path]:
        if (kind, r) not in cache:
            out = tmp_path_factory.mktemp(f"straight-{kind}-{r}")
            result = train(kind, out, tokenizer, r)
            assert not result.preempted and result.start_step == 0
            cache[kind, r] = (result.model.state_dict(), out)
        return cache[kind, r]

    return get


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tokenizer):
    """A run of `kind` (r = 3) killed right after its step-2 checkpoint, made once; each test copies it."""
    cache = {}

    def copy(kind: str, dest: Path) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"killed-{kind}") / "run"
            with pytest.MonkeyPatch.context() as patch:
                train_killed(kind, out, tokenizer, 2, patch)
            cache[kind] = out
        shutil.copytree(cache[kind], dest)
        return dest

    return copy


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r, kill_after", [(1, 2), (3, 2), (3, 3)], ids=["r1-kill2", "r3-kill2-inside", "r3-kill3-boundary"])
def test_resume_is_bit_identical_for_every_refresh_period(kind, r, kill_after, tmp_path, tokenizer, straight, monkeypatch):
    """Killed after step `kill_after` and rerun: the same weights as an uninterrupted run, and G is
    recomputed only at the steps where the uninterrupted run recomputes it (multiples of r), never
    at the resume step inside a refresh period."""
    expected, _ = straight(kind, r)
    train_killed(kind, tmp_path / "run", tokenizer, kill_after, monkeypatch, r)
    saved = read_checkpoint(tmp_path / "run" / "checkpoint")["extra"].get("valuation")
    assert (saved is not None) == (kill_after % r != 0)  # G and P are saved exactly when the resumed step needs them

    refreshed = []
    set_validation = TokenValuer.set_validation
    monkeypatch.setattr(TokenValuer, "set_validation", lambda self, *a, **k: refreshed.append(1) or set_validation(self, *a, **k))
    resumed = train(kind, tmp_path / "run", tokenizer, r)
    assert resumed.start_step == kill_after and not resumed.preempted
    assert len(refreshed) == len([s for s in range(kill_after, STEPS) if s % r == 0])
    assert_identical(resumed.model.state_dict(), expected)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_the_saved_g_is_that_of_the_refresh_step(tmp_path, tokenizer, killed):
    """Inside a refresh period the checkpoint's G is the gradient of the validation objective on the
    weights of the refresh step (step 0 here), bit for bit, and differs from G on the checkpoint's own
    weights: recomputing it at the resume step would change the run."""
    run = killed("sft", tmp_path / "run")
    state = read_checkpoint(run / "checkpoint")
    saved = state["extra"]["valuation"]["target"]
    val_batch = as_batch(tokenizer, chat(2, 20), 64, False)
    vcfg = ValuationConfig(last_k=2, window=4)

    def g_of(model):
        valuer = TokenValuer(model, vcfg)
        valuer.set_validation(val_batch)
        return valuer._target

    at_refresh = g_of(build_tiny_model("llama"))  # the weights of step 0
    moved = build_tiny_model("llama")
    moved.load_state_dict(state["model"])  # the weights after step 2
    at_checkpoint = g_of(moved)
    for name, direction in saved.items():
        for part in ("matrix", "val_x", "val_e"):
            a, b = direction[part], getattr(at_refresh[name], part)
            assert (a is None and b is None) or torch.equal(a, b), (name, part)
    assert all(at_checkpoint[n].form == "contract" and saved[n]["form"] == "contract" for n in saved)  # d=32: G is explicit
    differences = [float((at_checkpoint[n].matrix - saved[n]["matrix"]).abs().max()) for n in saved]
    assert max(differences) > 1e-6, differences


# ---------------------------------------------------------------------------------------------------
# Interrupted writes: every run file, truncated or corrupt, or a leftover temporary file


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    # name: (kind, how to damage the killed run, the step the rerun starts from)
    "state.pt truncated": ("sft", lambda run: truncate(run / "checkpoint" / "state.pt"), 0),
    "killed between the checkpoint renames": ("sft", lambda run: (run / "checkpoint").rename(run / "checkpoint.old"), 2),
    "run_identity.json truncated": ("sft", lambda run: truncate(run / IDENTITY_FILE), 0),
    "reference_weights.pt truncated": ("sft", lambda run: truncate(run / loop.REFERENCE_WEIGHTS), 2),
    "reference_weights.pt corrupt": ("sft", lambda run: (run / loop.REFERENCE_WEIGHTS).write_bytes(b"\0" * 64), 2),
    "reference_losses.pt truncated": ("dpo", lambda run: truncate(run / loop.REFERENCE_LOSSES), 2),
    "LoRA factor Fisher truncated": ("lora", lambda run: truncate(run / loop.FISHER), 2),
    "dvclive files truncated": ("sft", lambda run: [truncate(p) for p in (run / "dvclive").rglob("*") if p.is_file()], 2),
}


def leave_temporary_files(run: Path) -> None:
    """What a kill in the middle of each atomic write leaves: a partial `<name>.tmp` next to the file."""
    for name in (loop.REFERENCE_WEIGHTS, loop.REFERENCE_LOSSES, loop.FISHER, IDENTITY_FILE, loop.METRICS):
        (run / (name + ".tmp")).write_bytes(b"PK\x03\x04 partial")
    (run / "checkpoint.tmp").mkdir()
    shutil.copy(run / "checkpoint" / "state.pt", run / "checkpoint.tmp" / "state.pt")
    truncate(run / "checkpoint.tmp" / "state.pt")
    (run / "final.tmp").mkdir()
    (run / "final.tmp" / "model.safetensors").write_bytes(b"partial")


CORRUPTIONS["leftover temporary files"] = ("sft", leave_temporary_files, 2)


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_damaged_run_directory_resumes_or_restarts(case, tmp_path, tokenizer, killed, straight):
    """Each file the way an interrupted (or non-atomic) write leaves it: the rerun resumes (the file
    is recomputed, bit-identically) or restarts from step 0 (the checkpoint cannot be used), and ends
    with the weights of an uninterrupted run, without leftovers."""
    kind, damage, start = CORRUPTIONS[case]
    run = killed(kind, tmp_path / "run")
    damage(run)
    result = train(kind, run, tokenizer)
    assert result.start_step == start
    assert_identical(result.model.state_dict(), straight(kind)[0])
    left = sorted(p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old", ".partial")) or p.name == "checkpoint")
    assert left == []
    assert json.loads((run / loop.METRICS).read_text())["steps"] == STEPS


def test_a_finished_run_with_damaged_outputs_is_redone(tmp_path, tokenizer, straight):
    """metrics.json and final/ of a finished run, truncated: the rerun (nothing to resume) trains
    again and rewrites them whole."""
    expected, _ = straight("sft")
    run = tmp_path / "run"
    train("sft", run, tokenizer)
    truncate(run / loop.METRICS)
    truncate(run / "final" / "model.safetensors")
    result = train("sft", run, tokenizer)
    assert result.start_step == 0
    assert_identical(result.model.state_dict(), expected)
    assert json.loads((run / loop.METRICS).read_text())["steps"] == STEPS
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float64)
    assert_identical(reloaded.state_dict(), {k: v for k, v in expected.items() if k in reloaded.state_dict()})


# ---------------------------------------------------------------------------------------------------
# The run identity


@pytest.mark.parametrize("change, field", [
    (dict(lr=2e-3), "lr"),
    (dict(max_steps=6), "max_steps"),
    (dict(seed=1), "seed"),
    (dict(val_refresh_every=2), "val_refresh_every"),
    (dict(valuation=ValuationConfig(last_k=2, window=4, lam=0.5)), "valuation.lam"),
    (dict(policy=PolicyConfig(name="alphatoken", rho=0.25)), "policy.rho"),
    (dict(model=build_tiny_model("llama", seed=1)), "model.weights_fingerprint"),
    (dict(data=chat(14, offset=1)), "data.train_sha256"),
])
def test_a_checkpoint_of_other_settings_is_refused_by_name(change, field, tmp_path, tokenizer, killed):
    run = killed("sft", tmp_path / "run")
    with pytest.raises(RunMismatchError) as refused:
        train("sft", run, tokenizer, **change)
    message = str(refused.value)
    assert f"{field}: now " in message and f"delete {run} to start over" in message
    assert message.count(": now ") == 1, message  # only the changed field is named
    assert read_checkpoint(run / "checkpoint")["step"] == 2  # nothing was removed


def test_settings_that_do_not_change_the_result_may_differ_on_resume(tmp_path, tokenizer, killed, straight):
    """progress, log_every, checkpoint_every and output_dir are not part of the identity."""
    run = killed("sft", tmp_path / "run")
    moved = tmp_path / "moved"
    run.rename(moved)
    result = train("sft", moved, tokenizer, progress=True, log_every=2, checkpoint_every=3)
    assert result.start_step == 2
    assert_identical(result.model.state_dict(), straight("sft")[0])
    loss_rows = (moved / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert loss_rows == ["step\tloss"] + [row for row in loss_rows[1:] if int(row.split("\t")[0]) % 2 == 1]
    assert len(loss_rows) == 1 + STEPS // 2  # rows of steps 2 and 4, replayed from the history or new


def test_a_finished_run_directory_of_other_settings_starts_over(tmp_path, tokenizer):
    """No checkpoint to resume: the run trains from scratch, the step-0 caches of the other weights are
    not reused (today's silent mistake), and final/train_config.json records the settings trained with."""
    run = tmp_path / "run"
    train("sft", run, tokenizer)
    other = build_tiny_model("llama", seed=1)
    result = train("sft", run, tokenizer, lr=2e-3, model=other)
    assert result.start_step == 0
    reference = torch.load(run / loop.REFERENCE_WEIGHTS, weights_only=True)
    initial = dict(build_tiny_model("llama", seed=1).named_parameters())
    assert reference.keys() and all(torch.equal(reference[n], initial[n]) for n in reference)
    assert json.loads((run / "final" / "train_config.json").read_text())["lr"] == 2e-3
    assert len((run / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()) == 1 + STEPS
    assert json.loads((run / IDENTITY_FILE).read_text())["identity"]["lr"] == 2e-3


# ---------------------------------------------------------------------------------------------------
# dvclive rows


def live_tables(run: Path) -> dict:
    """The dvclive metric TSVs of a run: name -> rows; tokens_per_s (a timing) by step only."""
    tables = {}
    for path in sorted((run / "dvclive/plots/metrics/train").glob("*.tsv")):
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        tables[path.stem] = [row[:1] for row in rows] if path.stem == "tokens_per_s" else rows
    return tables


def test_dvclive_rows_of_a_resumed_run_equal_an_uninterrupted_runs(tmp_path, tokenizer, straight, monkeypatch):
    """Checkpoints every 2 steps, killed after writing the dvclive row of step 3 (one row past the
    checkpoint of step 2): the resumed run's TSVs equal the uninterrupted run's step by step, without
    the duplicate row a resumed dvclive would append."""
    _, reference = straight("sft")
    run = tmp_path / "run"
    log_row = loop._log_live_row

    def log_then_kill(live, row):
        log_row(live, row)
        if row["step"] == 3:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_log_live_row", log_then_kill)
        with pytest.raises(Killed):
            train("sft", run, tokenizer, checkpoint_every=2)
    assert read_checkpoint(run / "checkpoint")["step"] == 2
    assert [row[0] for row in live_tables(run)["loss"]] == ["step", "0", "1", "2"]  # a row past the checkpoint

    result = train("sft", run, tokenizer, checkpoint_every=2)
    assert result.start_step == 2
    resumed, uninterrupted = live_tables(run), live_tables(reference)
    assert set(resumed) == set(uninterrupted) and "loss" in resumed and "kept_fraction" in resumed
    for name in uninterrupted:
        assert resumed[name] == uninterrupted[name], name
    assert [row[0] for row in resumed["loss"]] == ["step"] + [str(s) for s in range(STEPS)]
    summary = json.loads((run / loop.METRICS).read_text())
    assert summary == json.loads((reference / loop.METRICS).read_text())
    live_summary = json.loads((run / "dvclive/metrics.json").read_text())
    expected_summary = json.loads((reference / "dvclive/metrics.json").read_text())
    live_summary["train"].pop("tokens_per_s"), expected_summary["train"].pop("tokens_per_s")
    assert live_summary == expected_summary and live_summary["step"] == STEPS - 1
    assert math.isfinite(summary["final_loss"])


# ---------------------------------------------------------------------------------------------------
# The train stage


def test_train_stage_refuses_a_checkpoint_of_other_settings_then_resumes(tmp_path, tokenizer, monkeypatch, capsys):
    """One actionable line naming the differing field and the fix; with the settings restored it resumes."""
    from alphatoken.stages.train import main

    torch.set_num_threads(1)
    model_dir = save_pretrained(build_tiny_model("llama", dtype=torch.float32), tokenizer, tmp_path / "model")

    def split(path: Path, rows) -> str:
        path.write_text("".join(json.dumps({"id": f"x{i}", "source": "test", "messages": [
            {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}) + "\n"
            for i, r in enumerate(rows)))
        return str(path)

    def params(lr: float) -> str:
        path = tmp_path / "params.yaml"
        path.write_text(f"train:\n  lr: {lr}\n  micro_batch_size: 2\n  max_steps: 3\n  warmup_steps: 1\n  max_length: 64\n"
                        "  progress: false\n  checkpoint_every: 1\n  dtype: float32\nvaluation:\n  last_k: 2\n")
        return str(path)

    out = tmp_path / "run"
    argv = ["--section", "train", "--valuation-section", "valuation", "--objective", "sft", "--method", "random",
            "--model", str(model_dir), "--train-data", split(tmp_path / "train.jsonl", chat(6)),
            "--val-data", split(tmp_path / "val.jsonl", chat(2, 20)), "--out", str(out)]
    with kill_after_checkpoint(monkeypatch, 1):
        main(["--params", params(0.01), *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--params", params(0.02), *argv])
    err = capsys.readouterr().err
    assert "lr: now 0.02, the run directory's 0.01" in err and f"delete {out} to start over" in err
    main(["--params", params(0.01), *argv])
    assert "(resumed from step 1)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3 and not (out / "checkpoint").exists()
