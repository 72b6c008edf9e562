"""Every measurement of the GPU issue that one machine can make, in one command and one device run: the
benchmarks that make them run one after another, each in its own process under its own time limit, then
one table and one JSON file with the issue's field names.

    source .device/bootstrap.sh && python3 -m bench.suite --machine one-gpu --out $OUT/suite.json
    source .device/bootstrap.sh && python3 -m bench.suite --machine two-gpu --out $OUT/suite.json

one-gpu (a Llama-3.2-1B draft and a Llama-3.1-8B target, one H100 or H200): measurements 1-3 (bench.gpu:
autoregressive tokens/s against the card's ceiling and HF generate, verification latency by rows, judge
and standard decoding with the recorded real traces replayed) and 4 (bench.serve_cpu: served over
in-process). two-gpu (2 x H100 or H200): measurement 6 (bench.concurrency: 8B/70B, both int8, TP=2, the
paper's mean acceptance 19.7 replayed) and 5 (bench.concurrency: a 3B int8 draft on its own GPU for a 70B
int8 target, pipelined against sequential; `--steps pipeline-8b` and `pipeline-1b` run the same with the
paper's 8B draft and with a 1B). The commands are those of docs/performance.md. Weights are dummy
at real shapes and acceptance is replayed: every table row says which.

A step that fails or outlasts its limit is a row that says so; the others still run, and the JSON keeps
each step's command, exit status, seconds and results (its `steps`). Steps run in the order given, so
the measurement most wanted comes first (`--steps`).

Not for: the CPU (bench.gpu needs CUDA; the CPU figures come from bench.engine_cpu and bench.serve_cpu).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import command_line, write_results
from training.sandbox import wait_killing_group

# absolute: the served steps' actors read the trace in Ray workers, whose working folder is not this one
TRACES = tuple(
    str(Path(__file__).resolve().parent / "traces" / f"qwen-coder-{mode}-k8.json") for mode in ("standard", "judge")
)
GOALS = {  # the issue's goals, as the table prints them
    1: ">= 165 tokens/s bf16 on an H100 (ceiling ~188)",
    2: "measured",
    3: "speedup next to DESIGN.md's prediction",
    4: ">= 0.95",
    5: ">= 1.3x at mean acceptance >= 10",
    6: "> 141 tokens/s (paper, 2 x H100)",
}


@dataclass(frozen=True)
class Step:
    name: str
    measurements: tuple[int, ...]
    argv: tuple[str, ...]  # after `python3`; the step's --out is added
    timeout_s: int
    default: bool = True  # in the machine's plan when --steps is not given


_SERVE_8B_1B = (
    "-m", "bench.serve_cpu", "--config", "config/tiny.yaml", "--set", "runtime.device=cuda",
    "--set", "target.model=dummy:llama-3.1-8b", "--set", "draft.model=dummy:llama-3.2-1b",
    "--set", "target.dtype=bfloat16", "--set", "draft.dtype=bfloat16", "--set", "serve.draft_placement=in_rank0",
    "--set", "decoding.max_seq_len=512", "--set", "decoding.draft_tokens=8",
    "--set", f"decoding.replay_trace={TRACES[0]}", "--synthetic", "3", "--max-tokens", "128", "--threads", "4",
    "--pipeline", "off", "--paths", "served",
)
_LLAMA_70B = (
    "-m", "bench.concurrency", "--config", "config/llama-8b-70b.yaml", "--set", "target.model=dummy:llama-3.1-70b",
    "--set", "target.quantize=int8", "--set", "runtime.compile=true", "--streams", "1",
)
# Measurement 5: the draft on its own GPU, pipelined against sequential, at 10.1 accepted tokens a step
_PIPELINE_70B = (
    *_LLAMA_70B, "--set", "serve.tensor_parallel=1", "--set", "serve.draft_placement=own_gpu",
    "--set", "decoding.max_seq_len=1024", "--set", "decoding.replay_guesses=true", "--max-tokens", "256",
    "--modes", "standard", "--draft-tokens", "12", "--standard-trace", "11.5:12:runs", "--pipeline", "on,off",
)
_INT8_DRAFT = ("--set", "draft.quantize=int8")
# Step limits from the first whole runs (2026-11-27, fresh machines, bench/results/suite_*.json): gpu 387 s,
# served 59 s (H100); 8b-70b 222 s; pipeline 147 s with its shapes compiled, about 290 s on a fresh machine
# (its own command's run there). Each plan's limits add up to 580 s, under a device command's 600.
PLANS: dict[str, tuple[Step, ...]] = {
    "one-gpu": (
        # bf16 last: the speculative rows run on the last path, the lossless one
        Step("gpu", (1, 2, 3), (
            "-m", "bench.gpu", "--paths", "compiled-int8,compiled", "--rows", "1,2,3,5,9,17,33,65",
            "--trace", TRACES[0], "--trace", TRACES[1], "--synthetic", "19.7:32",
        ), 460),
        Step("served", (4,), _SERVE_8B_1B, 120),
    ),
    "two-gpu": (
        Step("8b-70b", (6,), (
            *_LLAMA_70B, *_INT8_DRAFT, "--set", "draft.model=dummy:llama-3.1-8b",
            "--max-tokens", "512", "--modes", "ar,judge", "--draft-tokens", "16", "--judge-trace", "19.7:32",
        ), 265),
        # A 3B draft (int8, its own GPU) for a 70B int8 target (TP=1, all of the other GPU): its 12 passes
        # take about as long as the 70B's verification, so a step has the most to hide (docs/performance.md)
        Step("pipeline", (5,), (*_PIPELINE_70B, *_INT8_DRAFT, "--set", "draft.model=dummy:llama-3.2-3b"), 315),
        # Run when named: the paper's 8B draft, whose drafting outlasts the verification (a wrong guess waits
        # for the block drafted ahead), and a 1B draft, whose drafting is a small share of a step
        Step("pipeline-8b", (5,), (*_PIPELINE_70B, *_INT8_DRAFT, "--set", "draft.model=dummy:llama-3.1-8b"), 315,
             default=False),
        Step("pipeline-1b", (5,), (*_PIPELINE_70B, "--set", "draft.model=dummy:llama-3.2-1b"), 315, default=False),
    ),
}


@dataclass
class Outcome:
    step: Step
    command: str
    rc: int | None  # None: killed at its time limit
    seconds: float
    results: dict | None  # the step's JSON, where it wrote one


def run_step(step: Step, folder: Path, python: str = sys.executable) -> Outcome:
    """Runs one step in its own process (its output goes to this one's). At its time limit, and at its end,
    every process it started in its group goes too (a benchmark's local Ray, whose workers hold the GPUs the
    next step needs)."""
    out = folder / f"{step.name}.json"
    argv = [python, *step.argv, "--out", str(out)]
    command = shlex.join(["python3", *argv[1:]])
    print(f"== {step.name} (measurement {', '.join(map(str, step.measurements))}): {command}", flush=True)
    t = time.perf_counter()
    rc = wait_killing_group(subprocess.Popen(argv, start_new_session=True), step.timeout_s)
    seconds = time.perf_counter() - t
    try:
        results = json.loads(out.read_text())
    except (FileNotFoundError, ValueError):  # none written, or cut off mid-write by the kill
        results = None
    return Outcome(step, command, rc, round(seconds, 1), results)


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.3g}{unit}" if abs(x) < 10 else f"{x:.1f}{unit}"


def figures(outcome: Outcome) -> list[tuple[int, str]]:
    """(measurement, what it measured) rows for one step's results, in words and numbers."""
    r, name = outcome.results, outcome.step.name
    if r is None:
        why = "timed out" if outcome.rc is None else f"exit status {outcome.rc}"
        return [(m, f"no result ({name}: {why} after {outcome.seconds:.0f} s)") for m in outcome.step.measurements]
    if name == "served":
        return [(4, ", ".join(f"{k} {v:.3f}" for k, v in r.get("e2e_over_inprocess", {}).items()))]
    if name.startswith("pipeline"):
        return [(5, ", ".join(f"{k}: {v:.3f}x" for k, v in r.get("pipelined_over_sequential", {}).items()))]
    if name == "8b-70b":
        judge, ar = _fmt(r.get("judge_tokens_per_s")), _fmt(r.get("ar_tokens_per_s"))
        return [(6, f"judge (replayed) {judge} tokens/s, ar {ar}")]
    # gpu: measurements 1-3
    paths = ", ".join(f"{p} {_fmt(v)}" for p, v in r.get("ar_tokens_per_s_by_path", {}).items())
    ceiling, hf = _fmt(r.get("ceiling_tokens_per_s")), _fmt(r.get("hf_tokens_per_s"))
    rows = [(1, f"ar tokens/s: {paths}; ceiling {ceiling}; HF generate {hf}")]
    latency = r.get("verify_latency_ms", {})
    one = latency.get("1")
    by_rows = ", ".join(f"{n}: {_fmt(ms)}" + (f" ({ms / one:.2f}x)" if one else "") for n, ms in latency.items())
    rows.append((2, f"{r.get('fast_path')} pass ms by rows: {by_rows}"))
    for x in r.get("speculative_replayed", []):
        rate, predicted = _fmt(x["tokens_per_s"]), _fmt(x["predicted_tokens_per_s"])
        text = f"{x['mode']}, {x['trace']}, K={x['k']}: {rate} tokens/s, {x['speedup']:.2f}x ar (predicted {predicted})"
        rows.append((3, text))
    return rows


ISSUE_FIELDS = (
    "ar_tokens_per_s", "ceiling_tokens_per_s", "hf_tokens_per_s", "standard_tokens_per_s", "judge_tokens_per_s",
    "e2e_over_inprocess", "pipelined_over_sequential",
)


def record(machine: str, outcomes: list[Outcome], command: str) -> dict:
    """The suite's JSON: the issue's named figures (each from the step that measures it), and every step."""
    named: dict = {}
    for o in outcomes:
        for field in ISSUE_FIELDS:
            value = (o.results or {}).get(field)
            if value not in (None, {}) and field not in named:
                named[field] = value
    cards = sorted({o.results["card"] for o in outcomes if o.results and "card" in o.results})
    return {
        "benchmark": "bench.suite",
        "machine": machine,
        "card": " / ".join(cards) or None,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "shapes": {o.step.name: (o.results or {}).get("shapes") for o in outcomes},
        **named,
        "steps": [
            {"name": o.step.name, "measurements": list(o.step.measurements), "command": o.command, "rc": o.rc,
             "seconds": o.seconds, "results": o.results}
            for o in outcomes
        ],
    }


def table(outcomes: list[Outcome]) -> str:
    lines = ["| # | goal | measured (dummy weights; acceptance replayed where it says) |", "|---|---|---|"]
    rows = sorted((m, text) for o in outcomes for m, text in figures(o))
    lines += [f"| {m} | {GOALS[m]} | {text} |" for m, text in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machine", choices=sorted(PLANS), required=True)
    ap.add_argument("--steps", help="a comma-separated subset, in the order to run (default: all, as listed)")
    ap.add_argument(
        "--limit-s", type=int, help="each chosen step's time limit (default: the plan's, which fit 600 s in all)"
    )
    ap.add_argument("--out", type=Path, default=Path("suite.json"))
    args = ap.parse_args(argv)
    plan = {s.name: s for s in PLANS[args.machine]}
    names = args.steps.split(",") if args.steps else [s.name for s in PLANS[args.machine] if s.default]
    unknown = [n for n in names if n not in plan]
    if unknown:
        ap.error(f"--machine {args.machine} has no step {', '.join(unknown)} (its steps: {', '.join(plan)})")
    steps = [plan[n] if args.limit_s is None else dataclasses.replace(plan[n], timeout_s=args.limit_s) for n in names]
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = [run_step(step, Path(tmp)) for step in steps]
    print(table(outcomes))
    write_results(args.out, record(args.machine, outcomes, command_line("bench.suite", argv)))


if __name__ == "__main__":
    main()
