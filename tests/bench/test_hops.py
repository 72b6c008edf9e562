"""bench.hops on the CPU: the step graph's shape in miniature as a Ray Compiled Graph, each hop timed."""

from __future__ import annotations

import json

import pytest

from bench import hops


def test_hops_leave_the_bodies_out():
    # two steps: hops of 1, 2, 3 ms around bodies of 20 ms, then of 3, 2, 1 around bodies of 50
    stamps = [[0.0, 0.001, 0.021, 0.023, 0.043, 0.046], [1.0, 1.003, 1.053, 1.055, 1.105, 1.106]]
    assert hops.hop_medians(stamps) == {"driver -> draft": 2.0, "draft -> shard": 2.0, "shard -> driver": 2.0, "sum": 6.0}


def test_a_chain_of_steps_times_the_hops_between_them():
    # one execution of two steps, bodies of 10 ms: hops 1 (driver -> draft), 2 and 4 (draft -> shard),
    # 3 (shard -> draft), 5 (shard -> driver): 15 ms of transport, 7.5 a step
    at, stamps = 0.0, [0.0]
    for span in (1, 10, 2, 10, 3, 10, 4, 10, 5):
        at += span / 1e3
        stamps.append(at)
    spans = hops.hop_medians([stamps], chain=2)
    assert spans == pytest.approx({
        "driver -> draft": 1.0, "draft -> shard": 3.0, "shard -> draft": 3.0, "shard -> driver": 5.0,
        "sum": 15.0, "per step": 7.5,
    })


@pytest.mark.timeout(120)
def test_each_body_times_the_hops_pinned_and_chained_and_writes_the_record(tmp_path, monkeypatch):
    # a GPU as Ray counts it (the bodies touch no CUDA): each graph's two actors take half of it, so the
    # chained graph's actors get their shares only once the first graph's have freed theirs
    monkeypatch.setattr(hops.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hops.torch.cuda, "get_device_name", lambda: "one counted GPU")
    out = tmp_path / "hops.json"
    hops.main(["--bodies", "none,sleep", "--body-ms", "2", "--steps", "3", "--pin", "--chain", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["card"] == "one counted GPU" and record["command"].startswith("python3 -m bench.hops --bodies")
    assert set(record["hop_ms"]) == {"none", "sleep", "none pinned", "sleep pinned", "none chain 2", "sleep chain 2"}
    for name, spans in record["hop_ms"].items():
        chained = {"shard -> draft", "per step"} if "chain" in name else set()
        assert set(spans) == {*hops.HOPS, "sum", *chained}
        assert all(ms > 0 for ms in spans.values())
