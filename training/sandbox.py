"""Runs generated Python code in a separate, limited process, never in the calling one.

Each run gets a fresh temporary directory as its working directory (removed afterwards), a minimal
environment, and `python -I` (isolated mode: no PYTHON* variables, no user site-packages, not the script's
folder on sys.path). Guarantees, in order of strength:

- wall-clock limit: the process group is killed (SIGKILL) when `Limits.wall_s` passes -> TIMEOUT.
- CPU time: RLIMIT_CPU; the kernel stops the process after `cpu_s` seconds of CPU -> TIMEOUT.
- memory: RLIMIT_AS caps the address space at `memory_mb`; Python then raises MemoryError -> MEMORY.
- output: stdout and stderr go to files capped by RLIMIT_FSIZE at `output_bytes` (a write past it fails:
  Python ignores SIGXFSZ and raises OSError "File too large" -> ERROR); only that much is read back. No
  core dumps (RLIMIT_CORE 0).
- network, with `Isolation.NAMESPACE` (picked when `unshare -rn` works here): the child runs in a new user
  and network namespace whose only interface, loopback, is down, so no connection of any kind can be made,
  not to 127.0.0.1 either. This is enforced by the kernel.
- network, with `Isolation.PREAMBLE` (the fallback where user namespaces are unavailable): before the
  program runs, the socket module's connect, bind, sendto, create_connection and getaddrinfo are replaced by
  functions that raise OSError. That stops ordinary code (socket, urllib, http.client, and libraries on
  them) but not a program that sets out to evade it (ctypes, the _socket module, starting curl).

Not guaranteed: a filesystem jail (the child can read, and write, what this user can outside its temporary
directory), a process-count limit (RLIMIT_NPROC does not bind root, and children outlive a kill only if they
leave the process group), or a defence against hostile code in PREAMBLE mode. It is meant for model output
on benchmarks, which is careless, not malicious.

Not for: deciding what a program's output means (training.tasks does that).
"""

from __future__ import annotations

import enum
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


class Status(str, enum.Enum):
    PASSED = "passed"  # exited with status 0
    FAILED = "failed"  # ended by an AssertionError (a failed test)
    TIMEOUT = "timeout"  # wall-clock or CPU limit
    MEMORY = "memory"  # MemoryError under the address-space limit
    ERROR = "error"  # any other exception, a syntax error, a signal, too much output


class Isolation(str, enum.Enum):
    NAMESPACE = "namespace"  # `unshare -rn`: no network at all, enforced by the kernel
    PREAMBLE = "preamble"  # socket functions disabled inside Python: best effort


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # HumanEval's own harness allows 3 s a problem; generated programs may be slower
    cpu_s: int = 10
    memory_mb: int = 1024  # address space, not resident memory: Python alone maps about 30 MB
    output_bytes: int = 64 * 1024  # a GSM8K answer is one number; a test prints nothing


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Result:
    status: Status
    stdout: str  # at most Limits.output_bytes, decoded leniently
    stderr: str  # the last 2000 characters (the traceback's end)
    returncode: int | None  # None when killed for the wall-clock limit
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status is Status.PASSED


# Run with `python -I -c` in PREAMBLE mode; the program itself is executed by runpy, so that it is compiled
# on its own (a `from __future__` import must be its first statement) and runs as __main__.
_PREAMBLE = """
import socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
for _name in ("connect", "connect_ex", "bind", "sendto", "sendmsg"):
    setattr(socket.socket, _name, _no_network)
socket.create_connection = socket.getaddrinfo = socket.create_server = _no_network
del socket, _no_network, _name
import runpy
runpy.run_path("main.py", run_name="__main__")
"""


@functools.cache
def available_isolation() -> Isolation:
    """NAMESPACE when `unshare -rn` can start a process here (user namespaces enabled), else PREAMBLE."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return Isolation.PREAMBLE
    try:
        probe = subprocess.run([unshare, "-rn", "true"], check=False, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return Isolation.PREAMBLE
    return Isolation.NAMESPACE if probe.returncode == 0 else Isolation.PREAMBLE


def _set_limits(limits: Limits) -> None:
    """Runs in the child between fork and exec: only setrlimit calls (preexec_fn must stay trivial)."""
    memory = limits.memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _command(isolation: Isolation) -> list[str]:
    if isolation is Isolation.NAMESPACE:
        return [shutil.which("unshare") or "unshare", "-rn", sys.executable, "-I", "main.py"]
    return [sys.executable, "-I", "-c", _PREAMBLE]


def _classify(returncode: int, stderr: str) -> Status:
    if returncode == 0:
        return Status.PASSED
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # the CPU limit: SIGXCPU, then SIGKILL at the hard one
        return Status.TIMEOUT
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if last.startswith("MemoryError"):
        return Status.MEMORY
    if last.startswith("AssertionError"):
        return Status.FAILED
    return Status.ERROR


def wait_killing_group(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """Waits for `proc` (started with start_new_session=True, so it leads a process group) up to `timeout_s`;
    then kills its whole group, and so whatever it left running too. Its exit status, or None if the
    limit was reached."""
    try:
        returncode: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        returncode = None
    try:  # whatever the program left running in its group goes too
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return returncode


def run(code: str, limits: Limits = DEFAULT_LIMITS, isolation: Isolation | None = None) -> Result:
    """Runs `code` as a program in a child process under `limits`; never raises for what the code does."""
    isolation = isolation or available_isolation()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="judgeserve-sandbox-") as tmp:
        folder = Path(tmp)
        (folder / "main.py").write_text(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"}
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            proc = subprocess.Popen(
                _command(isolation),
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so that a kill reaches its children too
                preexec_fn=functools.partial(_set_limits, limits),  # noqa: PLW1509 (setrlimit only)
            )
            returncode = wait_killing_group(proc, limits.wall_s)
        stdout = (folder / "stdout").read_bytes()[: limits.output_bytes].decode("utf-8", errors="replace")
        stderr = (folder / "stderr").read_bytes()[-2000:].decode("utf-8", errors="replace")
    status = Status.TIMEOUT if returncode is None else _classify(returncode, stderr)
    return Result(status, stdout, stderr, returncode, time.perf_counter() - t0)
