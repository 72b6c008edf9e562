"""ray_cluster.yaml (AWS) and its local twin ray_cluster.local.yaml, checked without a cloud: Ray's own schema
accepts them, every placement group of the shipped configs fits one node of a worker type (so the autoscaler
can satisfy it), access is locked down (token authentication, loopback dashboard, private addresses), and
every key carries a comment. The twin is run for real in test_autoscaling.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import validate_config

from cluster.ray_backend import plan_placement
from engine.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLOUD, TWIN = ROOT / "ray_cluster.yaml", ROOT / "ray_cluster.local.yaml"
GPU_CONFIGS = ["llama-8b-70b.yaml", "llama-8b-405b.yaml"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _fits(group: tuple[dict[str, float], ...], resources: dict[str, float]) -> bool:
    """A STRICT_PACK group fits a node when the node has the sum of its bundles."""
    names = {name for bundle in group for name in bundle}
    return all(sum(bundle.get(name, 0) for bundle in group) <= resources.get(name, 0) for name in names)


@pytest.mark.parametrize("path", [CLOUD, TWIN], ids=["cloud", "twin"])
def test_the_cluster_files_pass_rays_schema(path):
    validate_config(_load(path))


@pytest.mark.parametrize(
    ("path", "configs"), [(CLOUD, GPU_CONFIGS), (TWIN, ["tiny-cluster.yaml"])], ids=["cloud", "twin"]
)
def test_every_placement_group_fits_one_node_of_a_worker_type_and_none_fits_the_head(path, configs):
    cluster = _load(path)
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]["resources"]
    assert head.get("CPU", 0) == 0 and head.get("GPU", 0) == 0  # the head runs job drivers only
    for name in configs:
        config = load_config(ROOT / "config" / name)
        plan = plan_placement(config.serve, cuda=config.runtime.device.startswith("cuda"))
        for group in plan.groups:
            fitting = [
                t for t, spec in types.items() if t != cluster["head_node_type"] and _fits(group, spec["resources"])
            ]
            assert fitting, f"{name}: no worker type of {path.name} holds the group {group}"
            assert all(types[t]["min_workers"] == 0 for t in fitting)  # brought up by demand, not kept idle


def test_the_twin_puts_the_tp_group_and_the_draft_on_different_worker_types():
    types = _load(TWIN)["available_node_types"]
    config = load_config(ROOT / "config" / "tiny-cluster.yaml")
    target, draft = plan_placement(config.serve, cuda=False).groups
    assert [t for t in types if t != "ray.head.default" and _fits(target, types[t]["resources"])] == ["cpu-target"]
    assert _fits(draft, types["cpu-draft"]["resources"])


def test_the_cloud_cluster_requires_rays_token_and_keeps_the_dashboard_on_loopback():
    cluster = _load(CLOUD)
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in cluster["worker_start_ray_commands"] if "ray start" in c)
    assert "/home/ubuntu/.ray/auth_token" in cluster["file_mounts"]  # the token reaches every node
    assert cluster["provider"]["use_internal_ips"] is True
    assert all(t["node_config"]["SecurityGroupIds"] for t in cluster["available_node_types"].values())
    assert "0.0.0.0" not in CLOUD.read_text()


def test_the_twin_binds_loopback():
    cluster = _load(TWIN)
    assert cluster["provider"]["gcs_address"].startswith("127.0.0.1:")
    assert "--node-ip-address=127.0.0.1" in TWIN.read_text() and "--dashboard-host=127.0.0.1" in TWIN.read_text()


@pytest.mark.parametrize("path", [CLOUD, TWIN], ids=["cloud", "twin"])
def test_every_key_has_a_comment(path):
    lines = path.read_text().splitlines()
    bare = [
        f"{i + 1}: {line}"
        for i, line in enumerate(lines)
        if re.match(r"^\s*(- )?[\w./~-]+:", line) and "#" not in line and not lines[i - 1].lstrip().startswith("#")
    ]
    assert bare == []
