"""bench.concurrency on the CPU with the tiny pair: the served rounds, replayed traces and the pipelined /
sequential comparison that the device runs use (measurements 5 and 6 of docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import concurrency
from engine.trace import AcceptanceTrace


def test_trace_specs_give_binomial_or_prefix_runs_and_refuse_the_rest(tmp_path):
    binomial = AcceptanceTrace.load(concurrency.trace_for("3.5:4", "standard", tmp_path).path)
    runs = AcceptanceTrace.load(concurrency.trace_for("3.5:4:runs", "standard", tmp_path).path)
    assert binomial.mode == runs.mode == "standard" and binomial.draft_tokens == runs.draft_tokens == 4
    # prefix runs accept whole blocks far more often than a binomial of the same mean (a^K against p^K)
    whole = [sum(n == 4 for n in t.accepted) / len(t.accepted) for t in (binomial, runs)]
    assert whole[1] > whole[0] + 0.1
    for bad in ("3.5", "3.5:4:sideways", "9:4"):
        with pytest.raises(SystemExit, match=f"--judge-trace {bad}"):
            concurrency.trace_for(bad, "judge", tmp_path)


def test_pipelined_and_sequential_backends_serve_the_same_rounds(tmp_path):
    out: Path = tmp_path / "conc.json"
    argv = ["--config", "config/tiny.yaml", "--streams", "1", "--max-tokens", "24", "--modes", "ar,standard",
            "--standard-trace", "3.5:4:runs", "--pipeline", "on,off", "--set", "decoding.replay_guesses=true",
            "--set", "serve.draft_placement=own_gpu", "--out", str(out)]
    concurrency.main(argv)
    record = json.loads(out.read_text())
    assert record["command"] == "python3 -m bench.concurrency " + " ".join(argv)
    rows = record["rows"]
    assert sorted((r["kind"], r["pipeline"]) for r in rows) == [
        ("ar", False), ("ar", True), ("standard", False), ("standard", True)]
    assert all(r["tokens"] == 24 for r in rows)
    standard = {r["pipeline"]: r for r in rows if r["kind"] == "standard"}
    assert standard[True]["replayed"].startswith("replayed acceptance") and "prefix runs" in standard[True]["replayed"]
    # only the pipelined backend drafts during verification
    assert standard[True]["overlapped_draft_ms"] > 0 and standard[False]["overlapped_draft_ms"] == 0
    ratios = record["pipelined_over_sequential"]
    assert set(ratios) == {"ar K=- streams=1", "standard (replayed synthetic 3.5:4:runs) K=4 streams=1"}
    by = {(r["kind"], r["pipeline"]): r["tokens_per_s"] for r in rows}
    assert ratios["ar K=- streams=1"] == pytest.approx(by["ar", True] / by["ar", False], abs=1e-3)


def test_a_bad_pipeline_setting_is_refused_before_any_actor_starts():
    with pytest.raises(SystemExit, match="--pipeline sideways: on, off or on,off"):
        concurrency.main(["--config", "config/tiny.yaml", "--pipeline", "sideways"])
