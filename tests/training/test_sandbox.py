"""training.sandbox: each limit stops what it is for, the network is unreachable in both isolation modes, and
nothing runs in the calling process."""

from __future__ import annotations

import os
import socket

import pytest

from training import sandbox
from training.sandbox import Isolation, Limits, Status

FAST = Limits(wall_s=2.0, cpu_s=2, memory_mb=256, output_bytes=4096)
MODES = [Isolation.PREAMBLE] + ([Isolation.NAMESPACE] if sandbox.available_isolation() is Isolation.NAMESPACE else [])


def test_correct_code_passes_and_its_output_comes_back():
    result = sandbox.run("from __future__ import annotations\nprint(sum(range(10)))\nprint(__name__)", FAST)
    assert result.status is Status.PASSED and result.passed
    assert result.stdout == "45\n__main__\n"


def test_failed_assertion_and_other_errors_are_told_apart():
    assert sandbox.run("assert 1 + 1 == 3", FAST).status is Status.FAILED
    assert sandbox.run("def broken(:", FAST).status is Status.ERROR
    assert sandbox.run("raise ValueError('x')", FAST).status is Status.ERROR


def test_infinite_loop_times_out():
    result = sandbox.run("while True:\n    pass", Limits(wall_s=1.0, cpu_s=5))
    assert result.status is Status.TIMEOUT
    assert result.returncode is None and result.wall_s < 4


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock():
    result = sandbox.run("while True:\n    pass", Limits(wall_s=10.0, cpu_s=1))
    assert result.status is Status.TIMEOUT and result.wall_s < 8


@pytest.mark.parametrize("code", ["x = bytearray(8 * 1024**3)", "a = []\nwhile True:\n    a.append(bytearray(10**7))"])
def test_huge_allocation_is_stopped(code):
    assert sandbox.run(code, FAST).status is Status.MEMORY


def test_output_is_capped():
    result = sandbox.run("print('x' * 100_000)", FAST)
    assert result.status is Status.ERROR and len(result.stdout) <= FAST.output_bytes


@pytest.mark.parametrize("isolation", MODES)
def test_network_connection_to_a_listening_local_port_fails(isolation):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        result = sandbox.run(code, FAST, isolation)
        code2 = (
            f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
        )
        result2 = sandbox.run(code2, FAST, isolation)
    for r in (result, result2):
        assert r.status is Status.ERROR and "connected" not in r.stdout
        assert "OSError" in r.stderr or "unreachable" in r.stderr


def test_code_runs_in_another_process_and_a_temporary_folder(tmp_path):
    result = sandbox.run("import os\nprint(os.getpid())\nprint(os.getcwd())\nopen('f', 'w').write('x')", FAST)
    pid, cwd = result.stdout.split()
    assert int(pid) != os.getpid()
    assert "judgeserve-sandbox-" in cwd and not os.path.exists(cwd)  # removed afterwards
    assert sandbox.run("import os\nos._exit(3)", FAST).returncode == 3  # an exit there is not an exit here
