"""cluster.batch on the tiny pair, in-process (LocalBackend: the same Backend protocol as the Ray actors, which
tests/cluster/test_job_submit.py runs it through as a Ray job): a record with its statistics per line, an
error record naming the line for each bad one, and a re-run that keeps finished lines and redoes the rest."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cluster.backend import LocalBackend
from cluster.batch import finished_ids, run_batch
from cluster.cli import main
from engine.config import Mode
from engine.sampling import SamplingParams

TINY_YAML = Path(__file__).resolve().parents[2] / "config" / "tiny.yaml"
PROMPTS = [
    {"id": "a", "prompt": "The quick", "max_tokens": 6},
    {"id": "b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "mode": "ar"},
    {"prompt_ids": [84, 104, 101], "max_tokens": 4},
    {"id": "d", "prompt": "jumps over", "max_tokens": 7, "temperature": 0.8, "seed": 3},
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class CountingBackend(LocalBackend):
    """The in-process backend, counting the requests it runs."""

    def __init__(self, engine):
        super().__init__(engine)
        self.ran: list[str] = []

    def stream(self, request_id, request):
        self.ran.append(request_id)
        return super().stream(request_id, request)


def _run(engine, config, inp: Path, out: Path) -> tuple:
    backend = CountingBackend(engine)
    try:
        summary = asyncio.run(run_batch(backend, config, inp, out, progress=False))
    finally:
        backend.close()
    return summary, backend.ran


def test_every_line_gets_a_record_with_the_engines_completion_and_statistics(tiny_engine, tiny_config, tmp_path):
    inp, out = _write_jsonl(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    summary, _ = _run(tiny_engine, tiny_config, inp, out)
    assert (summary.lines, summary.done, summary.errors) == (4, 4, 0)
    records = {r["id"]: r for r in _records(out)}
    assert set(records) == {"a", "b", "line-3", "d"} and records["line-3"]["line"] == 3
    want = tiny_engine.generate(
        tiny_engine.make_request(prompt="The quick", params=SamplingParams(max_tokens=6), mode=None)
    )
    assert records["a"]["text"] == want.text and records["a"]["token_ids"] == want.token_ids
    assert records["a"]["steps"] == want.steps and records["a"]["finish_reason"] == "length"
    assert records["b"]["mode"] == Mode.AR.value and records["b"]["completion_tokens"] == 5
    for r in records.values():
        for key in ("prompt_tokens", "mean_accepted_per_step", "wall_seconds", "tokens_per_second", "timings"):
            assert key in r
    assert summary.tokens == sum(r["completion_tokens"] for r in records.values())


def test_a_bad_line_is_an_error_record_naming_its_line_and_the_rest_still_run(tiny_engine, tiny_config, tmp_path):
    rows = [
        PROMPTS[0],
        "{not json",
        {"id": "x", "prompt": "hi", "temprature": 0.5},
        {"id": "y", "prompt": "hi", "prompt_ids": [1]},
        {"id": "z", "prompt": "hi", "temperature": -1},
        {"id": "long", "prompt": "hi", "max_tokens": 10_000},
        {"id": "a", "prompt": "again"},
        "",
        PROMPTS[1],
    ]
    inp, out = _write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    summary, ran = _run(tiny_engine, tiny_config, inp, out)
    assert (summary.lines, summary.done, summary.errors) == (8, 2, 6)  # the blank line is no line
    errors = {r["line"]: r["error"] for r in _records(out) if "error" in r}
    assert errors[2].startswith("line 2: ") and "JSON" in errors[2]
    assert errors[3] == "line 3: temprature: unknown field"
    assert errors[4] == "line 4: give exactly one of prompt, messages or prompt_ids (got prompt, prompt_ids)"
    assert errors[5].startswith("line 5: ") and "temperature" in errors[5]
    assert errors[6].startswith("line 6: ") and "512" in errors[6]  # prompt + max_tokens > max_seq_len
    assert errors[7] == "line 7: id 'a' is also the id of line 1"
    assert ran == ["batch-1", "batch-9"]  # the bad lines never reach the backend


def test_a_rerun_keeps_finished_lines_and_redoes_errors_and_a_truncated_last_line(tiny_engine, tiny_config, tmp_path):
    inp, out = _write_jsonl(tmp_path / "in.jsonl", PROMPTS), tmp_path / "out.jsonl"
    _run(tiny_engine, tiny_config, inp, out)
    first = {r["id"]: r for r in _records(out)}
    # A job killed while writing "d" after a failed "b": a, line-3 kept; b (error) and d (cut short) redone.
    lines = [json.dumps(first["a"]), json.dumps({**first["b"], "error": "line 2: the backend failed"})]
    lines += [json.dumps(first["line-3"]), json.dumps(first["d"])[:40]]
    out.write_text("\n".join(lines))
    assert finished_ids(out) == {"a", "line-3"}
    summary, ran = _run(tiny_engine, tiny_config, inp, out)
    assert (summary.skipped, summary.done, summary.errors) == (2, 2, 0)
    assert sorted(ran) == ["batch-2", "batch-4"]
    records = _records(out)
    assert sorted(r["id"] for r in records) == ["a", "b", "d", "line-3"]  # each line once
    again = {r["id"]: r for r in records}
    assert again["a"] == first["a"] and again["d"]["text"] == first["d"]["text"]  # seeded sampling: same text


@pytest.mark.parametrize(("rows", "code"), [(PROMPTS[:1], 0), ([PROMPTS[0], "{"], 1)])
def test_the_batch_command_exits_1_when_some_line_has_an_error_record(tmp_path, rows, code):
    inp, out = _write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    argv = ["batch", "--config", str(TINY_YAML), "--input", str(inp), "--output", str(out), "--no-ray"]
    assert main([*argv, "--no-progress"]) == code
    assert sorted(r["line"] for r in _records(out)) == list(range(1, len(rows) + 1))  # in finishing order
