"""actors.messages: msgpack records round-trip, refuse oversize or mistyped data; the RNG scheme (no Ray)."""

from __future__ import annotations

import msgpack
import pytest
import torch

from actors import messages as m
from actors.messages import (
    DraftInput,
    DraftOutput,
    EventRecord,
    GenerateInput,
    RecordError,
    Role,
    Sampling,
    StepBatch,
    StepPlan,
    TargetInput,
    VerifyInput,
    VerifyOutput,
    stream_item_from_bytes,
    step_generator,
)

LIMIT = 1 << 20
SAMPLING = Sampling(temperature=0.7, top_k=50, top_p=0.9, seed=2**62 + 5)

RECORDS = [
    DraftInput("req-1", 17, [1, 2, 3], 8, True, 4, SAMPLING),
    DraftInput("req-2", 0, [4], 8, False, 1, SAMPLING, handoff=True),
    DraftOutput([5, 6, 7], None, 21, 0.003),
    DraftOutput([], None, 21, 0.001, on_device=True),
    DraftOutput([5], 9, 21, 0.0),
    VerifyInput("req-1", 16, [3], [5, 6, 7], True, 4, SAMPLING),
    VerifyOutput([True, False, True], [1, 2, 3, 4], 20, 0.01),
    GenerateInput("r", [104, 105], "judge", 8, 0.5, 64, 0.0, 0, 1.0, None, ["\n\n"], [256], False),
    EventRecord([104, 105], [1, 3], "hi"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(record):
    assert type(record).from_bytes(record.to_bytes(), LIMIT) == record


def test_oversize_record_is_refused_before_unpacking():
    big = DraftInput("r", 0, list(range(100_000)), 8, False, 0, SAMPLING).to_bytes()
    with pytest.raises(RecordError, match="exceeds the limit"):
        DraftInput.from_bytes(big, len(big) - 1)
    assert DraftInput.from_bytes(big, len(big)).feed[-1] == 99_999


def test_wrong_record_type_is_refused():
    with pytest.raises(RecordError, match="expected a VerifyInput record, got 'DraftInput'"):
        VerifyInput.from_bytes(RECORDS[0].to_bytes(), LIMIT)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokens": [1, True]}, "DraftOutput.tokens"),  # a bool is not a token id
        ({"tokens": "abc"}, "DraftOutput.tokens"),
        ({"guess": "x"}, "DraftOutput.guess"),
        ({"cache_len": 1.5}, "DraftOutput.cache_len"),
        ({"extra": 1}, "unknown fields \\['extra'\\]"),
    ],
)
def test_mistyped_or_unknown_fields_are_refused(change, message):
    raw = {"record": "DraftOutput", "tokens": [1], "guess": None, "cache_len": 1, "compute_s": 0.0, "on_device": False, **change}
    with pytest.raises(RecordError, match=message):
        DraftOutput.from_bytes(msgpack.packb(raw), LIMIT)


def test_missing_field_and_malformed_bytes_are_refused():
    with pytest.raises(RecordError, match="missing fields \\['compute_s'\\]"):
        raw = {"record": "DraftOutput", "tokens": [], "guess": None, "cache_len": 0, "on_device": True}
        DraftOutput.from_bytes(msgpack.packb(raw), LIMIT)
    with pytest.raises(RecordError, match="malformed"):
        DraftOutput.from_bytes(b"\xc1", LIMIT)
    with pytest.raises(RecordError, match="malformed"):
        DraftOutput.from_bytes(RECORDS[1].to_bytes()[:-2], LIMIT)
    with pytest.raises(RecordError, match="is bytes"):
        DraftOutput.from_bytes("text", LIMIT)


def test_ext_types_are_refused():
    data = msgpack.packb({"record": "DraftOutput", "tokens": msgpack.ExtType(1, b"x")})
    with pytest.raises(RecordError, match="malformed"):
        DraftOutput.from_bytes(data, LIMIT)


def test_nested_record_is_checked():
    raw = msgpack.unpackb(RECORDS[0].to_bytes())
    raw["sampling"]["top_k"] = "50"
    with pytest.raises(RecordError, match="Sampling.top_k"):
        DraftInput.from_bytes(msgpack.packb(raw), LIMIT)


def test_stream_items_dispatch_on_their_tag():
    assert stream_item_from_bytes(RECORDS[-1].to_bytes(), LIMIT) == RECORDS[-1]
    with pytest.raises(RecordError, match="not a stream record"):
        stream_item_from_bytes(RECORDS[0].to_bytes(), LIMIT)


def test_sampling_params_are_checked_again_on_the_worker():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(0.7, 0, 0.0, 1).params()


def test_step_generators_are_reproducible_and_distinct():
    def draw(seed, role, step):
        return torch.rand(4, generator=step_generator(seed, role, step))

    assert torch.equal(draw(7, Role.DRAFT, 3), draw(7, Role.DRAFT, 3))
    others = [draw(7, Role.TARGET, 3), draw(7, Role.DRAFT, 4), draw(8, Role.DRAFT, 3)]
    assert not any(torch.equal(draw(7, Role.DRAFT, 3), o) for o in others)
    assert draw(2**63 - 1, Role.TARGET, 10**6).shape == (4,)


def test_a_step_batch_round_trips_its_plans():
    sampling = Sampling(temperature=0.0, top_k=0, top_p=1.0, seed=3)
    plans = [
        StepPlan("a", None, TargetInput("a", 0, [1, 2], 0, sampling), None, False, 1.0, None, [0], False),
        StepPlan("b", None, None, None, False, 1.0, None, [], True),
    ]
    batch = StepBatch(plans)
    assert StepBatch.from_bytes(batch.to_bytes(), 1 << 20) == batch
    assert StepBatch.from_bytes(StepBatch([]).to_bytes(), 1 << 20).plans == []


def test_an_edge_is_one_bytes_value_unless_a_plan_has_a_tensor():
    """The step graph's values (actors.messages.to_edge): the per-plan records in one msgpack array, alone
    (the fast case for Ray's channels) or with the tensors where any plan has one; read back checked."""
    rec = m.DraftOutput([1, 2], None, 5, 0.0).to_bytes()
    items = [(rec, None), (None, None)]
    edge = m.to_edge(items)
    assert isinstance(edge, bytes) and m.from_edge(edge, 1 << 20) == items
    q = torch.ones(2, 3)
    edge = m.to_edge([(rec, q), (None, None)])
    assert isinstance(edge, tuple)
    (got, got_q), rest = m.from_edge(edge, 1 << 20)
    assert got == rec and got_q is q and rest == (None, None)
    with pytest.raises(m.RecordError, match="list of records"):
        m.from_edge(msgpack.packb([1, 2]), 1 << 20)
    with pytest.raises(m.RecordError, match="2 records came with 1 tensors"):
        m.from_edge((edge[0], [q]), 1 << 20)
    with pytest.raises(m.RecordError, match="exceeds the limit"):
        m.from_edge(m.to_edge(items), 8)


def test_the_step_input_sends_qs_only_where_a_plan_has_one():
    batch = m.StepBatch([]).to_bytes()
    assert m.step_input(batch, []) == batch and m.read_step_input(batch, 1 << 20) == ([], [])
    plan = m.StepPlan("a", None, None, None, False, 0.5, None, [], True)
    batch, q = m.StepBatch([plan]).to_bytes(), torch.zeros(1, 4)
    assert m.read_step_input(m.step_input(batch, [None]), 1 << 20) == ([plan], [None])
    plans, qs = m.read_step_input(m.step_input(batch, [q]), 1 << 20)
    assert plans == [plan] and qs[0] is q
    with pytest.raises(m.RecordError, match="1 plans came with 2"):
        m.read_step_input((batch, [q, q]), 1 << 20)
