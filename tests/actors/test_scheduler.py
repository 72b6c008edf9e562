"""actors.scheduler's pure parts (no Ray): the K rule, per-request state, and the records to the driver."""

from __future__ import annotations

import pytest

from actors.messages import CompletionRecord, EventRecord, GenerateInput
from actors.scheduler import (
    RequestState,
    ServedCompletion,
    ServeTimings,
    completion_from_record,
    completion_record,
    draft_length,
    event_from_record,
    event_record,
    generate_input,
    request_from_input,
)
from engine.config import Mode
from engine.decode import Request, StepEvent
from engine.output import FinishReason
from engine.sampling import SamplingParams
from engine.tokenizer import ByteTokenizer
from engine.verify import Accepted, Provenance

LIMIT = 1 << 20


def _request(max_tokens=20, k=8, **params) -> Request:
    return Request(tuple(b"hello"), SamplingParams(max_tokens=max_tokens, **params), Mode.STANDARD, k, 1.0)


@pytest.mark.parametrize(
    "ids_len, emitted, max_seq_len, want",
    [(5, 0, 512, 8), (5, 15, 512, 4), (5, 19, 512, 0), (508, 3, 512, 4), (512, 3, 512, 0)],
)
def test_draft_length_leaves_room_for_the_final_token(ids_len, emitted, max_seq_len, want):
    assert draft_length(_request(), ids_len, emitted, max_seq_len) == want


def test_advance_cuts_cache_lengths_to_the_sequence_and_stops_at_a_stop_token():
    state = RequestState("r", _request(stop_token_ids=(ord("c"),)), seed=1, tokenizer=ByteTokenizer(272))
    state.target_len, state.draft_len = 5 + 4, 5 + 3  # after verifying / drafting K = 4
    event = state.advance(Accepted(list(b"ab"), [Provenance.MATCHED, Provenance.CORRECTION]))
    assert state.ids[-2:] == list(b"ab") and (state.target_len, state.draft_len) == (6, 6)
    assert event == StepEvent(list(b"ab"), [Provenance.MATCHED, Provenance.CORRECTION], "ab")
    event = state.advance(Accepted(list(b"cd"), [Provenance.MATCHED, Provenance.BONUS]))
    assert event.tokens == [ord("c")] and state.output.finish is FinishReason.STOP
    done = state.completion()
    assert done.token_ids == list(b"abc") and done.finish_reason is FinishReason.STOP


def test_an_unfinished_state_completes_as_aborted():
    state = RequestState("r", _request(), seed=1, tokenizer=ByteTokenizer(272))
    assert state.completion().finish_reason is FinishReason.ABORT


def test_request_survives_the_trip_to_the_scheduler():
    request = _request(temperature=0.5, top_k=3, top_p=0.5, seed=9, stop=("x",), stop_token_ids=(1,), ignore_eos=True)
    data = generate_input("r", request).to_bytes()
    assert request_from_input(GenerateInput.from_bytes(data, LIMIT)) == request


def test_completion_and_events_survive_the_trip_to_the_driver():
    timings = ServeTimings(draft_s=0.1, verify_s=0.2, judge_s=0.05, total_s=0.5, overhead_s=0.15, draft_compute_s=0.09)
    done = ServedCompletion(
        "ab", [97, 98], [Provenance.TARGET, Provenance.JUDGE], FinishReason.LENGTH, 5, Mode.JUDGE, 2, 1, 4, 1, 1,
        timings, pipelined_blocks=3, pipelined_blocks_used=2,
    )
    back = completion_from_record(CompletionRecord.from_bytes(completion_record(done).to_bytes(), LIMIT))
    assert back == done and back.as_dict()["timings"]["overhead_s"] == 0.15
    event = StepEvent([97], [Provenance.MATCHED], "a")
    assert event_from_record(EventRecord.from_bytes(event_record(event).to_bytes(), LIMIT)) == event
