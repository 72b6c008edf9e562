"""bench.hops on the CPU: the step graph's shape in miniature as a Ray Compiled Graph, each hop timed."""

from __future__ import annotations

import json

from bench import hops


def test_hops_leave_the_bodies_out():
    # two steps: hops of 1, 2, 3 ms around bodies of 20 ms, then of 3, 2, 1 around bodies of 50
    stamps = [[0.0, 0.001, 0.021, 0.023, 0.043, 0.046], [1.0, 1.003, 1.053, 1.055, 1.105, 1.106]]
    assert hops.hop_medians(stamps) == {"driver -> draft": 2.0, "draft -> shard": 2.0, "shard -> driver": 2.0, "sum": 6.0}


def test_each_body_times_the_three_hops_and_writes_the_record(tmp_path):
    out = tmp_path / "hops.json"
    hops.main(["--bodies", "none,sleep,cuda", "--body-ms", "2", "--steps", "3", "--pin", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["card"] == "CPU" and record["command"].startswith("python3 -m bench.hops --bodies")
    assert set(record["hop_ms"]) == {"none", "sleep", "none pinned", "sleep pinned"}  # no cuda without a GPU
    for spans in record["hop_ms"].values():
        assert set(spans) == {*hops.HOPS, "sum"}
        assert all(ms > 0 for ms in spans.values())
