"""The sandbox refuses or contains each kind of harmful code, with the specific status, and tells a
correct program from a wrong one."""

import os
import uuid

import pytest

from alphatoken.eval.sandbox import network_isolation_prefix, run_in_sandbox

TIMEOUT_S = 3.0
MEMORY_MB = 512


def run(code):
    return run_in_sandbox(code, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)


def test_correct_solution_passes():
    result = run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert (result.passed, result.status, result.stdout.strip()) == (True, "passed", "ok")


def test_wrong_solution_fails():
    result = run("def add(a, b):\n    return a - b\nassert add(2, 3) == 5")
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.stderr


def test_write_outside_directory_is_blocked(tmp_path):
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    result = run(f"open({str(target)!r}, 'w').write('x')")
    assert result.status == "blocked"
    assert not target.exists()


def test_write_outside_directory_cannot_be_caught(tmp_path):
    target = tmp_path / "caught.txt"
    code = f"try:\n    open({str(target)!r}, 'w')\nexcept BaseException:\n    pass\nprint('survived')"
    result = run(code)
    assert result.status == "blocked" and "survived" not in result.stdout
    assert not target.exists()


def test_removal_outside_directory_is_blocked(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = run(f"import os\nos.remove({str(victim)!r})")
    assert result.status == "blocked"
    assert victim.read_text() == "keep me"


def test_writing_inside_its_directory_is_allowed():
    result = run("open('scratch.txt', 'w').write('data')\nprint(open('scratch.txt').read())")
    assert result.status == "passed" and result.stdout.strip() == "data"


def test_socket_is_blocked():
    result = run("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))")
    assert result.status == "blocked"
    assert "socket" in result.stderr


def test_network_namespace_has_only_loopback():
    if not network_isolation_prefix():
        pytest.skip("this host allows no network namespace (unshare); sockets are still refused in-process")
    result = run("print(open('/proc/net/dev').read())")
    assert result.status == "passed"
    interfaces = [line.split(":")[0].strip() for line in result.stdout.splitlines() if ":" in line]
    assert interfaces == ["lo"]


def test_fork_bomb_is_blocked():
    result = run("import os\nwhile True:\n    os.fork()")
    assert result.status == "blocked"
    assert "os.fork" in result.stderr


def test_os_system_is_blocked(tmp_path):
    target = tmp_path / "touched"
    result = run(f"import os\nos.system('touch {target}')")
    assert result.status == "blocked"
    assert not target.exists()


def test_subprocess_is_blocked():
    result = run("import subprocess\nsubprocess.run(['true'])")
    assert result.status == "blocked"


def test_memory_limit():
    result = run(f"x = bytearray({2 * MEMORY_MB} * 1024 * 1024)")
    assert result.status == "memory_limit"


def test_infinite_loop_times_out():
    result = run_in_sandbox("while True:\n    pass", timeout_s=1.0, memory_mb=MEMORY_MB)
    assert result.status == "timeout"


def test_early_exit_is_not_a_pass():
    assert run("import sys\nsys.exit(0)\nassert False").status == "failed"
    assert run("import os\nos._exit(0)\nassert False").status == "failed"


def test_file_size_limit_stops_runaway_output():
    result = run_in_sandbox("while True:\n    print('x' * 1000)", timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, max_file_mb=1)
    assert result.status == "failed" and "File too large" in result.stderr
    assert len(result.stdout) <= 20_000


def test_runs_in_a_throwaway_directory():
    first = run("import os\nprint(os.getcwd())\nopen('left.txt', 'w').write('x')")
    assert first.status == "passed"
    assert not os.path.exists(first.stdout.strip())
