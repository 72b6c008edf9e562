"""The records the actors exchange, one small typed record per phase, and the sampling RNG scheme.

Every record is a frozen dataclass sent as msgpack (`to_bytes` / `from_bytes`): a map of its field names
plus a `record` tag naming the type, checked on arrival against the field types below. `from_bytes` refuses
data over `max_bytes` (ServeConfig.max_record_bytes) before unpacking it and every field of the wrong type,
so a record never unpickles anything and a confused sender fails loudly at the receiver.

Vocab-sized or hidden-sized tensors never go through msgpack: the draft's q (sampling only) and the
target's hidden states for the judge travel as torch tensors beside the records. Each step-graph node
sends one value (`to_edge`): its per-plan records packed into one msgpack array, with the tensors only
where a plan has one, since Ray moves a lone bytes value faster than a list of tuples.

One step of one request is one StepPlan; the steps of the running requests travel together as one
StepBatch, sent once to every actor of the step graph (actors.step_graph), whose data flows between the
actors without going back through the scheduler (DESIGN.md section 1), per plan:
  plan --> draft worker: DraftOutput (+ q tensor when sampling) --> every target shard
  plan --> every target shard: VerifyOutput (+ hidden tensor) or, for prefill and autoregressive steps,
           TargetOutput --> judge scorer: JudgeOutput
  plan --> draft worker (pipelining): the next block, drafted while the shards verify this one
  all of them --> scheduler; then scheduler --StreamItem per step, then CompletionRecord--> driver

RNG scheme (sampling only; greedy draws no random numbers). A request's seed (the client's, else one the
scheduler draws at admission) and a counter name every random stream: the draft worker draws from
`step_generator(seed, Role.DRAFT, step)` and the target from `step_generator(seed, Role.TARGET, step)`, where
`step` is the index of the target pass the draw belongs to (0 = prefill). No actor keeps RNG state between
calls, so a seeded request gives the same tokens whatever the timing, the placement or a restarted actor.

Not for: the client wire format (protos/) or anything the model computes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import torch

from engine.sampling import SamplingParams


class RecordError(ValueError):
    """Bytes that are not a valid record of the expected type (too large, malformed, wrong fields)."""


class Role(enum.IntEnum):
    """Which actor a random stream belongs to."""

    DRAFT = 1
    TARGET = 2


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Steele, Lea and Flood, "Fast splittable pseudorandom number generators" (2014): a bijective mixer,
    # so distinct (seed, role, step) triples give well-separated torch seeds.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_generator(seed: int, role: Role, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one actor's draws for one target pass of one request (see the module docstring)."""
    mixed = _splitmix64(_splitmix64(_splitmix64(seed) ^ int(role)) ^ step)
    return torch.Generator(device=device).manual_seed(mixed >> 1)  # manual_seed takes 63 bits


# ---- the record base --------------------------------------------------------------------------------


Decoder = typing.Callable[[Any, str], Any]  # (msgpack-decoded value, where it is for errors) -> checked value


@functools.cache
def _decoder(tp: Any) -> Decoder:
    """The checker of one annotated field type (the few types records use), built once per type: a record's
    fields are decoded on every step in every actor, so the type is read here and not per value. Nested
    records are rebuilt from their maps."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        nullable, rest = type(None) in options, [_decoder(o) for o in options if o is not type(None)]

        def union(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            for option in rest:
                try:
                    return option(value, where)
                except RecordError:
                    pass
            raise RecordError(f"{where}: expected {tp}, got {type(value).__name__}")

        return union
    if origin is list:
        (item,) = typing.get_args(tp)
        if item in _SCALARS:  # the common case, checked without a call per element
            is_item = _SCALARS[item]

            def scalars(value: Any, where: str) -> Any:
                if not isinstance(value, list):
                    raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
                if not all(map(is_item, value)):
                    raise RecordError(f"{where}: expected {tp}")
                return value

            return scalars
        decode_item = _decoder(item)

        def items(value: Any, where: str) -> Any:
            if not isinstance(value, list):
                raise RecordError(f"{where}: expected a list, got {type(value).__name__}")
            return [decode_item(v, f"{where}[{i}]") for i, v in enumerate(value)]

        return items
    if isinstance(tp, type) and issubclass(tp, Record):
        return lambda value, where: tp._from_map(value)
    if tp in _SCALARS:
        is_tp = _SCALARS[tp]

        def scalar(value: Any, where: str) -> Any:
            if not is_tp(value):
                raise RecordError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
            return float(value) if tp is float else value

        return scalar
    if tp is type(None):

        def none(value: Any, where: str) -> Any:
            if value is not None:
                raise RecordError(f"{where}: expected None, got {type(value).__name__}")
            return None

        return none
    raise TypeError(f"records do not carry fields of type {tp}")


_SCALARS: dict[type, typing.Callable[[Any], bool]] = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _encode(value: Any) -> Any:
    if isinstance(value, list):
        return [_encode(v) for v in value] if value and isinstance(value[0], Record) else value
    return value._to_map() if isinstance(value, Record) else value


@dataclass(frozen=True)
class Record:
    """A msgpack record: `to_bytes`, and `from_bytes` with an explicit size cap and a type check."""

    _fields: ClassVar[dict[type, dict[str, Decoder]]] = {}

    def to_bytes(self) -> bytes:
        return msgpack.packb(self._to_map(), use_bin_type=True)

    def _to_map(self) -> dict[str, Any]:
        fields = {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"record": type(self).__name__, **fields}

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int):
        return cls._from_map(_unpack(data, max_bytes))

    @classmethod
    def _from_map(cls, raw: Any):
        if not isinstance(raw, dict) or raw.get("record") != cls.__name__:
            tag = raw.get("record") if isinstance(raw, dict) else type(raw).__name__
            raise RecordError(f"expected a {cls.__name__} record, got {tag!r}")
        decoders = cls._decoders()
        fields = {k: v for k, v in raw.items() if k != "record"}
        if fields.keys() != decoders.keys():
            missing, extra = sorted(decoders.keys() - fields.keys()), sorted(fields.keys() - decoders.keys())
            raise RecordError(f"{cls.__name__}: missing fields {missing}, unknown fields {extra}")
        name = cls.__name__
        return cls(**{field: decode(fields[field], f"{name}.{field}") for field, decode in decoders.items()})

    @classmethod
    def _decoders(cls) -> dict[str, Decoder]:
        """Field name -> its decoder, built on the class's first record."""
        if cls not in Record._fields:
            hints = typing.get_type_hints(cls)
            Record._fields[cls] = {f.name: _decoder(hints[f.name]) for f in dataclasses.fields(cls)}
        return Record._fields[cls]


def _unpack(data: bytes, max_bytes: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"a record is bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise RecordError(f"record of {len(data)} bytes exceeds the limit of {max_bytes} (serve.max_record_bytes)")
    try:
        # The per-object caps are msgpack's defaults spelt out (each is bounded by the data's length), and
        # ext types, which could name arbitrary types, are refused outright.
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=len(data),
            max_bin_len=len(data),
            max_array_len=len(data),
            max_map_len=len(data) // 2,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as err:
        raise RecordError(f"malformed record: {type(err).__name__} {err}".rstrip()) from None


# ---- sampling parameters, as the workers need them ----------------------------------------------------


@dataclass(frozen=True)
class Sampling(Record):
    """What a worker needs of a request's SamplingParams to turn logits into tokens, plus the RNG key."""

    temperature: float  # 0 = greedy
    top_k: int
    top_p: float
    seed: int  # the request's seed (drawn by the scheduler when the client gave none)

    @classmethod
    def of(cls, params: SamplingParams, seed: int) -> "Sampling":
        return cls(params.temperature, params.top_k, params.top_p, seed)

    def params(self) -> SamplingParams:
        """SamplingParams checks the values again on the worker (max_tokens is the scheduler's business)."""
        return SamplingParams(max_tokens=1, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


# ---- draft worker --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftInput(Record):
    """Roll the request's draft cache back to `keep`, feed `feed`, then propose `k` draft tokens.

    With `guess`, the first token is not part of the block: it is the draft's argmax guess of the target's
    next token (the bonus of the step being verified), fed before the block is drafted. Pipelining sends
    feed = [d_K of block t] and guess = True to draft block t+1 while block t is verified.
    """

    request_id: str
    keep: int  # the draft cache's length before this call, after the rollback
    feed: list[int]  # tokens the draft has not seen yet (the whole prompt on the first call)
    k: int  # K: draft tokens in the block
    guess: bool
    step: int  # the target pass this block will be verified in (the RNG counter)
    sampling: Sampling
    handoff: bool = False  # a greedy block that may stay on the device for target rank 0 (actors.handoff)


@dataclass(frozen=True)
class DraftOutput(Record):
    """The block. In sampling mode the draft's q [K, vocab] is the propose call's second return value."""

    tokens: list[int]  # d_1..d_K
    guess: int | None  # the guessed bonus token (DraftInput.guess), else None
    cache_len: int  # the draft cache's length after the call
    compute_s: float  # wall time inside the worker
    # The block went to target rank 0 on the device, in the hand-off buffer's row of its plan (actors.handoff):
    # `tokens` is empty here, and the draft worker's speculate node reports the block once it is drawn.
    on_device: bool = False


# ---- target shards -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetInput(Record):
    """Target passes that emit a token each: the prefill (keep = 0, feed = the prompt) or autoregressive
    decoding (feed = [t_last]), up to `tokens` of them (each later pass fed the token before; the shard may
    stop sooner: at a stop id, or after one where the batch holds other work). Token j is sampled per the
    params at RNG counter `step` + j, as one call per token would."""

    request_id: str
    keep: int
    feed: list[int]
    step: int
    sampling: Sampling
    tokens: int = 1


@dataclass(frozen=True)
class TargetOutput(Record):
    tokens: list[int]  # one per pass, at least one
    cache_len: int
    compute_s: float


@dataclass(frozen=True)
class VerifyInput(Record):
    """One verification pass: roll back to `keep`, feed `feed` + `draft` ([t_last, d_1..d_K] in the usual
    case). With `want_hidden` (judge mode) the shard also returns the hidden states of d_1..d_K."""

    request_id: str
    keep: int
    feed: list[int]  # emitted tokens the target has not seen (normally just t_last)
    draft: list[int]  # d_1..d_K
    want_hidden: bool
    step: int
    sampling: Sampling


@dataclass(frozen=True)
class VerifyOutput(Record):
    """Compact verification result: everything the scheduler needs to accept, nothing vocab-sized."""

    matched: list[bool]  # [K] standard rule (engine.verify.standard_accept)
    final_candidates: list[int]  # [K+1] the token after d_1..d_n for n = 0..K (correction; bonus at K)
    cache_len: int
    compute_s: float


# ---- one step -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan(Record):
    """What every actor does in one step of one request. Exactly one of `target` and `verify` is set, or
neither for a release.

    A speculative step drafts a block (`draft`) or reuses one drafted ahead (`verify.draft` already holds
    it); when `draft` is set, `verify.draft` is empty and each shard takes the block from the draft
    worker's output. `speculate` drafts the next block during verification (pipelining); when this step
    drafts, the worker feeds that speculation the new block's last token from its own cache, and skips it
    when the block holds one of `stop_ids` (accepted in full, the output would end in this step).
    """

    request_id: str
    draft: DraftInput | None
    target: TargetInput | None  # a prefill or autoregressive pass
    verify: VerifyInput | None
    judge: bool  # score the verified block's hidden states
    threshold: float  # the judge's, when `judge`
    speculate: DraftInput | None
    stop_ids: list[int]
    release: bool  # nothing else: free the request's caches (in graph order, after its last step)


@dataclass(frozen=True)
class StepBatch(Record):
    """One execution of the step graph: the steps of every running request that are ready (continuous
    batching, actors.scheduler). Each actor handles them in list order and answers with a list in the same
    order; the draft worker drafts all blocks in one batch of passes and the shards verify them in one
    pass (a prefill runs alone: its length would pad every other row)."""

    plans: list[StepPlan]


# ---- what the step graph's edges carry --------------------------------------------------------------------

Item = tuple[bytes | None, torch.Tensor | None]  # one plan's record (or None) and its tensor (or None)
Edge = bytes | tuple[bytes, list[torch.Tensor | None]]  # one step-graph value: records, tensors where any


def to_edge(items: list[Item]) -> Edge:
    """A node's per-plan items as one step-graph value: the records in one msgpack array, and the tensors
    beside it only where a plan has one (sampling's q, judge mode's hidden states). Ray's compiled-graph
    channels move a lone bytes value 1.5-2.5x faster than a list of tuples (a one-off microbenchmark of
    this graph's shape on the CPU: docs/performance.md)."""
    data = msgpack.packb([record for record, _ in items], use_bin_type=True)
    tensors = [tensor for _, tensor in items]
    return data if all(t is None for t in tensors) else (data, tensors)


def from_edge(value: Edge, max_bytes: int) -> list[Item]:
    """to_edge's items back, checked: a list of records (bytes or None) under `max_bytes` in all, and as
    many tensors (or none)."""
    data, tensors = value if isinstance(value, tuple) else (value, None)
    records = _unpack(data, max_bytes)
    if not isinstance(records, list) or not all(r is None or isinstance(r, bytes) for r in records):
        raise RecordError("a step-graph value is a list of records (bytes or None)")
    if tensors is None:
        tensors = [None] * len(records)
    elif not isinstance(tensors, list) or len(tensors) != len(records):
        raise RecordError(f"{len(records)} records came with {len(tensors)} tensors")
    return list(zip(records, tensors))


def step_input(batch: bytes, qs: list[torch.Tensor | None]) -> Edge:
    """The step graph's input: a StepBatch record, with qs (per plan, a reused block's draft distribution
    when sampling) only where any plan has one."""
    return batch if all(q is None for q in qs) else (batch, qs)


def read_step_input(value: Edge, max_bytes: int) -> tuple[list[StepPlan], list[torch.Tensor | None]]:
    """step_input's plans and qs (None for each plan where none was sent)."""
    batch, qs = value if isinstance(value, tuple) else (value, None)
    plans = StepBatch.from_bytes(batch, max_bytes).plans
    if qs is None:
        qs = [None] * len(plans)
    elif not isinstance(qs, list) or len(qs) != len(plans):
        raise RecordError(f"{len(plans)} plans came with {len(qs)} draft distributions")
    return plans, qs


# ---- judge scorer --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeOutput(Record):
    judged: list[bool]  # [K] sigmoid(w . h_i + b) > threshold
    compute_s: float


# ---- scheduler <-> driver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateInput(Record):
    """A checked engine Request (cluster.ray_backend made it with Engine.make_request's rules)."""

    request_id: str
    prompt_ids: list[int]
    mode: str  # engine.config.Mode value
    draft_tokens: int
    threshold: float
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool


@dataclass(frozen=True)
class Admitted(Record):
    """The scheduler's first stream item: from here on `Scheduler.abort(request_id)` finds the request."""

    request_id: str


@dataclass(frozen=True)
class EventRecord(Record):
    """engine.decode.StepEvent."""

    tokens: list[int]
    provenance: list[int]  # engine.verify.Provenance values
    text: str


@dataclass(frozen=True)
class CompletionRecord(Record):
    """engine.decode.Completion, its timings flattened, plus the serving split (actors.scheduler.ServeTimings)."""

    text: str
    token_ids: list[int]
    provenance: list[int]
    finish_reason: str  # engine.output.FinishReason value
    prompt_tokens: int
    mode: str
    steps: int
    speculative_steps: int
    draft_tokens_proposed: int
    draft_tokens_accepted: int
    judge_accepted_tokens: int
    draft_s: float
    verify_s: float
    prefill_s: float
    judge_s: float
    total_s: float
    overhead_s: float
    draft_compute_s: float
    verify_compute_s: float
    judge_compute_s: float
    transport_s: float
    pipelined_blocks: int
    pipelined_blocks_used: int


STREAM_RECORDS: tuple[type[Record], ...] = (Admitted, EventRecord, CompletionRecord)


def stream_item_from_bytes(data: bytes, max_bytes: int) -> Admitted | EventRecord | CompletionRecord:
    """One item of the scheduler's stream, whichever of the three it is."""
    raw = _unpack(data, max_bytes)
    tag = raw.get("record") if isinstance(raw, dict) else None
    for cls in STREAM_RECORDS:
        if tag == cls.__name__:
            return cls._from_map(raw)
    raise RecordError(f"not a stream record: {tag!r}")
