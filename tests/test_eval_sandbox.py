"""The sandbox contains each kind of harmful code, checked from the host side (files, processes,
listeners, memory of the child as the kernel accounted it), and tells a correct program from a wrong
one whatever the program prints or however it exits.

Every attack runs against mode "bwrap" (the OS layer alone: no audit hook is installed in that
mode) and, where the in-process guard claims to hold, against mode "guard". The guard does not hold
against: reading the project directory, `signal.pidfd_send_signal(os.pidfd_open(pid), 9)`, and (as
any in-process check) code that rewrites the hook through `gc` (`test_guard_hook_rewritten_via_gc`
shows the OS layer holding there).
"""

import ast
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from alphatoken.eval import sandbox
from alphatoken.eval.sandbox import (
    RECORDER,
    SandboxUnavailable,
    instrument_asserts,
    network_isolation_prefix,
    run_in_sandbox,
)

TIMEOUT_S = 3.0
MEMORY_MB = 512
PROJECT = Path(__file__).resolve().parents[1]
BOTH = pytest.mark.parametrize("mode", ["bwrap", "guard"])


def run(code, mode="bwrap", **kwargs):
    kwargs.setdefault("timeout_s", TIMEOUT_S)
    kwargs.setdefault("memory_mb", MEMORY_MB)
    return run_in_sandbox(textwrap.dedent(code), mode=mode, **kwargs)


def host_processes(tag: str) -> list[int]:
    """Pids of host processes whose command line is exactly `sleep <tag>`."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:2] == [b"sleep", tag.encode()]:
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def sleep_tag() -> str:
    """A `sleep` argument no other process uses: sleeps long enough to be found if it survives."""
    return f"300.{secrets.randbelow(10**9):09d}"


def assert_no_survivors(tag: str) -> None:
    survivors = host_processes(tag)
    for pid in survivors:  # started (indirectly) by this test
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"processes outlived the sandbox: {survivors}"


@pytest.fixture
def victim_dir(tmp_path):
    """A host directory holding a file, readable by the sandbox's unprivileged uid."""
    directory = tmp_path / "victim"
    directory.mkdir()
    (directory / "keep.txt").write_text("keep me")
    tmp_path.chmod(0o755)
    directory.chmod(0o755)
    (directory / "keep.txt").chmod(0o644)
    return directory


def assert_victim_intact(directory: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]
    assert (directory / "keep.txt").read_text() == "keep me"
    assert (directory / "keep.txt").stat().st_mode & 0o777 == 0o644


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 of the host; yields (port, function returning whether anything
    connected within a bounded wait)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def connected(wait_s=0.5):
        server.settimeout(wait_s)
        try:
            conn, _ = server.accept()
        except socket.timeout:
            return False
        conn.close()
        return True

    yield server.getsockname()[1], connected
    server.close()


@pytest.fixture
def victim_process():
    """A host process started by the test (a sleep), killed afterwards by its pid."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------- verdict


@BOTH
def test_correct_solution_passes(mode):
    result = run("def add(a, b):\n    return a + b\nprint('ok')", mode, test="assert add(2, 3) == 5")
    assert (result.passed, result.status, result.stdout.strip(), result.asserts) == (True, "passed", "ok", 1)


@BOTH
def test_wrong_solution_fails(mode):
    result = run("def add(a, b):\n    return a - b", mode, test="assert add(2, 3) == 5")
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.stderr


@BOTH
@pytest.mark.parametrize("exit_call", ["os._exit(0)", "sys.exit(0)", "raise SystemExit(0)"])
def test_wrong_solution_that_prints_markers_and_exits_0_fails(mode, exit_call):
    code = f"""
    import os, sys
    def add(a, b):
        return a - b
    for line in ("passed", "alphatoken-sandbox-done-" + "0" * 32, "OK", '{{"token": "x", "counts": [1]}}'):
        print(line)
    sys.stdout.flush()
    {exit_call}
    """
    result = run(code, mode, test="assert add(2, 3) == 5")
    assert (result.passed, result.status) == (False, "failed")


@BOTH
def test_exit_0_from_inside_the_test_fails(mode):
    # the candidate is called by the test and leaves before the first assert completes
    result = run("import os\ndef add(a, b):\n    os._exit(0)", mode, test="assert add(2, 3) == 5")
    assert (result.passed, result.status) == (False, "failed")
    assert "no completion record" in result.stderr


@BOTH
def test_fake_records_on_every_descriptor_fail(mode):
    code = """
    import json, os
    def add(a, b):
        return a - b
    record = (json.dumps({"token": "0" * 32, "counts": [5]}) + "\\n").encode()
    for fd in range(3, 256):
        try:
            os.write(fd, b"started\\n" + record)
        except OSError:
            pass
    os._exit(0)
    """
    result = run(code, mode, test="assert add(2, 3) == 5")
    assert (result.passed, result.status) == (False, "failed")
    assert "verdict channel" in result.stderr


@BOTH
def test_every_assert_of_the_test_must_run(mode):
    test = "if skip():\n    pass\nelse:\n    assert False\nassert True"
    result = run("def skip():\n    return True", mode, test=test)
    assert (result.passed, result.status, result.asserts) == (False, "failed", 1)
    assert "never reached: sites [0]" in result.stderr


@BOTH
def test_test_is_compiled_apart_from_the_solution(mode):
    # in one program the open string would run to the comment's quotes and swallow the failing test
    test = 'assert add(2, 3) == 5\n# """'
    swallowed = 'def add(a, b):\n    return a - b\nx = """'
    compile(swallowed + "\n" + test, "one-program", "exec")  # valid as one program: no assert in it
    result = run(swallowed, mode, test=test)
    assert (result.passed, result.status) == (False, "failed")
    assert "SyntaxError" in result.stderr


def _twin_instrumented_tree(test: str) -> ast.Module:
    """Slow twin of `instrument_asserts`: insert the recorder call after each Assert node of every
    statement list, numbering asserts in source order."""
    tree = ast.parse(test)
    order = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Assert)), key=lambda n: (n.lineno, n.col_offset))
    site = {id(node): k for k, node in enumerate(order)}
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list):
                new = []
                for statement in statements:
                    new.append(statement)
                    if isinstance(statement, ast.Assert):
                        call = ast.Call(ast.Name(RECORDER, ast.Load()), [ast.Constant(site[id(statement)])], [])
                        new.append(ast.Expr(call))
                setattr(node, field, new)
    return tree


def test_instrument_asserts_matches_its_twin_on_every_humaneval_test():
    from alphatoken.eval.humaneval import check_test, load_problems

    edge_cases = [
        "for i in range(3): assert i < 3  # trailing comment",
        "assert (1 ==\n        1), 'multi-line'\nx = 1; assert x; y = 2",
        "s = 'é' * 3; assert len(s) == 3, 'ünïcode'",
        "def check(c):\n    try:\n        assert c(1)\n    except TypeError:\n        assert False\n"
        "    finally:\n        assert True",
        "if True:\n    assert 1\nelse:\n    assert 0\nwhile False:\n    assert 2",
    ]
    tests = edge_cases + [check_test(p) for p in load_problems().values()]
    total = 0
    for test in tests:
        source, sites = instrument_asserts(test)
        twin = _twin_instrumented_tree(test)
        assert ast.dump(ast.parse(source)) == ast.dump(twin), test[:200]
        assert sites == sum(isinstance(n, ast.Assert) for n in ast.walk(ast.parse(test)))
        assert source.count("\n") == test.count("\n")  # line numbers unchanged
        original = sorted(n.lineno for n in ast.walk(ast.parse(test)) if isinstance(n, ast.Assert))
        assert sorted(n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assert)) == original
        total += sites
    assert total > 164  # HumanEval's tests hold asserts, and they were all found


# ---------------------------------------------------------------- files


@BOTH
def test_write_outside_the_sandbox_leaves_no_host_file(mode, tmp_path):
    target = tmp_path / f"escape-{secrets.token_hex(8)}.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')", mode)
    assert not result.passed and not target.exists()
    assert result.status == ("blocked" if mode == "guard" else "failed")


def test_write_to_read_only_paths_fails(victim_dir):
    # the bound directory, /usr, the interpreter's directory, and what bubblewrap itself created
    interpreter = Path(sys.executable).resolve()
    targets = [victim_dir / "new.txt", Path("/usr") / f"alphatoken-escape-{secrets.token_hex(8)}",
               interpreter.with_name(f"escape-{secrets.token_hex(8)}"), Path(f"/escape-{secrets.token_hex(8)}"),
               Path(f"/dev/escape-{secrets.token_hex(8)}")]
    code = f"""
    import os
    print(sorted(os.listdir({str(victim_dir)!r})))
    for path in {[str(t) for t in targets]!r}:
        try:
            open(path, "w").write("x")
            print("wrote", path)
        except OSError as e:
            print(type(e).__name__, e.errno)
    """
    result = run(code, read_only=[victim_dir])
    assert result.passed
    assert result.stdout.splitlines()[0] == "['keep.txt']"  # the target was visible
    assert "wrote" not in result.stdout and result.stdout.count("OSError 30") == len(targets)  # EROFS
    assert_victim_intact(victim_dir)
    assert not any(t.exists() for t in targets)


@BOTH
@pytest.mark.parametrize("attack", ["unlink", "create", "fchmod"])
def test_descriptor_relative_writes_leave_the_host_file_intact(mode, attack, victim_dir):
    calls = {
        "unlink": "os.unlink('keep.txt', dir_fd=d)",
        "create": "os.close(os.open('new.txt', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=d))",
        "fchmod": "os.fchmod(os.open('keep.txt', os.O_RDONLY, dir_fd=d), 0o777)",
    }
    code = f"""
    import os
    d = os.open({str(victim_dir)!r}, os.O_RDONLY)
    print(sorted(os.listdir(d)))
    {calls[attack]}
    """
    result = run(code, mode, read_only=[victim_dir] if mode == "bwrap" else ())
    assert not result.passed
    assert_victim_intact(victim_dir)
    if mode == "bwrap":
        assert result.stdout.strip() == "['keep.txt']" and "Read-only file system" in result.stderr
    else:
        assert result.status == "blocked"


@BOTH
def test_fork_exec_leaves_no_host_file(mode, tmp_path, victim_dir):
    targets = [tmp_path / f"touched-{secrets.token_hex(4)}", victim_dir / "touched"]
    code = f"""
    import os, _posixsubprocess
    for target in {[str(t) for t in targets]!r}:
        r, w = os.pipe()
        pid = _posixsubprocess.fork_exec(
            [b"/usr/bin/touch", target.encode()], [b"/usr/bin/touch"], True, (), None, None,
            -1, -1, -1, -1, -1, -1, r, w, False, False, -1, None, None, None, -1, None, False)
        os.close(w)
        print(target, os.waitpid(pid, 0)[1])
    """
    result = run(code, mode, read_only=[victim_dir] if mode == "bwrap" else ())
    assert all(not t.exists() for t in targets)
    assert_victim_intact(victim_dir)
    if mode == "bwrap":
        assert result.passed and len(result.stdout.splitlines()) == 2  # touch ran, and failed, twice
    else:
        assert result.status == "blocked" and "_posixsubprocess" in result.stderr


def test_reading_the_project_or_home_fails():
    code = f"""
    import json, os
    view = {{p: sorted(os.listdir(p)) if os.path.isdir(p) else None for p in ("/", "/root", "/home", "/work", "/tmp")}}
    print(json.dumps(view))
    open({str(PROJECT / 'README.md')!r}).read()
    """
    result = run(code)
    assert result.status == "failed" and "FileNotFoundError" in result.stderr
    view = json.loads(result.stdout.splitlines()[0])
    interpreter = Path(sandbox.interpreter_layout(str(Path(sys.executable).resolve()))["executable"])
    assert view["/tmp"] == [] and view["/home"] is None and view["/work"] is None
    if PROJECT.parts[1] != "tmp":  # a checkout under /tmp: the sandbox's own /tmp is there, empty (above)
        assert PROJECT.parts[1] not in view["/"]  # the project's top directory (e.g. /work) is absent
    # /root exists inside only as the path to the interpreter, when it lives under /root
    expected_root = [interpreter.parts[2]] if interpreter.parts[1] == "root" else None
    assert view["/root"] == expected_root


def test_guard_hook_rewritten_via_gc_is_still_held_by_the_os_layer(tmp_path):
    target = tmp_path / "after-gc.txt"
    code = f"""
    import gc
    for obj in gc.get_objects():
        if callable(obj) and getattr(obj, "__name__", "") == "hook" and obj.__closure__:
            for cell in obj.__closure__:
                try:
                    if getattr(cell.cell_contents, "__name__", "") == "refuse":
                        cell.cell_contents = lambda event, detail: None
                except ValueError:
                    pass
    open({str(target)!r}, "w").write("x")
    """
    guard = run(code, "guard")
    assert guard.passed and target.exists()  # the documented limit of the in-process guard
    target.unlink()
    contained = run(code, "bwrap")
    assert not contained.passed and not target.exists()


@BOTH
def test_writing_inside_its_directory_is_allowed(mode):
    result = run("open('scratch.txt', 'w').write('data')\nprint(open('scratch.txt').read())", mode)
    assert result.status == "passed" and result.stdout.strip() == "data"


@BOTH
def test_runs_in_a_fresh_directory(mode):
    first = run("import os\nprint(os.getcwd(), sorted(os.listdir('.')))\nopen('left.txt', 'w').write('x')", mode)
    second = run("import os\nprint(os.getcwd(), sorted(os.listdir('.')))", mode)
    assert first.passed and second.passed
    assert first.stdout.split()[1:] == second.stdout.split()[1:] == ["[]"]
    if mode == "guard":
        assert not os.path.exists(first.stdout.split()[0])  # the jail was deleted


@BOTH
def test_file_size_limit_stops_runaway_output(mode):
    result = run("while True:\n    print('x' * 1000)", mode, max_file_mb=1)
    assert result.status == "failed" and "File too large" in result.stderr
    assert len(result.stdout) <= 20_000


def test_tmpfs_is_bounded():
    code = "chunk = b'x' * (1 << 20)\nfor i in range(100):\n    with open(f'f{i}', 'wb') as f:\n        f.write(chunk)"
    result = run(code, max_file_mb=2)  # tmpfs of 8 MiB: the 9th file does not fit
    assert result.status == "failed" and "No space left on device" in result.stderr


# ---------------------------------------------------------------- network


@BOTH
def test_no_connection_reaches_a_host_listener(mode, listener):
    port, connected = listener
    code = f"""
    import socket
    s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
    s.sendall(b"escaped")
    """
    result = run(code, mode)
    assert not result.passed
    assert not connected()
    assert result.status == ("blocked" if mode == "guard" else "failed")
    if mode == "bwrap":
        assert "ConnectionRefusedError" in result.stderr  # its own, empty, loopback


@BOTH
def test_network_namespace_has_only_loopback(mode):
    if mode == "guard" and not network_isolation_prefix():
        pytest.skip("this host allows no network namespace (unshare); sockets are still refused in-process")
    result = run("print(open('/proc/net/dev').read())", mode)
    assert result.status == "passed"
    interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line]
    assert interfaces == ["lo"]


# ---------------------------------------------------------------- processes


@BOTH
def test_killing_a_host_process_fails(mode, victim_process):
    result = run(f"import os\nos.kill({victim_process.pid}, 9)", mode)
    time.sleep(0.2)
    assert victim_process.poll() is None
    assert result.status == ("blocked" if mode == "guard" else "failed")


def test_pidfd_signal_to_a_host_process_fails(victim_process):
    result = run(f"import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({victim_process.pid}), 9)")
    time.sleep(0.2)
    assert victim_process.poll() is None
    assert result.status == "failed" and "ProcessLookupError" in result.stderr


@BOTH
def test_disabling_the_guard_then_daemonizing_leaves_no_process(mode):
    tag = sleep_tag()
    code = f"""
    import os, sys, time
    sys.modules["__main__"]._refuse = lambda event, detail: None
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["sleep", {tag!r}])
        os._exit(0)
    os.wait()
    deadline = time.time() + 2
    while time.time() < deadline:
        found = [p for p in os.listdir("/proc") if p.isdigit() and
                 open(f"/proc/{{p}}/cmdline", "rb").read().split(b"\\0")[:2] == [b"sleep", {tag!r}.encode()]]
        if found:
            print("daemon running")
            break
        time.sleep(0.05)
    """
    result = run(code, mode)
    time.sleep(0.2)
    assert_no_survivors(tag)
    if mode == "bwrap":
        assert result.passed and result.stdout.strip() == "daemon running"
    else:
        assert result.status == "blocked" and "os.fork" in result.stderr


@BOTH
def test_fork_bomb_is_bounded(mode):
    tag = sleep_tag()
    code = f"""
    import os
    while True:
        if os.fork() == 0:
            os.execv("/usr/bin/sleep", ["sleep", {tag!r}])
    """
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], len(host_processes(tag)))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run(code, mode, max_procs=8)
    finally:
        done.set()
        sampler.join()
    time.sleep(0.2)
    assert_no_survivors(tag)
    assert not result.passed
    if mode == "bwrap":
        # the limit was hit (fork failed with EAGAIN) and never more than 8 were seen; on a loaded host the
        # 10 ms sampler may see none of the short-lived processes, so a lower bound would test the host
        assert peak[0] <= 8 and "Resource temporarily unavailable" in result.stderr
    else:
        assert peak[0] == 0 and result.status == "blocked"


def descendants_peak_rss_kib(root: int) -> int:
    """The largest VmHWM (peak resident set, KiB) among the current descendants of `root`."""
    parents, peak = {}, 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, root):
            ancestor = parents.get(ancestor)
        if ancestor == root:
            try:
                with open(f"/proc/{pid}/status") as f:
                    peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
            except OSError:
                continue
    return peak


@BOTH
def test_memory_bomb_is_held_to_the_limit(mode):
    # the host samples the peak resident memory of every process under this test while the bomb grows
    bomb = "import time\nchunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n    time.sleep(0.02)"
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], descendants_peak_rss_kib(os.getpid()))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run(bomb, mode, timeout_s=60.0)  # reaches the limit in about a second; the margin is for a loaded host
    finally:
        done.set()
        sampler.join()
    assert result.status == "memory_limit"
    assert MEMORY_MB * 1024 // 2 < peak[0] <= MEMORY_MB * 1024  # it did grow, and no further than the limit


@BOTH
def test_infinite_loop_times_out(mode):
    start = time.monotonic()
    result = run("while True:\n    pass", mode, timeout_s=1.0)
    assert result.status == "timeout" and time.monotonic() - start < 3.0


@BOTH
def test_signal_ignoring_loop_is_killed_on_the_wall_clock(mode):
    code = """
    import signal
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU, signal.SIGALRM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    while True:
        pass
    """
    start = time.monotonic()
    result = run(code, mode, timeout_s=1.0)
    assert result.status == "timeout" and time.monotonic() - start < 3.0


def test_wall_clock_kill_takes_the_whole_namespace():
    tag = sleep_tag()
    code = f"""
    import os, signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(3):
        if os.fork() == 0:
            os.setsid()
            os.execv("/usr/bin/sleep", ["sleep", {tag!r}])
    while True:
        pass
    """
    result = run(code, timeout_s=1.0)
    time.sleep(0.2)
    assert result.status == "timeout"
    assert_no_survivors(tag)


@BOTH
def test_memory_limit_status(mode):
    assert run(f"x = bytearray({2 * MEMORY_MB} * 1024 * 1024)", mode).status == "memory_limit"


# ---------------------------------------------------------------- availability


def test_bwrap_unavailable_is_refused_naming_the_guard_setting(monkeypatch):
    sandbox.bwrap_unavailable_reason.cache_clear()
    monkeypatch.setattr(sandbox, "BWRAP", "/nonexistent/bwrap")
    try:
        with pytest.raises(SandboxUnavailable, match=r'sandbox = "guard".*mode="guard"'):
            run("print('never runs')")
        assert run("print('guard')", "guard").stdout.strip() == "guard"  # only when asked for
    finally:
        sandbox.bwrap_unavailable_reason.cache_clear()


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        run("pass", "docker")
    with pytest.raises(ValueError, match="must be positive"):
        run("pass", timeout_s=0)
    with pytest.raises(FileNotFoundError, match="read_only path does not exist"):
        run("pass", read_only=["/nonexistent/path"])
