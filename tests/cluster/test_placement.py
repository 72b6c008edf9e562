"""Where cluster.ray_backend puts the actors (plan_placement, pure), and what a start does on a cluster too
small for them: it waits for the cluster to grow, saying what it waits for, and gives up after
serve.placement_timeout_s naming what was missing (an autoscaling cluster grows for the pending groups:
tests/cluster/test_autoscaling.py)."""

from __future__ import annotations

import asyncio
import logging

import psutil
import pytest
import ray
from pydantic import ValidationError
from ray._private import ray_constants

from cluster import ray_backend
from cluster.ray_backend import Slot, plan_placement
from engine.config import DraftPlacement


def _serve(tiny_config, **update):
    return tiny_config.serve.model_copy(update=update)


def test_own_gpu_puts_the_draft_beside_the_shards_in_one_group(tiny_config):
    plan = plan_placement(_serve(tiny_config, tensor_parallel=2, cpus_per_actor=3), cuda=True)
    assert plan.groups == (({"CPU": 3, "GPU": 1},) * 3,)
    assert plan.shards == (Slot(0, 0, 3, 1), Slot(0, 1, 3, 1))
    assert plan.draft == Slot(0, 2, 3, 1)
    assert plan.scheduler == Slot(0, 2, 0, 0) and plan.judge == Slot(0, 0, 0, 0)
    assert plan.requested() == {"CPU": 9, "GPU": 3}


def test_share_gpu_splits_rank_0s_gpu_between_the_shard_and_the_draft(tiny_config):
    serve = _serve(tiny_config, tensor_parallel=8, draft_placement=DraftPlacement.SHARE_GPU)
    plan = plan_placement(serve, cuda=True)
    assert plan.groups == (({"CPU": 2, "GPU": 1},) + ({"CPU": 1, "GPU": 1},) * 7,)
    assert plan.shards[0] == Slot(0, 0, 1, 0.5) and plan.draft == Slot(0, 0, 1, 0.5)
    assert all(s == Slot(0, rank, 1, 1) for rank, s in enumerate(plan.shards) if rank)
    assert plan.requested() == {"CPU": 9, "GPU": 8}  # 8 GPUs in all: one 8-GPU node


def test_own_node_gives_the_draft_a_placement_group_of_its_own(tiny_config):
    plan = plan_placement(_serve(tiny_config, tensor_parallel=2, draft_placement=DraftPlacement.OWN_NODE), cuda=False)
    assert plan.groups == (({"CPU": 1}, {"CPU": 1}), ({"CPU": 1},))
    assert plan.draft == Slot(1, 0, 1, 0)
    assert plan.scheduler == Slot(0, 1, 0, 0)  # beside the shards, not the draft


def test_in_rank0_reserves_nothing_for_the_draft_and_needs_one_rank_without_pipelining(tiny_config):
    serve = _serve(tiny_config, draft_placement=DraftPlacement.IN_RANK0, pipeline=False)
    plan = plan_placement(serve, cuda=True)
    assert plan.groups == (({"CPU": 1, "GPU": 1},),)
    assert plan.shards == (Slot(0, 0, 1, 1),) and plan.draft is None
    assert plan.requested() == {"CPU": 1, "GPU": 1}
    for update, why in (({"pipeline": True}, "serve.pipeline needs the draft in a process of its own"),
                        ({"tensor_parallel": 2}, "in_rank0 needs tensor_parallel 1")):
        with pytest.raises(ValidationError, match=why):
            tiny_config.model_validate(tiny_config.model_dump() | {"serve": serve.model_dump() | update})


@pytest.fixture
def one_cpu_ray():
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
    yield
    ray.shutdown()


@pytest.mark.timeout(120)
def test_a_cluster_too_small_is_waited_for_then_refused_naming_what_is_missing(
    tiny_config, one_cpu_ray, monkeypatch, caplog
):
    monkeypatch.setattr(ray_backend, "PLACEMENT_PROGRESS_S", 0.5)
    config = tiny_config.model_copy(update={"serve": _serve(tiny_config, placement_timeout_s=2.0)})
    backend = ray_backend.RayBackend(config)  # two 1-CPU bundles on a 1-CPU cluster: never placed
    try:
        with caplog.at_level(logging.INFO, logger="judgeserve.ray_backend"):
            assert asyncio.run(backend.ready()) is False
        progress = [r.getMessage() for r in caplog.records if "waiting for the autoscaler" in r.getMessage()]
        assert progress and "CPU: 2 requested, 1 available" in progress[0]
        refusal = next(r for r in caplog.records if r.exc_info)
        assert "did not place the actors within serve.placement_timeout_s (2 s)" in str(refusal.exc_info[1])
    finally:
        backend.close()
    assert {g["state"] for g in ray.util.placement_group_table().values()} == {"REMOVED"}


def test_a_local_ray_started_for_the_actors_listens_on_loopback_only():
    assert ray_backend._start_ray(None, {"CPU": 1}) is True
    try:
        listening = set()
        for proc in psutil.Process().children(recursive=True):
            sockets = proc.net_connections(kind="tcp")
            listening.update(c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN)
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    finally:
        ray.shutdown()
    assert ray_constants.ENABLE_RAY_CLUSTER is True  # restored: a later ray.init may join a real cluster
