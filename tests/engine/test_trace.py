"""engine.trace: recording a run's acceptance, replaying it (the same work, the recorded acceptance), files."""

from __future__ import annotations

import json

import pytest

from engine.config import Mode
from engine.sampling import SamplingParams
from engine.trace import FORMAT, AcceptanceTrace, TraceError, TraceRecorder, TraceReplayer


def _run(engine, prompt: str, mode: Mode, hook, max_tokens: int = 40):
    engine.acceptance_hook = hook
    try:
        request = engine.make_request(prompt=prompt, mode=mode, params=SamplingParams(max_tokens=max_tokens))
        events = list(_events(engine.stream(request)))
    finally:
        engine.acceptance_hook = None
    return events


def _events(stream):
    while True:
        try:
            yield next(stream)
        except StopIteration as done:
            yield done.value
            return


def test_replaying_a_recorded_trace_reproduces_the_run(tiny_engine, tmp_path):
    recorder = TraceRecorder("tiny", "standard", 4)
    *steps, done = _run(tiny_engine, "The quick", Mode.STANDARD, recorder)
    trace = recorder.trace
    assert len(trace.accepted) == done.speculative_steps and sum(trace.accepted) == done.draft_tokens_accepted
    trace.save(tmp_path / "t.json")
    *replayed_steps, replayed = _run(tiny_engine, "The quick", Mode.STANDARD, TraceReplayer(AcceptanceTrace.load(tmp_path / "t.json")))
    assert replayed.token_ids == done.token_ids and replayed.steps == done.steps


def test_a_replayed_step_emits_the_recorded_count_whatever_the_models_say(tiny_engine):
    trace = AcceptanceTrace("test", "judge", 4, accepted=[4, 0, 2, 3], judged=[1, 0, 2, 0])
    *steps, done = _run(tiny_engine, "Hello", Mode.STANDARD, TraceReplayer(trace), max_tokens=30)
    # step 0 is the prefill (one token); then 5, 1, 3, 4 tokens per step, cycling, until max_tokens
    counts = [len(s.tokens) for s in steps]
    assert counts[:9] == [1, 5, 1, 3, 4, 5, 1, 3, 4]
    judged = [sum(p.name == "JUDGE" for p in s.provenance) for s in steps]
    assert judged[:5] == [0, 1, 0, 2, 0]


def test_every_request_replays_the_trace_from_its_start(tiny_engine):
    # A benchmark's untimed round must meet the shapes of its timed round: the same request replays alike.
    trace = AcceptanceTrace("test", "standard", 4, accepted=[4, 0, 2, 3, 1], judged=[0] * 5)
    replayer = TraceReplayer(trace)
    runs = [_run(tiny_engine, prompt, Mode.STANDARD, replayer, max_tokens=12) for prompt in ("Hello", "Hello", "Bye")]
    counts = [[len(s.tokens) for s in steps[:-1]] for steps in runs]
    assert counts[0] == counts[1] == counts[2] == [1, 5, 1, 3, 2]
    assert replayer.steps == 3 * 4
    other = replayer.for_request()
    assert other.position == 0 and other.trace is trace


def test_a_synthetic_trace_has_the_asked_mean():
    trace = AcceptanceTrace.synthetic(19.7, 32, steps=8000)
    assert abs(trace.mean_tokens_per_step - 19.7) < 0.2
    assert max(trace.accepted) <= 32
    with pytest.raises(TraceError):
        AcceptanceTrace.synthetic(40.0, 32)


@pytest.mark.parametrize(
    "record",
    [
        {"format": "something-else"},
        {"format": FORMAT, "mode": "ar", "draft_tokens": 4, "accepted": [1], "judged": [0]},
        {"format": FORMAT, "mode": "judge", "draft_tokens": 4, "accepted": [], "judged": []},
        {"format": FORMAT, "mode": "judge", "draft_tokens": 4, "accepted": [5], "judged": [0]},
        {"format": FORMAT, "mode": "judge", "draft_tokens": 4, "accepted": [2], "judged": [3]},
        {"format": FORMAT, "mode": "judge", "draft_tokens": 4, "accepted": [2, 1], "judged": [0]},
    ],
)
def test_a_bad_trace_file_is_refused_with_a_reason(tmp_path, record):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(TraceError, match="bad.json"):
        AcceptanceTrace.load(path)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(TraceError, match="not a readable trace"):
        AcceptanceTrace.load(tmp_path / "junk.json")


def test_the_cli_records_over_several_runs_and_replays_with_a_label(tmp_path, capsys):
    from cluster.cli import main
    from tests.conftest import TINY_YAML

    trace = tmp_path / "t.json"
    base = ["generate", "--config", str(TINY_YAML), "--raw", "--mode", "standard", "--max-tokens", "24", "--json"]
    for prompt in ("The quick", "Hello"):
        assert main([*base, "--prompt", prompt, "--record-trace", str(trace)]) == 0
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    recorded = AcceptanceTrace.load(trace)
    # a step that is not speculative emits one target token; a speculative one its draft tokens and one more
    assert len(recorded.accepted) == sum(r["steps"] - r["provenance"].count("target") for r in runs)
    assert sum(recorded.accepted) == sum(r["provenance"].count("matched") for r in runs)

    assert main([*base, "--prompt", "The quick", "--replay-trace", str(trace)]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["replayed"].startswith("replayed acceptance") and replayed["token_ids"] == runs[0]["token_ids"]

    with pytest.raises(SystemExit, match="not overwritten"):  # another K: the file is kept as it is
        main([*base, "--prompt", "x", "--draft-tokens", "2", "--record-trace", str(trace)])
    assert AcceptanceTrace.load(trace).accepted == recorded.accepted
    (tmp_path / "bad.json").write_text("[]")
    assert main([*base, "--prompt", "x", "--replay-trace", str(tmp_path / "bad.json")]) == 1
    assert "bad.json" in capsys.readouterr().err


def test_prefix_run_traces_hit_their_mean_and_accept_whole_blocks_as_often_as_a_to_the_k():
    trace = AcceptanceTrace.synthetic(11.0, 16, runs=True)
    a = trace.token_acceptance
    assert abs(sum(trace.accepted) / len(trace.accepted) + 1 - 11.0) < 0.2
    assert abs(sum(n == 16 for n in trace.accepted) / len(trace.accepted) - a**16) < 0.03
    assert AcceptanceTrace("t", "standard", 4, [4, 2, 0, 4], [0, 0, 0, 0]).token_acceptance == 10 / 12


def test_replayed_guesses_are_right_at_the_traces_token_acceptance_and_only_when_asked():
    trace = AcceptanceTrace("t", "standard", 4, [4, 3, 4, 1], [0, 0, 0, 0])  # a = 12 / 14
    assert not any(TraceReplayer(trace).guess_is_right() for _ in range(100))
    replayer = TraceReplayer(trace, guesses=True)
    rate = sum(replayer.guess_is_right() for _ in range(4000)) / 4000
    assert abs(rate - 12 / 14) < 0.03 and "guesses right at 0.857" in replayer.label


def test_replay_guesses_need_a_trace():
    from engine.config import DecodingConfig

    with pytest.raises(ValueError, match="replay_guesses needs replay_trace"):
        DecodingConfig(replay_guesses=True)
