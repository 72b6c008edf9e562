"""The local twin of ray_cluster.yaml (ray_cluster.local.yaml: Ray's fake multi-node provider, a head with no
CPUs and two worker types that start with no nodes), driven as the cloud one is: `ray job submit` of the
serve job with config/tiny-cluster.yaml. Its placement groups alone must make the autoscaler add one node
of each type (the two shards' STRICT_PACK group on the 2-CPU cpu-target node, the draft's own group on the
1-CPU cpu-draft node); then a completion over gRPC; `ray job stop` frees the actors and placement groups,
and the idle nodes go away again."""

from __future__ import annotations

import time

import pytest
import yaml
from ray.job_submission import JobStatus
from ray.util.state.common import StateResource

from cluster.client import JudgeserveClient
from tests.cluster.ray_head import LOOPBACK, ROOT, RayHead

pytestmark = pytest.mark.timeout(300)

IDLE_TIMEOUT_MINUTES = 0.1  # the twin's 1 minute, shortened so the test sees the nodes go


@pytest.fixture(scope="module")
def twin():
    config = yaml.safe_load((ROOT / "ray_cluster.local.yaml").read_text())
    cluster = RayHead(num_cpus=0, autoscaling_config=dict(config, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES))
    yield cluster
    cluster.teardown()


def _workers(head: RayHead) -> list:
    return [n for n in head.list(StateResource.NODES) if n.state == "ALIVE" and not n.is_head_node]


def _wait_workers(head: RayHead, count: int, timeout: float) -> tuple[list, float]:
    start = time.monotonic()
    while len(nodes := _workers(head)) != count:
        assert time.monotonic() - start < timeout, f"{len(nodes)} worker nodes after {timeout} s, not {count}"
        time.sleep(0.5)
    return nodes, time.monotonic() - start


def test_the_serve_job_makes_the_autoscaler_add_the_nodes_its_actors_ask_for(twin):
    assert _workers(twin) == []  # min_workers 0: an idle cluster is its head alone
    # No --working-dir here: the fake nodes share this machine's disk and Ray's temp dir, so each node's
    # runtime-env agent would unpack the same package into the same folder, replacing it under the
    # processes already running in it (seen: the driver's cwd vanished, torch failed to load). The cluster's
    # PYTHONPATH is the repository instead (test_job_submit.py covers --working-dir on a real node).
    job = twin.submit(
        "python", "-m", "cluster.server", "--config", str(ROOT / "config" / "tiny-cluster.yaml"), "--port", "0",
        "--metrics-port", "-1", "--grace", "1", working_dir=False,
    )  # fmt: skip
    address = twin.wait_for_log(job, r"listening on (\S+)", timeout=120).group(1)  # before the nodes exist
    nodes, up_s = _wait_workers(twin, 2, timeout=120)
    print(f"\nthe autoscaler brought up {len(nodes)} nodes {up_s:.1f} s after the server listened")
    by_cpus = {n.resources_total["CPU"]: n.node_id for n in nodes}
    assert sorted(by_cpus) == [1.0, 2.0]  # one cpu-draft, one cpu-target

    twin.wait_for_log(job, r" ready$", timeout=120)
    with JudgeserveClient(address) as client:
        result = client.generate("The quick", max_tokens=8, mode="standard", timeout=60)
    assert result["completion_tokens"] == 8 and result["finish_reason"] == "length"
    where = {}
    for actor in twin.live_actors():
        where.setdefault(actor.class_name, []).append(actor.node_id)
    assert where["TargetShard"] == [by_cpus[2.0]] * 2  # the TP group packed on one node
    assert where["DraftWorker"] == [by_cpus[1.0]]  # serve.draft_placement own_node
    assert where["Scheduler"] == [by_cpus[2.0]]  # beside the shards
    listening = twin.listening()  # the head, both worker nodes, the job's server
    exposed = {name for ip, names in listening.items() if ip not in LOOPBACK for name in names}
    # Ray's ports (GCS, dashboard and job API, client server, raylets, agents), the gRPC server and the TP
    # group (a file rendezvous: actors/target_shard.rendezvous) are all on loopback or open no port.
    assert LOOPBACK & listening.keys() and not exposed, listening

    twin.ray("job", "stop", job)
    assert twin.wait_for_status(job, {JobStatus.STOPPED}, timeout=90) is JobStatus.STOPPED
    assert not [a for a in twin.live_actors() if a.class_name in where]
    assert twin.live_placement_groups() == []
    _, down_s = _wait_workers(twin, 0, timeout=120)
    print(f"and took them down {down_s:.1f} s after the job stopped (idle_timeout_minutes {IDLE_TIMEOUT_MINUTES})")
