"""A Ray cluster started the way users start theirs: `ray start --head` (optionally with an autoscaling
config), then `ray job submit`. For test_job_submit.py and test_autoscaling.py.

Each RayHead is private to its test module: its own temp dir (so `ray.init()` elsewhere on the machine never
finds it), its own free ports, all bound to 127.0.0.1, and its own token for Ray's token authentication.
Teardown ends exactly the processes this head started, found by that temp dir and token and followed to
their children, never by name: a bare `ray stop` would stop every Ray on the machine.

Not for: anything shipped; the deployment itself is ray_cluster.yaml / ray_cluster.local.yaml.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import StateApiClient
from ray.util.state.common import ListApiOptions, StateResource

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = frozenset({"127.0.0.1", "::ffff:127.0.0.1", "::1"})


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, *, num_cpus: int, autoscaling_config: dict | None = None):
        # Short, under /tmp: Ray's Unix socket paths live below it and must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="jsray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.token_file = self.dir / "token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = dict(
            env,
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_file),
            # The worktree's code for every process of the cluster, whatever `pip install -e` points to.
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            # `ray job stop`: SIGTERM, then this long before SIGKILL (the server drains, then frees its actors).
            RAY_JOB_STOP_WAIT_TIME_S="60",
            # A one-machine cluster: without this, --node-ip-address=127.0.0.1 still leaves the GCS, raylets
            # and agents listening on every interface (measured; docs/deployment.md, "The local twin").
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        )
        command = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--temp-dir={self.dir / 'ray'}",
            "--object-store-memory=200000000", "--disable-usage-stats",
        ]  # fmt: skip
        if autoscaling_config is not None:
            config = dict(autoscaling_config, provider=dict(autoscaling_config["provider"]))
            config["provider"]["gcs_address"] = f"127.0.0.1:{self.gcs_port}"
            path = self.dir / "autoscaling.json"
            path.write_text(json.dumps(config))
            command.append(f"--autoscaling-config={path}")
            # The fake multi-node provider, and its status updates every second rather than every 5 s.
            self.env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        try:
            subprocess.run(command, env=self.env, check=True, capture_output=True, text=True, timeout=120)
        except BaseException:
            self.teardown()
            raise
        auth = {"Authorization": f"Bearer {self.token}"}
        self.jobs = JobSubmissionClient(self.dashboard, headers=auth)
        self.state = StateApiClient(self.dashboard, headers=auth)

    # ---- the ray CLI, as a user runs it ---------------------------------------------------------------

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`ray ARGS` from the repository root against this head (its address and token)."""
        return subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", *args],
            cwd=ROOT,
            env=dict(self.env, RAY_API_SERVER_ADDRESS=self.dashboard),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def submit(self, *entrypoint: str, working_dir: bool = True) -> str:
        """`ray job submit [--working-dir .] --no-wait -- ENTRYPOINT`; returns the job id. Without the
        working dir the job runs the code on the cluster's PYTHONPATH (the repository)."""
        job_id = f"judgeserve-test-{secrets.token_hex(4)}"
        upload = ["--working-dir", "."] if working_dir else []
        self.ray("job", "submit", *upload, "--submission-id", job_id, "--no-wait", "--", *entrypoint)
        return job_id

    # ---- watching -------------------------------------------------------------------------------------

    def wait_for_log(self, job_id: str, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` (a regex, per line) in the job's logs; fails if the job ends first."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.jobs.get_job_logs(job_id)
            match = re.search(pattern, logs, re.MULTILINE)
            if match:
                return match
            status = self.jobs.get_job_status(job_id)
            if status.is_terminal() or time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} ({status}) logged no {pattern!r}; its logs:\n{logs}")
            time.sleep(0.5)

    def wait_for_status(self, job_id: str, want: set[JobStatus], timeout: float) -> JobStatus:
        deadline = time.monotonic() + timeout
        while (status := self.jobs.get_job_status(job_id)) not in want:
            if status.is_terminal() or time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {status}; its logs:\n{self.jobs.get_job_logs(job_id)}")
            time.sleep(0.5)
        return status

    def list(self, resource: StateResource, **filters) -> list:
        """Ray's state API: actors, placement groups, nodes ... (filters: field=value)."""
        options = ListApiOptions(filters=[(k, "=", v) for k, v in filters.items()], detail=True)
        return self.state.list(resource, options, raise_on_missing_output=False)

    def live_actors(self) -> list:
        return [a for a in self.list(StateResource.ACTORS) if a.state != "DEAD"]

    def live_placement_groups(self) -> list:
        return [g for g in self.list(StateResource.PLACEMENT_GROUPS) if g.state != "REMOVED"]

    def listening(self) -> dict[str, set[str]]:
        """The addresses on which the cluster's processes accept TCP connections, each with the names of
        the processes that listen there."""
        found: dict[str, set[str]] = {}
        for proc in self._processes():
            try:
                sockets, name = proc.net_connections(kind="tcp"), proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            for c in sockets:
                if c.status == psutil.CONN_LISTEN:
                    found.setdefault(c.laddr.ip, set()).add(name)
        return found

    # ---- teardown -------------------------------------------------------------------------------------

    def _processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its temp dir or token file in their command line or
        environment (GCS, raylets, dashboard, autoscaler, job drivers), and all their children (workers,
        agents, the fake provider's nodes); never this test process or its parents."""
        marker = str(self.dir)
        spare = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in arg for arg in proc.info["cmdline"] or ()) or any(
                    marker in value for value in proc.environ().values()
                ):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        procs = {p.pid: p for p in roots}
        for proc in roots:
            try:
                procs.update((c.pid, c) for c in proc.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return [p for pid, p in procs.items() if pid not in spare]

    def teardown(self) -> None:
        """Ends every process of this cluster: SIGTERM, then SIGKILL for what is left after 3 s (some of
        Ray's processes outwait any grace; a test cluster's state is thrown away with its folder)."""
        victims = self._processes()
        for proc in victims:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(victims, timeout=3)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
