"""bench.suite on the CPU: its steps run as processes that may fail or overrun (each reported, none fatal),
and its table and JSON read the benchmarks' own result files (recorded device runs in bench/results)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bench import suite

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
RECORDED = {  # a step of each plan -> a result file that step's benchmark wrote on a device
    "gpu": "gpu_8b_int8_kernel_h100.json",
    "served": "serve_gpu_8b_1b_ar8_h100.json",
    "8b-70b": "tp2_8b_70b_int8_512_unstacked_h200x2.json",
    "pipeline-1b": "pipeline_1b_70b_int8_h100x2.json",
}


def _outcome(name: str) -> suite.Outcome:
    step = next(s for plan in suite.PLANS.values() for s in plan if s.name == name)
    return suite.Outcome(step, "python3 ...", 0, 1.0, json.loads((RESULTS / RECORDED[name]).read_text()))


def test_plans_cover_all_six_measurements_with_the_commands_the_docs_give():
    covered = sorted({m for plan in suite.PLANS.values() for step in plan if step.default for m in step.measurements})
    assert covered == [1, 2, 3, 4, 5, 6]
    for plan in suite.PLANS.values():
        for step in plan:
            assert step.argv[:2] == ("-m", f"bench.{step.argv[1].split('.')[1]}") and "--out" not in step.argv
        # one device command: 600 s, the suite's own start too
        assert sum(step.timeout_s for step in plan if step.default) <= 590
    assert all(Path(t).is_file() for t in suite.TRACES)  # absolute: Ray workers read them elsewhere


def test_table_and_record_take_each_figure_from_the_step_that_measures_it():
    outcomes = [_outcome(name) for name in RECORDED]
    rows = dict.fromkeys(range(1, 7), "")
    for o in outcomes:
        for m, text in suite.figures(o):
            rows[m] += text
    assert "ceiling 187.4" in rows[1] and "HF generate -" in rows[1]  # that run left HF out (--no-hf)
    assert "pass ms by rows" in rows[2] and "(1.00x)" in rows[2]
    assert "replayed acceptance" in rows[3] and "(predicted 461.7)" in rows[3]
    assert rows[4] == "ar served 0.978" and "1.228x" in rows[5] and "157.2 tokens/s" in rows[6]
    table = suite.table(outcomes)
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]][:3] == ["| 1", "| 2", "| 3"]
    record = suite.record("both", outcomes, "python3 -m bench.suite")
    assert record["e2e_over_inprocess"] == {"ar served": 0.978}
    assert record["pipelined_over_sequential"] == {"standard (replayed synthetic 11.5:12:runs) K=12 streams=1": 1.228}
    # a figure two steps measure is the first step's (a real suite runs one machine's plan: here both)
    assert record["judge_tokens_per_s"] == outcomes[0].results["judge_tokens_per_s"] == 395.29  # 1B/8B's
    assert [s["name"] for s in record["steps"]] == list(RECORDED) and "H100" in record["card"]
    two = suite.record("two-gpu", outcomes[2:], "python3 -m bench.suite --machine two-gpu")
    assert (two["judge_tokens_per_s"], two["ar_tokens_per_s"]) == (157.23, 44.4)  # 8B/70B's
    assert two["card"] == "2 x NVIDIA H100 80GB HBM3 / 2 x NVIDIA H200"


def test_a_step_that_fails_or_overruns_is_reported_and_the_others_still_count(tmp_path):
    writes = suite.Step("served", (4,), (
        "-c", "import json, sys; open(sys.argv[2], 'w').write(json.dumps({'e2e_over_inprocess': {'ar served': 0.5}}))",
    ), 60)
    fails = suite.Step("gpu", (1, 2, 3), ("-c", "raise SystemExit(3)"), 60)
    hangs = suite.Step("8b-70b", (6,), (  # and starts a process of its own, as a benchmark's Ray does
        "-c", (
            "import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
            "open(sys.argv[2] + '.pid', 'w').write(str(child.pid)); time.sleep(60)"
        ),
    ), 2)
    outcomes = [suite.run_step(s, tmp_path) for s in (fails, hangs, writes)]
    assert [o.rc for o in outcomes] == [3, None, 0] and outcomes[1].seconds < 30
    child = Path(f"{tmp_path / '8b-70b.json'}.pid").read_text()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), "the overrunning step's own process outlived it"
    table = suite.table(outcomes)
    assert "no result (gpu: exit status 3" in table and "no result (8b-70b: timed out" in table
    assert "| 4 | >= 0.95 | ar served 0.500 |" in table
    assert suite.record("one-gpu", outcomes, "")["e2e_over_inprocess"] == {"ar served": 0.5}


def _running(pid: str) -> bool:
    """Whether the process exists and is not a zombie (killed, not yet reaped by whoever adopted it)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\tZ" not in next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False


def test_unknown_steps_are_refused_with_the_machines_steps(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--machine", "one-gpu", "--steps", "gpu,pipeline"])
    assert "--machine one-gpu has no step pipeline (its steps: gpu, served)" in capsys.readouterr().err


def test_main_runs_the_chosen_steps_under_the_given_limit_and_writes_the_record(tmp_path, monkeypatch):
    ran = []

    def fake_run(step, folder):
        ran.append(step)
        return suite.Outcome(step, "python3 ...", None, float(step.timeout_s), None)

    monkeypatch.setattr(suite, "run_step", fake_run)
    out = tmp_path / "suite.json"
    suite.main(["--machine", "two-gpu", "--steps", "pipeline", "--limit-s", "580", "--out", str(out)])
    assert [(s.name, s.timeout_s) for s in ran] == [("pipeline", 580)]
    record = json.loads(out.read_text())
    assert record["machine"] == "two-gpu" and record["steps"][0]["rc"] is None and record["card"] is None
    want = f"python3 -m bench.suite --machine two-gpu --steps pipeline --limit-s 580 --out {out}"
    assert record["command"] == want
    ran.clear()
    suite.main(["--machine", "two-gpu", "--out", str(out)])  # the plan: a step left out of it runs only when named
    assert [s.name for s in ran] == ["8b-70b", "pipeline"]
