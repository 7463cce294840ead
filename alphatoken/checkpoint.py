"""The files of a training run, written so that a kill at any moment leaves a run that resumes or
restarts, never one that fails on every rerun:

- every file is written atomically: into `<name>.tmp` in the same directory, fsync'ed, then
  `os.replace`d over `<name>` and the directory fsync'ed (a kill mid-write leaves the previous
  version, or none, plus a leftover `.tmp` that the next write replaces);
- directories (the resumable checkpoint, the final model) are written whole into `<name>.tmp/` and
  swapped in by two renames, `<name>` -> `<name>.old` and `<name>.tmp` -> `<name>`, so either the old
  or the new directory is complete at every instant (`<name>.old` is read when a kill fell between
  the renames);
- the resumable state (model, optimizer, scheduler, RNG states, step, the loop's own state) lives in
  `checkpoint/state.pt`; an unreadable one raises CheckpointError, so the loop can restart instead;
- a run identity (`run_identity.json`: everything that changes the result of the run) is compared with
  the current one: `identity_differences` names the fields that differ.

Plus a preemption flag raised by SIGTERM / SIGUSR1 (what SLURM sends before killing or requeueing a job).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.pt"
IDENTITY_FILE = "run_identity.json"
IDENTITY_FORMAT = "alphatoken.run_identity/1"  # format tag of the identity file; bump when its layout changes
TMP_SUFFIX = ".tmp"  # a file or directory being written
OLD_SUFFIX = ".old"  # the previous directory while a new one is swapped in


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (truncated, corrupt, or from another format)."""


class RunMismatchError(ValueError):
    """A run directory holding a resumable checkpoint of another configuration, model or data."""


# ---------------------------------------------------------------------------------------------------
# Atomic files and directories


def fsync_directory(path: str | Path) -> None:
    """Make the entries of directory `path` (renames, new files) durable. File systems that cannot
    fsync a directory (some network file systems answer EINVAL) are left to order the rename themselves."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | Path, write) -> Path:
    """Write `path` atomically: `write(tmp_path)` writes the content into `<path>.tmp` in the same
    directory; the bytes are fsync'ed, renamed over `path` (`os.replace`), and the rename is fsync'ed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`path` <- `data`, atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`path` <- `text` (UTF-8), atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_torch_save(obj, path: str | Path) -> Path:
    """`torch.save(obj, path)`, atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_directory(directory: str | Path, write) -> Path:
    """Write a whole directory atomically: `write(tmp_dir)` fills a fresh `<directory>.tmp/`; every
    file in it is fsync'ed, then it replaces `directory` by two renames (`directory` ->
    `directory.old`, `directory.tmp` -> `directory`) and `directory.old` is removed."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + TMP_SUFFIX)
    old = directory.with_name(directory.name + OLD_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_directory(root)
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    fsync_directory(directory.parent)
    if old.exists():
        shutil.rmtree(old)
    return directory


def remove_path(path: str | Path) -> bool:
    """Remove a file or a directory tree if it exists; True when something was removed."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return True
    if path.exists() or path.is_symlink():
        path.unlink()
        return True
    return False


def remove_directory(directory: str | Path) -> None:
    """Remove `directory` with its `.tmp` and `.old` companions (the reverse of `write_directory`)."""
    directory = Path(directory)
    for suffix in ("", TMP_SUFFIX, OLD_SUFFIX):
        remove_path(directory.with_name(directory.name + suffix))


# ---------------------------------------------------------------------------------------------------
# Digests and the run identity


def tensor_digest(value) -> str:
    """SHA-256 over a nested structure of tensors (dicts by sorted key, lists and tuples in order,
    tensors by dtype, shape and bytes, None and scalars by their repr): the identity of values that
    must be bit-identical."""
    digest = hashlib.sha256()

    def visit(item):
        if isinstance(item, torch.Tensor):
            tensor = item.detach().to("cpu").contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, dict):
            digest.update(f"D{len(item)}".encode())
            for key in sorted(item, key=str):
                digest.update(f"K{key!s}".encode())
                visit(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"L{len(item)}".encode())
            for element in item:
                visit(element)
        else:
            digest.update(f"S{item!r}".encode())

    visit(value)
    return digest.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_run_identity(directory: str | Path) -> tuple[dict | None, str]:
    """`(record, problem)` of `directory/run_identity.json`: the record (`{"identity": {...}, "step0":
    {...}}`) when it is readable, else None and why (missing, unreadable, another format)."""
    path = Path(directory) / IDENTITY_FILE
    if not path.is_file():
        return None, f"{path} is missing"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path} is unreadable ({err})"
    if not isinstance(record, dict) or record.get("format") != IDENTITY_FORMAT or not isinstance(record.get("identity"), dict):
        return None, f"{path}: field 'format': expected {IDENTITY_FORMAT!r}, found {record.get('format') if isinstance(record, dict) else None!r}"
    record.setdefault("step0", {})
    return record, ""


def write_run_identity(directory: str | Path, identity: dict, step0: dict) -> Path:
    """Write `directory/run_identity.json` atomically: the run's identity and the digests of the values
    it computed at step 0 (`step0`: name -> `tensor_digest`)."""
    record = {"format": IDENTITY_FORMAT, "identity": identity, "step0": step0}
    return atomic_write_text(Path(directory) / IDENTITY_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def identity_differences(expected: dict, found: dict) -> list[str]:
    """`field: now X, the run directory's Y` for every field whose value differs (or is only in one)."""
    def shown(value):
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{name}: now {shown(expected.get(name))}, the run directory's {shown(found.get(name))}"
            for name in sorted(set(expected) | set(found)) if expected.get(name) != found.get(name)]


# ---------------------------------------------------------------------------------------------------
# RNG states


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


# ---------------------------------------------------------------------------------------------------
# The resumable checkpoint


def save_checkpoint(directory: str | Path, model, optimizer, scheduler, step: int, extra: dict | None = None) -> Path:
    """Write `directory/state.pt` atomically (`write_directory`: into `directory.tmp`, fsync'ed, then
    swapped in). `extra` carries the loop's own state (data position, counters, metric history)."""
    state = {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    return write_directory(directory, lambda tmp: torch.save(state, tmp / STATE_FILE))


def has_checkpoint(directory: str | Path) -> bool:
    """True when `directory` (or the backup left by a kill between the renames) holds a checkpoint file."""
    directory = Path(directory)
    return (directory / STATE_FILE).is_file() or (directory.with_name(directory.name + OLD_SUFFIX) / STATE_FILE).is_file()


def read_checkpoint(directory: str | Path) -> dict:
    """The saved state (`step`, `model`, `optimizer`, `scheduler`, `rng`, `extra`) from
    `directory/state.pt`, or from `directory.old/state.pt` when that one is missing or unreadable;
    CheckpointError naming both when neither can be read."""
    directory = Path(directory)
    problems = []
    for path in (directory / STATE_FILE, directory.with_name(directory.name + OLD_SUFFIX) / STATE_FILE):
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: includes RNG tuples
        except Exception as err:  # truncated or corrupt: torch raises several types
            problems.append(f"{path}: {type(err).__name__}: {err}")
            continue
        if not isinstance(state, dict) or not {"step", "model", "optimizer", "scheduler", "rng", "extra"} <= set(state):
            problems.append(f"{path}: not a checkpoint written by alphatoken.checkpoint.save_checkpoint")
            continue
        return state
    raise CheckpointError(f"no readable checkpoint at {directory}: " + ("; ".join(problems) or "no state.pt"))


def apply_checkpoint(state: dict, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG states in place from `read_checkpoint`'s state;
    returns `(step, extra)`."""
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return int(state["step"]), state["extra"]


def load_checkpoint(directory: str | Path, model, optimizer, scheduler) -> tuple[int, dict]:
    """`apply_checkpoint(read_checkpoint(directory), ...)`: restore in place; returns `(step, extra)`."""
    return apply_checkpoint(read_checkpoint(directory), model, optimizer, scheduler)


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
