"""bench.hops on the CPU: the step graph's shape in miniature as a Ray Compiled Graph, each hop timed."""

from __future__ import annotations

import json

from bench import hops


def test_each_body_times_the_three_hops_and_writes_the_record(tmp_path):
    out = tmp_path / "hops.json"
    hops.main(["--bodies", "none,sleep,cuda", "--body-ms", "20", "--steps", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["card"] == "CPU" and record["command"].startswith("python3 -m bench.hops --bodies")
    assert set(record["hop_ms"]) == {"none", "sleep"}  # cuda is left out without a GPU
    for spans in record["hop_ms"].values():
        assert set(spans) == {*hops.HOPS, "sum"}
        assert all(ms > 0 for ms in spans.values())
        assert spans["sum"] < 20  # the two 20 ms bodies are taken out: what is left is the hops (ms here)
