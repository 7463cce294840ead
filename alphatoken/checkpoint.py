"""Resumable training state: model, optimizer, scheduler, RNG states, step and data position, written
atomically (a crash or SIGKILL during a save leaves the previous checkpoint intact), plus a
preemption flag raised by SIGTERM / SIGUSR1 (what SLURM sends before killing or requeueing a job).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU (and CUDA, when present) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(directory: str | Path, model, optimizer, scheduler, step: int, extra: dict | None = None) -> Path:
    """Write `directory/state.pt` atomically: into `directory.tmp`, then rename over `directory`.

    `extra` carries the loop's own state (data position, counters, metric history)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    torch.save(state, tmp / STATE_FILE)
    with open(tmp / STATE_FILE, "rb") as handle:  # make the bytes durable before the rename
        os.fsync(handle.fileno())
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def has_checkpoint(directory: str | Path) -> bool:
    """True when `directory` (or the backup left by a crash mid-rename) holds a complete checkpoint."""
    directory = Path(directory)
    return (directory / STATE_FILE).is_file() or (directory.with_name(directory.name + ".old") / STATE_FILE).is_file()


def load_checkpoint(directory: str | Path, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG states in place; returns `(step, extra)`."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():  # a crash between the two renames of save_checkpoint
        path = directory.with_name(directory.name + ".old") / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {directory}")
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: includes RNG tuples
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return int(state["step"]), state["extra"]


class PreemptionFlag:
    """Context manager: while active, SIGTERM and SIGUSR1 set `.raised` (and record the signal)
    instead of killing the process, so the loop can checkpoint at the next step boundary and exit.
    Previous handlers are restored on exit. Only installable from the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.raised = False
        self.signal_name: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.raised = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
