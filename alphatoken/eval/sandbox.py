"""Running model-generated Python in a contained child process.

`run_in_sandbox(code, timeout_s, memory_mb)` executes `code` in a fresh interpreter and says whether
it ran to its end without an uncaught exception (`passed`) or how it stopped (`status`).

What is contained, and by what:

- Kernel-enforced, in the child before it starts (`preexec_fn`):
  - RLIMIT_AS = `memory_mb` (address space: an allocation past it raises MemoryError),
  - RLIMIT_CPU = ceil(timeout_s) + 1 seconds of CPU (SIGXCPU after that),
  - RLIMIT_FSIZE = `max_file_mb` (no single file, stdout/stderr included, may grow past it),
  - RLIMIT_NOFILE = 256 open files, RLIMIT_CORE = 0 (no core dumps),
  - RLIMIT_NPROC = (processes and threads the user already runs) + `max_procs`; the kernel does not
    enforce RLIMIT_NPROC for root, so as root the fork ban of the prelude (below) is what stops a
    fork bomb.
- Wall clock: the child leads its own session/process group; after `timeout_s` seconds the whole
  group is killed with SIGKILL, and any process left in the group when the child ends is killed too.
- Network: when `unshare --net` works (root, or `unshare -rn` for users allowed to create user
  namespaces), the child runs in a new, empty network namespace (loopback down, no interfaces).
  Independently the prelude refuses socket creation.
- Filesystem: the working directory is a throw-away temporary directory, deleted afterwards;
  `python -I -B` ignores PYTHON* variables, the user site directory and the cwd on `sys.path`, and
  writes no bytecode; the environment is reduced to PATH/HOME/TMPDIR/LANG (HOME and TMPDIR point
  into the jail).
- In-process guards (the prelude installs a `sys.addaudithook` hook before the code runs; audit
  hooks cannot be removed from Python). A refused action ends the program at once with status
  "blocked", so the code cannot catch and ignore the refusal:
  - opening a file for writing, creating, removing, renaming, linking, chmod/chown/utime/truncate
    of any path outside the jail (symlinks resolved; `/dev/null` allowed),
  - creating a socket (`socket.__new__`, which every socket path goes through) and DNS look-ups,
  - starting processes: `os.system`, `os.fork`/`forkpty`, `os.exec*`, `os.spawn*`,
    `os.posix_spawn*`, `subprocess.Popen`; sending signals (`os.kill`, `os.killpg`),
  - loading native code through `ctypes` (`ctypes.dlopen`/`dlsym`, so `import ctypes` itself
    is refused).

What is NOT contained: reading files the user running the evaluation can read (the code can read,
not write, outside its jail); CPU and memory pressure below the limits; code that bypasses the audit
hook through CPython internals (e.g. calling `_posixsubprocess.fork_exec` directly, or a C
extension module that issues raw system calls); without network namespaces, raw system calls that
open sockets from native code. The audit-hook guards stop honest mistakes and ordinary destructive
code, not a determined attacker: for untrusted code at scale, run the evaluation itself inside a
container or VM without credentials (as the HumanEval authors advise).

"passed" means: exit status 0 and the program reached its end (a completion marker is printed by the
prelude after the code finishes, so `sys.exit(0)` or `os._exit(0)` midway do not count as a pass).
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory_limit", "blocked", "killed")
EXIT_BLOCKED = 86  # the prelude's exit status when a guard refuses an action
EXIT_MEMORY = 87  # the prelude's exit status on an uncaught MemoryError


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run."""

    passed: bool  # ran to its end with exit status 0
    status: str  # one of STATUSES
    stdout: str  # captured standard output (truncated to `max_output_chars`)
    stderr: str  # captured standard error (truncated); names the refused action when "blocked"


# The prelude runs before the code: it reads the completion marker from stdin and the code from
# solution.py, installs the audit hook, executes the code as __main__, then prints the marker.
PRELUDE = r'''
import os, sys
_marker = sys.stdin.readline().strip()
sys.stdin.close()
_jail = os.path.realpath(os.getcwd())
with open("solution.py", encoding="utf-8") as _f:
    _source = _f.read()
import traceback as _traceback
_exit, _write, _realpath, _fsdecode = os._exit, os.write, os.path.realpath, os.fsdecode
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_ALLOWED = ("/dev/null",)
_ALWAYS_REFUSED = {
    "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn",
    "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym",
}
_PATH_EVENTS = {  # event -> indices of its path arguments
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
    "os.link": (0, 1), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,),
    "os.chflags": (0,), "os.lchmod": (0,), "os.lchown": (0,), "os.utime": (0,),
    "os.truncate": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,),
    "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1),
}

def _refuse(event, detail):
    _write(2, f"sandbox: refused {event} {detail}\n".encode("utf-8", "replace"))
    _exit(86)

def _inside(path):
    if isinstance(path, int):
        return True  # an already open descriptor
    full = _realpath(_fsdecode(path))
    return full == _jail or full.startswith(_jail + os.sep) or full in _ALLOWED

def _hook(event, args):
    if event in _ALWAYS_REFUSED:
        _refuse(event, repr(args)[:200])
    elif event == "open":
        path, mode, flags = args
        writing = (flags or 0) & _WRITE_FLAGS or (mode is not None and any(c in mode for c in "wax+"))
        if writing and path is not None and not _inside(path):
            _refuse(event, repr(path))
    elif event in _PATH_EVENTS:
        for i in _PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                _refuse(event, repr(args[i]))

sys.addaudithook(_hook)
try:
    exec(compile(_source, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except MemoryError:
    _write(2, b"MemoryError\n")
    _exit(87)
except BaseException:
    _traceback.print_exc()
    sys.stderr.flush()
    _exit(1)
sys.stdout.flush()
sys.stdout.write("\n" + _marker + "\n")
sys.stdout.flush()
_exit(0)
'''


@lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program in a new empty network namespace, or () when this
    host allows neither `unshare --net` (root) nor `unshare --map-root-user --net`."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    candidates = [(unshare, "--net")] if os.geteuid() == 0 else []
    candidates.append((unshare, "--map-root-user", "--net"))
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _user_task_count(uid: int) -> int:
    """Processes + threads owned by `uid` (what RLIMIT_NPROC counts), from /proc; 0 if unreadable."""
    count = 0
    try:
        entries = list(os.scandir("/proc"))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue  # the process ended while we looked
    return count


def _limits(timeout_s: float, memory_mb: int, max_file_mb: int, max_procs: int):
    """The function the child runs before exec: applies the resource limits."""
    import resource

    memory = int(memory_mb) * 1024 * 1024
    cpu = int(math.ceil(timeout_s)) + 1
    file_size = int(max_file_mb) * 1024 * 1024
    nproc = _user_task_count(os.geteuid()) + max_procs if os.geteuid() != 0 else None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


def _read_tail(path: Path, max_chars: int) -> str:
    with open(path, "rb") as f:
        data = f.read(4 * max_chars + 4)
    return data.decode("utf-8", "replace")[:max_chars]


def run_in_sandbox(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    max_file_mb: int = 16,
    max_procs: int = 16,
    max_output_chars: int = 20_000,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as `__main__` in a contained `python -I -B` child (see the module docstring for
    exactly what is and is not contained). Never raises for anything the code does.

    timeout_s: wall-clock limit (the CPU limit is ceil(timeout_s) + 1 s).
    memory_mb: address-space limit of the child (RLIMIT_AS).
    max_file_mb: largest file the child may write (RLIMIT_FSIZE).
    max_procs: processes/threads the child may add (RLIMIT_NPROC; not enforced by the kernel for root).
    python: the interpreter (default: the running one).
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb must be positive, got {timeout_s} and {memory_mb}")
    marker = f"alphatoken-sandbox-done-{secrets.token_hex(16)}"
    with tempfile.TemporaryDirectory(prefix="alphatoken-sandbox-") as private:
        jail = Path(private) / "jail"
        jail.mkdir()
        (jail / "solution.py").write_text(code, encoding="utf-8")
        stdout_path, stderr_path = Path(private) / "stdout", Path(private) / "stderr"
        env = {"PATH": "/usr/bin:/bin", "HOME": str(jail), "TMPDIR": str(jail), "LANG": "C.UTF-8"}
        command = [*network_isolation_prefix(), python or sys.executable, "-I", "-B", "-c", PRELUDE]
        timed_out = False
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                command,
                cwd=jail,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own process group: the timeout kills all of it
                preexec_fn=_limits(timeout_s, memory_mb, max_file_mb, max_procs),
            )
            try:
                proc.stdin.write((marker + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # the child died before reading its marker; its status says why
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child, or whatever it left behind
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        stdout = _read_tail(stdout_path, max_output_chars + len(marker) + 2)
        stderr = _read_tail(stderr_path, max_output_chars)
    code_ = proc.returncode
    finished = code_ == 0 and stdout.rstrip("\n").endswith(marker)
    if finished:
        stdout = stdout.rstrip("\n")[: -len(marker)].removesuffix("\n")
    stdout = stdout[:max_output_chars]
    if timed_out or code_ == -signal.SIGXCPU:
        status = "timeout"
    elif finished:
        status = "passed"
    elif code_ == EXIT_BLOCKED:
        status = "blocked"
    elif code_ == EXIT_MEMORY:
        status = "memory_limit"
    elif code_ < 0:
        status = "killed"
        stderr += f"\nsandbox: terminated by {signal.Signals(-code_).name}"
    else:
        status = "failed"
    return SandboxResult(passed=status == "passed", status=status, stdout=stdout, stderr=stderr)
