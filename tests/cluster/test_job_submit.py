"""`ray job submit` against a local cluster started with `ray start --head` (token authentication on, every
port on 127.0.0.1), with the tiny pair: the serve job says where it listens and serves over gRPC; `ray job
stop` drains it and frees its actors and placement groups; the batch job, stopped halfway and submitted
again, skips the prompts it finished and loses none."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from ray.job_submission import JobStatus

from cluster.client import JudgeserveClient
from tests.cluster.ray_head import LOOPBACK, RayHead

pytestmark = pytest.mark.timeout(300)

MODEL_ACTORS = {"TargetShard", "DraftWorker", "JudgeScorer", "Scheduler"}


@pytest.fixture(scope="module")
def head():
    cluster = RayHead(num_cpus=4)  # logical CPUs: the tiny pair's two 1-CPU actors, with room to spare
    yield cluster
    cluster.teardown()


def _assert_freed(head: RayHead) -> None:
    """No actor of the serving system alive and no placement group left (the job's driver is gone too)."""
    assert not [a.class_name for a in head.live_actors() if a.class_name in MODEL_ACTORS]
    assert head.live_placement_groups() == []


def test_the_serve_job_listens_serves_and_frees_everything_when_stopped(head):
    job = head.submit(
        "python", "-m", "cluster.server", "--config", "config/tiny.yaml", "--port", "0", "--metrics-port", "-1",
        "--grace", "1",
    )  # fmt: skip
    address = head.wait_for_log(job, r"listening on (\S+)", timeout=120).group(1)
    head.wait_for_log(job, r" ready$", timeout=120)
    with JudgeserveClient(address) as client:
        assert client.health() == "SERVING"
        *deltas, final = list(client.stream("The quick", max_tokens=8, mode="standard", timeout=60))
    assert final.result["completion_tokens"] == 8 and final.result["finish_reason"] == "length"
    assert "".join(d.text for d in deltas) == final.result["text"]
    assert {a.class_name for a in head.live_actors()} >= {"TargetShard", "DraftWorker", "Scheduler"}
    assert [g.state for g in head.live_placement_groups()] == ["CREATED"]
    listening = head.listening()  # GCS, dashboard (job API), client server, raylet, agents, the server
    assert listening and listening.keys() <= LOOPBACK, listening

    head.ray("job", "stop", job)
    assert head.wait_for_status(job, {JobStatus.STOPPED}, timeout=90) is JobStatus.STOPPED
    logs = head.jobs.get_job_logs(job)
    assert re.search(r"shutting down: in-flight requests have 1 s", logs) and re.search(
        r" stopped$", logs, re.MULTILINE
    )
    _assert_freed(head)
    host, port = address.rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


def test_a_stopped_batch_job_submitted_again_skips_finished_prompts_and_loses_none(head, tmp_path):
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}", "max_tokens": 96, "ignore_eos": True} for i in range(8)]
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    command = ["python", "-m", "cluster.batch", "--config", "config/tiny.yaml", "--input", str(inp)]
    command += ["--output", str(out), "--no-progress"]

    first = head.submit(*command)
    head.wait_for_log(first, r"8 lines, 0 finished earlier, 8 to run", timeout=120)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().count("\n")):  # the first finished prompt
        assert head.jobs.get_job_status(first) is JobStatus.RUNNING and time.monotonic() < deadline
        time.sleep(0.1)
    head.ray("job", "stop", first)
    assert head.wait_for_status(first, {JobStatus.STOPPED}, timeout=90) is JobStatus.STOPPED
    _assert_freed(head)
    kept = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert 1 <= len(kept) < len(prompts), "the job should have been stopped halfway"

    second = head.submit(*command)
    assert head.wait_for_status(second, {JobStatus.SUCCEEDED}, timeout=180) is JobStatus.SUCCEEDED
    assert f"{len(prompts) - len(kept)} to run" in head.jobs.get_job_logs(second)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in prompts)  # each prompt once
    assert all(r["completion_tokens"] == 96 and "error" not in r for r in records)
    assert all(r == kept[r["id"]] for r in records if r["id"] in kept)  # finished records untouched
    _assert_freed(head)
