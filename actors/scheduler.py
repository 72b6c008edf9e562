"""The scheduler: a Ray actor that admits requests, owns their state, runs the decoding loop across the
draft worker, the target shards and the judge scorer, and streams each step back to the driver.

One step reads like the paper and like engine.decode.Engine._speculative_step, one named call each:

    block   = draft(state, K)            # draft worker: d_1..d_K (q stays in the object store)
    verdict = verify(state, block)       # every target shard: matched [K], final candidates [K+1]
    judged  = judge(state, verdict)      # judge scorer, on the hidden states rank 0 returned
    step    = accept(block, verdict, judged)   # engine.verify.accepted_length + accept
    advance(state, step)                 # append; both caches are rolled back on their next call

and the results equal the in-process engine's: every actor makes the engine's forward calls, and the
acceptance is engine.verify's. Prefill and autoregressive steps are one target pass each, as in the engine.

Pipelining (serve.pipeline). While the target verifies block t, the draft worker already drafts block t+1
assuming block t is accepted in full: it is fed d_K, guesses the bonus token (its argmax), and drafts K
tokens after the guess. The speculative block is used only if the step accepted all K draft tokens and the
bonus equals the guess: then the draft has seen exactly the sequence the next step starts from, and the
block is what a fresh call would have drafted (the passes compute each row as a longer pass would:
engine.model's batch invariance). Otherwise it is dropped and the block drafted again after the verdict,
so greedy output is the same with or without pipelining. In sampling mode the speculative block draws
from the same RNG stream a re-draft would (actors.messages), and a dropped block is never looked at, so
the emitted tokens still follow the target's distribution.

Continuous batching (StepBatcher). Up to serve.max_active_requests run at once (more wait in arrival
order, up to serve.max_queued_requests at the server), each with its own caches in every actor and its
own mode, K, threshold and sampling. Each request's loop above is unchanged: its steps go to the
batcher, which runs the ready steps of all running requests as one execution of the step graph, so one
batch of draft passes drafts every block and one target pass verifies them all, each request accepting
its own n (ragged acceptance; each cache is rolled back on its own). Requests join and leave between
batches. Under load K may be capped (serve.draft_tokens_by_load): verification stops being nearly free
once the batch's rows make the target compute-bound. `abort(request_id)` stops a request at the next
step boundary; its caches are released in every actor when its loop ends, however it ends. A request's
loop runs ahead of its stream (run_ahead): step t+1 is in the step graph while Ray reports step t's record.

Not for: tokenizing or checking requests (cluster.ray_backend, with engine.decode's rules), the gRPC edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence, TypeVar

import ray
import torch
from ray.actor import ActorHandle

from actors.messages import (
    Admitted,
    CompletionRecord,
    DraftInput,
    DraftOutput,
    EventRecord,
    GenerateInput,
    Sampling,
    StepPlan,
    TargetInput,
    VerifyInput,
    VerifyOutput,
)
from actors.step_graph import StepFailed, StepGraph, StepResult
from engine.config import Config, Mode, ModelSpec
from engine.decode import Completion, Request, StepEvent, Timings
from engine.model import ModelArgs
from engine.output import FinishReason, Output
from engine.sampling import SamplingParams
from engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from engine.trace import TraceReplayer, replayer_for
from engine.verify import Accepted, DraftBlock, Provenance, Verdicts, accept, accepted_length
from engine.weights import resolve_checkpoint

log = logging.getLogger("judgeserve.scheduler")

RECENT_CANCELLED = 1024  # cancelled request ids stats() remembers (the oldest go)


# ---- records of a served request ---------------------------------------------------------------------


@dataclass
class ServeTimings(Timings):
    """engine.decode.Timings as the scheduler sees it, plus where the rest of the time went.

    draft_s, verify_s and judge_s are each step's compute on its critical path, timed inside the actors (a
    block drafted ahead during verification is not on it); overhead_s is the rest of total_s, of which
    transport_s is the wait on the step graph beyond that compute (Ray, msgpack; with pipelining also a
    block drafted ahead that outlasts verification) and the remainder the scheduler's own work. The *_compute_s fields count all compute inside the actors, overlapped or not.
    """

    draft_compute_s: float = 0.0
    verify_compute_s: float = 0.0
    judge_compute_s: float = 0.0
    transport_s: float = 0.0  # within overhead_s: each step's round trip through the graph beyond its compute


@dataclass
class ServedCompletion(Completion):
    """engine.decode.Completion plus pipelining counters."""

    pipelined_blocks: int = 0  # speculative blocks drafted during verification
    pipelined_blocks_used: int = 0  # of those, blocks the next step used (the others were dropped)
    timings: ServeTimings = field(default_factory=ServeTimings)


def completion_record(done: ServedCompletion) -> CompletionRecord:
    t = done.timings
    return CompletionRecord(
        text=done.text,
        token_ids=list(done.token_ids),
        provenance=[int(p) for p in done.provenance],
        finish_reason=done.finish_reason.value,
        prompt_tokens=done.prompt_tokens,
        mode=done.mode.value,
        steps=done.steps,
        speculative_steps=done.speculative_steps,
        draft_tokens_proposed=done.draft_tokens_proposed,
        draft_tokens_accepted=done.draft_tokens_accepted,
        judge_accepted_tokens=done.judge_accepted_tokens,
        draft_s=t.draft_s,
        verify_s=t.verify_s,
        prefill_s=t.prefill_s,
        judge_s=t.judge_s,
        total_s=t.total_s,
        overhead_s=t.overhead_s,
        draft_compute_s=t.draft_compute_s,
        verify_compute_s=t.verify_compute_s,
        judge_compute_s=t.judge_compute_s,
        transport_s=t.transport_s,
        pipelined_blocks=done.pipelined_blocks,
        pipelined_blocks_used=done.pipelined_blocks_used,
    )


def completion_from_record(rec: CompletionRecord) -> ServedCompletion:
    timings = ServeTimings(
        draft_s=rec.draft_s,
        verify_s=rec.verify_s,
        prefill_s=rec.prefill_s,
        judge_s=rec.judge_s,
        total_s=rec.total_s,
        overhead_s=rec.overhead_s,
        draft_compute_s=rec.draft_compute_s,
        verify_compute_s=rec.verify_compute_s,
        judge_compute_s=rec.judge_compute_s,
        transport_s=rec.transport_s,
    )
    return ServedCompletion(
        text=rec.text,
        token_ids=rec.token_ids,
        provenance=[Provenance(p) for p in rec.provenance],
        finish_reason=FinishReason(rec.finish_reason),
        prompt_tokens=rec.prompt_tokens,
        mode=Mode(rec.mode),
        steps=rec.steps,
        speculative_steps=rec.speculative_steps,
        draft_tokens_proposed=rec.draft_tokens_proposed,
        draft_tokens_accepted=rec.draft_tokens_accepted,
        judge_accepted_tokens=rec.judge_accepted_tokens,
        timings=timings,
        pipelined_blocks=rec.pipelined_blocks,
        pipelined_blocks_used=rec.pipelined_blocks_used,
    )


def event_record(event: StepEvent) -> EventRecord:
    return EventRecord(list(event.tokens), [int(p) for p in event.provenance], event.text)


def event_from_record(rec: EventRecord) -> StepEvent:
    return StepEvent(rec.tokens, [Provenance(p) for p in rec.provenance], rec.text)


def generate_input(request_id: str, request: Request) -> GenerateInput:
    p = request.params
    return GenerateInput(
        request_id=request_id,
        prompt_ids=list(request.prompt_ids),
        mode=request.mode.value,
        draft_tokens=request.draft_tokens,
        threshold=request.threshold,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        seed=p.seed,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


def request_from_input(inp: GenerateInput) -> Request:
    """The engine Request again; SamplingParams re-checks its fields."""
    params = SamplingParams(
        max_tokens=inp.max_tokens,
        temperature=inp.temperature,
        top_k=inp.top_k,
        top_p=inp.top_p,
        seed=inp.seed,
        stop=tuple(inp.stop),
        stop_token_ids=tuple(inp.stop_token_ids),
        ignore_eos=inp.ignore_eos,
    )
    return Request(tuple(inp.prompt_ids), params, Mode(inp.mode), inp.draft_tokens, inp.threshold)


def tokenizer_for(spec: ModelSpec, args: ModelArgs) -> Tokenizer:
    """The tokenizer engine.weights.load_model gives this model, without loading the weights (the driver
    and the scheduler need text, not the model)."""
    if spec.is_dummy:
        return ByteTokenizer(args.vocab_size)
    return HFTokenizer(resolve_checkpoint(spec.model), args.eos_token_ids)


# ---- per-request state and the pure rules of the loop ------------------------------------------------


@dataclass
class Speculation:
    """A block for the next step, drafted while this step was verified (see the module docstring)."""

    k: int
    out: DraftOutput  # the guess and the block
    q: torch.Tensor | None  # [K, vocab] (sampling), else None
    bonus: int | None = None  # the step's actual final token; set when the step accepted all K


class RequestState:
    """One request in the scheduler: its tokens, its output, and how much of them each model's cache holds.

    `ids` is the prompt plus every emitted token. The caches hold a prefix of it: `target_len` positions
    of the target's, `draft_len` of the draft's; what a model has not seen is fed at its next call, which
    first rolls its cache back to these lengths (so rejected positions are never read again).
    """

    def __init__(self, request_id: str, request: Request, seed: int, tokenizer: Tokenizer):
        self.request_id, self.request = request_id, request
        self.sampling = Sampling.of(request.params, seed)
        self.stop_ids = sorted(stop_ids(request, tokenizer))  # sent with each plan; fixed for the request
        self.ids = list(request.prompt_ids)
        self.output = Output(tokenizer, request.params)
        self.target_len = 0
        self.draft_len = 0
        self.speculation: Speculation | None = None
        self.replay: TraceReplayer | None = None  # decoding.replay_trace: this request's replayer
        self.aborted = asyncio.Event()
        self.started = time.perf_counter()
        prompt_tokens = len(request.prompt_ids)
        self.done = ServedCompletion("", [], [], FinishReason.STOP, prompt_tokens, request.mode, 0, 0, 0, 0, 0)

    @property
    def step(self) -> int:
        """Target passes so far: the index of the next one (the RNG counter)."""
        return self.done.steps

    def pending(self, model_len: int) -> list[int]:
        return self.ids[model_len:]

    def advance(self, step: Accepted) -> StepEvent:
        """Appends a step's tokens and cuts both cache lengths back to what is still on the sequence (the
        last emitted token is fed at the next step). Returns the event to stream (tokens a stop rule cut
        are not in it), as engine.decode.Engine.stream yields it."""
        self.ids.extend(step.tokens)
        keep = len(self.ids) - 1
        self.target_len, self.draft_len = min(self.target_len, keep), min(self.draft_len, keep)
        out = self.output
        before = len(out.token_ids)
        text = out.extend(step.tokens, step.provenance)
        before = min(before, len(out.token_ids))
        return StepEvent(out.token_ids[before:], out.provenance[before:], text)

    def completion(self) -> ServedCompletion:
        done, out = self.done, self.output
        done.timings.close(time.perf_counter() - self.started)
        done.text, done.token_ids, done.provenance = out.text, list(out.token_ids), list(out.provenance)
        done.finish_reason = out.finish or FinishReason.ABORT
        # Tokens cut by a stop rule were never emitted: keep the judge count consistent with the output.
        done.judge_accepted_tokens = min(done.judge_accepted_tokens, sum(p is Provenance.JUDGE for p in out.provenance))
        return done


def draft_length(request: Request, ids_len: int, emitted: int, max_seq_len: int) -> int:
    """K for the next step, clipped so that it cannot overrun max_tokens or the cache (0: a plain target
    step); engine.decode.Engine._draft_length's rule."""
    left = request.params.max_tokens - emitted
    room = max_seq_len - ids_len
    return max(0, min(request.draft_tokens, left - 1, room))


def stop_ids(request: Request, tokenizer: Tokenizer) -> frozenset[int]:
    p = request.params
    return frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(tokenizer.eos_ids))


class StepBatcher:
    """Continuous batching: gathers the steps of the running requests into one execution of the step graph.

    Each running request submits its next step (`run`) and awaits the result; a batch leaves as soon as
    every running request has submitted one (or after `wait_s`, so that a request busy elsewhere never
    holds the others back), and the next batch forms while it runs. Requests join and leave between
    batches (`join`, `leave`), so a new request's prefill rides along with the others' steps and a
    finished one stops taking a row, without waiting for the batch to drain. A release (StepPlan.release)
    rides in the next batch and is not waited for. One batch runs at a time, so every actor sees the
    batches in one order.
    """

    def __init__(self, graph: StepGraph, wait_s: float):
        self.graph, self.wait_s = graph, wait_s
        self.running = 0  # requests between their first and last step
        self.batches = 0
        self.batched_steps = 0  # steps (not releases) over all batches: / batches = the mean batch size
        self._pending: list[tuple[StepPlan, torch.Tensor | None, asyncio.Future]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def join(self) -> None:
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        self._changed.set()  # the batch forming may be complete without this request

    async def run(self, plan: StepPlan, q: torch.Tensor | None) -> StepResult:
        """Plan's result, once the batch it rides in has run (raises what the batch raised)."""
        done = asyncio.get_running_loop().create_future()
        self._pending.append((plan, q, done))
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())
        return await done

    def _ready(self) -> bool:
        return sum(not plan.release for plan, _, _ in self._pending) >= self.running

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            deadline = loop.time() + self.wait_s
            while not self._ready() and loop.time() < deadline:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch, self._pending = self._pending, []
            steps = sum(not plan.release for plan, _, _ in batch)
            self.batches += bool(steps)
            self.batched_steps += steps
            try:
                results = await self.graph.run([plan for plan, _, _ in batch], [q for _, q, _ in batch])
            except Exception as err:  # every request of the batch sees the failure (StepFailed)
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(err)
                continue
            for (*_, done), result in zip(batch, results):
                if not done.done():  # a cancelled waiter's future is done already
                    done.set_result(result)


T = TypeVar("T")


async def run_ahead(source: AsyncIterator[T]) -> AsyncIterator[T]:
    """`source`'s items, `source` iterated in a task of its own that runs on as soon as it has yielded one.

    A served request's steps are the source and Ray's report of each streamed record the consumer's work
    on an item: without this, the report of step t ran before step t+1 was planned, and with many streams
    every request's report before the batch could leave. Each item is handed over one event-loop turn
    after the source yields it, so what the source starts on resuming (the next step's submission, and the
    batcher's loop that sends it) is scheduled first. `source`'s exception is raised after the items before
    it; closing or cancelling this iterator cancels the task and waits for it to end.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    end = object()

    async def produce() -> None:
        try:
            async for item in source:
                loop.call_soon(items.put_nowait, item)
        finally:
            loop.call_soon(items.put_nowait, end)

    task = asyncio.ensure_future(produce())
    try:
        while (item := await items.get()) is not end:
            yield item
        await task  # the source's exception, if it raised
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


def capped_draft_length(k: int, running: int, caps: dict[int, int]) -> int:
    """K under load (serve.draft_tokens_by_load): the cap of the largest threshold <= running, if any."""
    cap = max((n for n in caps if n <= running), default=None)
    return k if cap is None else min(k, caps[cap])


# ---- the actor -------------------------------------------------------------------------------------------


class RequestIdActive(ValueError):
    """Raised into the stream when the request id is already running here."""


@ray.remote
class Scheduler:
    """Runs requests over the draft worker, the target shards (rank order) and the judge scorer (or None)."""

    def __init__(
        self,
        config: Config,
        draft: ActorHandle | None,
        shards: Sequence[ActorHandle],
        judge: ActorHandle | None,
    ):
        """Created beside the other actors, so that its start-up overlaps their model loading; `ready` gives
        it the loaded target's shape and compiles the step graph. draft None: rank 0 holds the draft model
        (serve.draft_placement in_rank0; actors.step_graph)."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.tokenizer: Tokenizer | None = None  # ready's
        self.max_seq_len = config.decoding.max_seq_len
        # benchmarks on dummy weights: each speculative step accepts as the trace's next step did (engine.trace)
        self.replay = replayer_for(config.decoding)
        if self.replay is not None:
            log.warning("%s: every output is meaningless (benchmarks on dummy weights only)", self.replay.label)
        self.max_bytes = config.serve.max_record_bytes
        self.pipeline = config.serve.pipeline
        self.handoff = config.serve.block_handoff
        compiled = config.serve.compiled_graph
        if compiled is None:
            compiled = config.runtime.device.startswith("cuda")
        self.graph = StepGraph(draft, shards, judge, self.max_bytes, compiled)
        self.batcher = StepBatcher(self.graph, config.serve.batch_wait_ms / 1e3)
        self.k_caps = config.serve.draft_tokens_by_load
        self.ar_tokens_per_call = config.serve.ar_tokens_per_call
        self._turns = asyncio.Semaphore(config.serve.max_active_requests)
        self._requests: dict[str, RequestState] = {}
        self._pipelined = [0, 0]  # blocks drafted ahead, blocks used: over all requests, for stats()
        # request id -> tokens emitted when its task was cancelled, the last RECENT_CANCELLED
        # (cluster.backend.LocalBackend's closed_early): shows that cancelled work really stopped
        self._cancelled: dict[str, int] = {}
        # request id -> steps it had completed when its stop (abort or cancellation) arrived, the last
        # RECENT_CANCELLED: with the target's pass counts (TargetShard.released) it shows how many passes
        # ran after the stop (at most the one in flight)
        self._stopped_at: dict[str, int] = {}

    async def ready(self, target_args: ModelArgs) -> bool:
        """Takes the loaded target's shape (its tokenizer's vocabulary), compiles the step graph and starts
        the thread that runs it."""
        self.tokenizer = tokenizer_for(self.config.target, target_args)
        # on a thread: compiling waits on the actors (ray.get), which would block this actor's event loop.
        # Ray warns of any ray.get in an async actor, wherever it runs; this one is off the loop.
        os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
        await asyncio.to_thread(self.graph.compile)
        return True

    def active(self) -> list[str]:
        """Request ids admitted and not yet finished (queued or running)."""
        return sorted(self._requests)

    def stats(self) -> dict:
        return {
            "active": self.active(),
            "cancelled": dict(self._cancelled),
            "stopped_at_step": dict(self._stopped_at),
            "pipelined_blocks": self._pipelined[0],
            "pipelined_blocks_used": self._pipelined[1],
            "batches": self.batcher.batches,
            "batched_steps": self.batcher.batched_steps,
        }

    def abort(self, request_id: str) -> bool:
        """Stops the request at its next step boundary (or in the queue); False if it is not here."""
        state = self._requests.get(request_id)
        if state is None:
            return False
        state.aborted.set()
        self._remember(self._stopped_at, request_id, state.step)
        return True

    async def generate(self, rec: bytes) -> AsyncIterator[bytes]:
        """GenerateInput -> a stream (Ray streaming generator) of msgpack records: Admitted, then an
        EventRecord per step, then one CompletionRecord (finish_reason abort after `abort`, error after a
        failure, which is logged here). Cancelling the task (ray.cancel) stops the request at once."""
        inp = GenerateInput.from_bytes(rec, self.max_bytes)
        if inp.request_id in self._requests:
            raise RequestIdActive(f"request_id: {inp.request_id!r} is already active")
        request = request_from_input(inp)
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        state = self._requests[inp.request_id] = RequestState(inp.request_id, request, seed, self.tokenizer)
        if self.replay is not None:  # each request replays the trace from its start
            state.replay = self.replay.for_request()
        try:
            yield Admitted(inp.request_id).to_bytes()
            if not await self._wait_turn(state):
                yield completion_record(state.completion()).to_bytes()
                return
            self.batcher.join()
            try:
                state.started = time.perf_counter()  # wall time excludes the queue, as LocalBackend's does
                # closed before the release below, however this generator ends: no step may follow it
                async with contextlib.aclosing(run_ahead(self._run(state))) as steps:
                    async for event in steps:
                        yield event_record(event).to_bytes()
                done = state.completion()
            except (ray.exceptions.RayError, StepFailed) as err:
                # A worker actor failed: the driver answers UNAVAILABLE and the backend restarts the set.
                log.error("request %s: %s", inp.request_id, err)
                raise
            except Exception:
                log.exception("request %s failed", inp.request_id)
                done = state.completion()
                done.finish_reason = FinishReason.ERROR
            except (asyncio.CancelledError, GeneratorExit):
                # ray.cancel raises CancelledError at an await, or closes the generator at a yield
                self._remember(self._cancelled, inp.request_id, len(state.output.token_ids))
                self._remember(self._stopped_at, inp.request_id, state.step)
                raise
            finally:
                self.batcher.leave()
                self._release(state)
                self._turns.release()
            yield completion_record(done).to_bytes()
        finally:
            del self._requests[inp.request_id]

    # ---- the loop ------------------------------------------------------------------------------------

    async def _run(self, state: RequestState) -> AsyncIterator[StepEvent]:
        request, out = state.request, state.output
        while out.finish is None and not state.aborted.is_set():
            k = draft_length(request, len(state.ids), len(out.token_ids), self.max_seq_len)
            k = capped_draft_length(k, self.batcher.running, self.k_caps)
            if not request.mode.is_speculative or k == 0 or state.target_len == 0:
                step = await self._target_step(state)
                state.done.steps += len(step.tokens)  # a pass each
            else:
                step = await self._speculative_step(state, k)
                state.done.steps += 1
            yield state.advance(step)

    async def _target_step(self, state: RequestState) -> Accepted:
        """Target passes over what its cache lacks (the prompt, or the last token), a token each: the prefill
        alone (its first token streams at once), later up to serve.ar_tokens_per_call tokens per call."""
        request, emitted = state.request, len(state.output.token_ids)
        tokens = 1
        if state.target_len > 0:  # within max_tokens, and the cache's room: each token but the last is fed
            room = self.max_seq_len - len(state.ids) + 1
            tokens = max(1, min(self.ar_tokens_per_call, request.params.max_tokens - emitted, room))
        pending = state.pending(state.target_len)
        target = TargetInput(state.request_id, state.target_len, pending, state.step, state.sampling, tokens)
        result, wall = await self._execute(state, self._plan(state, target=target), None)
        out, timings = result.target, state.done.timings
        timings.verify_s += out.compute_s
        if target.keep == 0:  # the prompt's pass
            timings.prefill_s += out.compute_s
        timings.verify_compute_s += out.compute_s
        timings.transport_s += wall - out.compute_s
        state.target_len = out.cache_len
        return Accepted(out.tokens, [Provenance.TARGET] * len(out.tokens))

    async def _speculative_step(self, state: RequestState, k: int) -> Accepted:
        """draft -> verify -> judge in one trip through the step graph, then accept."""
        reused = self._reusable_speculation(state, k)
        speculate = self._next_block(state, k, reused)
        draft = None
        if reused is None:  # a dropped speculation changed nothing this call relies on: it rolls back
            pending = state.pending(state.draft_len)
            # greedy, with nothing drafted ahead: the block may stay on the GPU for rank 0 (actors.handoff)
            handoff = self.handoff and speculate is None and state.request.params.greedy
            draft = DraftInput(state.request_id, state.draft_len, pending, k, False, state.step, state.sampling, handoff)
        judge = state.request.mode is Mode.JUDGE
        verify = VerifyInput(
            state.request_id,
            state.target_len,
            state.pending(state.target_len),
            reused.out.tokens if reused is not None else [],  # else the shards take this step's block
            judge,
            state.step,
            state.sampling,
        )
        plan = self._plan(state, draft=draft, verify=verify, judge=judge, speculate=speculate)
        result, wall = await self._execute(state, plan, reused.q if reused is not None else None)

        timings = state.done.timings
        compute = verdict_compute = result.verify.compute_s  # the step's critical path, inside the actors
        if reused is None:
            block = result.drafted.tokens
            state.draft_len = result.drafted.cache_len
            timings.draft_s += result.drafted.compute_s
            timings.draft_compute_s += result.drafted.compute_s
            compute += result.drafted.compute_s
        else:
            block = reused.out.tokens
        verdict = result.verify
        timings.verify_s += verdict_compute
        timings.verify_compute_s += verdict_compute
        state.target_len = verdict.cache_len
        judged = None
        if judge:
            judged = result.judged.judged
            timings.judge_s += result.judged.compute_s
            timings.judge_compute_s += result.judged.compute_s
            compute += result.judged.compute_s
        timings.transport_s += wall - compute
        if result.speculated is not None:  # drafted during verification: off the critical path
            timings.draft_compute_s += result.speculated.compute_s
            state.done.pipelined_blocks += 1
            self._pipelined[0] += 1

        step = self._accept(state, block, verdict, judged, result)
        done = state.done
        done.speculative_steps += 1
        done.draft_tokens_proposed += k
        done.draft_tokens_accepted += step.draft_accepted
        done.judge_accepted_tokens += sum(p is Provenance.JUDGE for p in step.provenance)
        return step

    def _reusable_speculation(self, state: RequestState, k: int) -> Speculation | None:
        """The block drafted during the last verification, if it is valid: the last step accepted all K
        draft tokens and its bonus is the draft's guess, so the draft has seen exactly this step's sequence."""
        spec, state.speculation = state.speculation, None
        if spec is None or spec.bonus is None or spec.k != k or spec.out.guess != spec.bonus:
            return None
        state.draft_len = spec.out.cache_len
        state.done.pipelined_blocks_used += 1
        self._pipelined[1] += 1
        return spec

    def _next_block(self, state: RequestState, k: int, reused: Speculation | None) -> DraftInput | None:
        """With pipelining: the next step's block, drafted assuming this one is accepted in full (fed d_K; the
        draft guesses the bonus first). None where that next step would not be a speculative step."""
        if not self.pipeline:
            return None
        ids_len, emitted = len(state.ids) + k + 1, len(state.output.token_ids) + k + 1
        k_next = capped_draft_length(draft_length(state.request, ids_len, emitted, self.max_seq_len), self.batcher.running, self.k_caps)
        if k_next == 0:
            return None
        # keep and feed are the reused block's here; a block drafted in this step sets its own (DraftWorker).
        feed = reused.out.tokens[-1:] if reused is not None else []
        return DraftInput(state.request_id, state.draft_len, feed, k_next, True, state.step + 1, state.sampling)

    def _plan(
        self,
        state: RequestState,
        *,
        draft: DraftInput | None = None,
        target: TargetInput | None = None,
        verify: VerifyInput | None = None,
        judge: bool = False,
        speculate: DraftInput | None = None,
        release: bool = False,
    ) -> StepPlan:
        return StepPlan(
            request_id=state.request_id,
            draft=draft,
            target=target,
            verify=verify,
            judge=judge,
            threshold=state.request.threshold,
            speculate=speculate,
            stop_ids=state.stop_ids,
            release=release,
        )

    async def _execute(self, state: RequestState, plan: StepPlan, q: torch.Tensor | None) -> tuple[StepResult, float]:
        """Runs the step -> (its results, the seconds waited). Shielded: if the request is cancelled meanwhile,
        the step still completes in the actors (a graph's execution cannot be withdrawn), and the release
        follows it."""
        t0 = time.perf_counter()
        result = await asyncio.shield(self.batcher.run(plan, q))
        return result, time.perf_counter() - t0

    def _accept(
        self, state: RequestState, block: list[int], verdict: VerifyOutput, judged: list[bool] | None, result: StepResult
    ) -> Accepted:
        """n leading draft tokens that pass (matched or judged), then the candidate for that n."""
        matched: Verdicts = verdict.matched  # [K]
        if state.replay is not None:
            matched, judged = state.replay(matched, judged)
        n = accepted_length(matched, judged)
        last = verdict.final_candidates[n]
        if result.speculated is not None and n == len(block) and state.replay is not None and state.replay.guess_is_right():
            last = result.speculated.guess  # replayed agreement on the bonus (decoding.replay_guesses)
        if result.speculated is not None and n == len(block):
            # used at the next step if the draft guessed this bonus; otherwise dropped (the draft rolls back)
            k_next = len(result.speculated.tokens)
            state.speculation = Speculation(k_next, result.speculated, result.speculated_q, bonus=last)
        return accept(DraftBlock(torch.tensor(block), None), matched, judged, last)

    # ---- queue and clean-up --------------------------------------------------------------------------

    @staticmethod
    def _remember(recent: dict[str, int], request_id: str, value: int) -> None:
        recent[request_id] = value
        if len(recent) > RECENT_CANCELLED:
            del recent[next(iter(recent))]

    async def _wait_turn(self, state: RequestState) -> bool:
        """Waits for a free slot (serve.max_active_requests); False, holding none, if aborted first."""
        if state.aborted.is_set():
            return False
        acquire = asyncio.ensure_future(self._turns.acquire())
        aborted = asyncio.ensure_future(state.aborted.wait())
        try:
            await asyncio.wait((acquire, aborted), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while queued: leave the queue, then let the cancellation through
            aborted.cancel()
            self._give_up_turn(acquire)
            raise
        aborted.cancel()
        if acquire.done() and not state.aborted.is_set():
            return True
        self._give_up_turn(acquire)
        return False

    def _give_up_turn(self, acquire: asyncio.Future) -> None:
        if not acquire.done():
            acquire.cancel()  # asyncio.Semaphore passes the slot on when a woken waiter is cancelled
        elif not acquire.cancelled():
            self._turns.release()

    def _release(self, state: RequestState) -> None:
        """Frees the request's caches in every actor: a step of its own, after the request's last one (also
        one still running in the actors after a cancellation), so every rank sees the same order."""
        state.speculation = None
        released = asyncio.ensure_future(self.batcher.run(self._plan(state, release=True), None))
        released.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("releasing a request's caches failed: %s", task.exception())
