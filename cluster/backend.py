"""What the gRPC server calls to run requests: the `Backend` protocol, and `LocalBackend` over one Engine.

The server (cluster.server) knows nothing about Ray or torch threads; it validates a request, asks the
backend for an `engine.decode.Request`, and relays what `Backend.stream` yields: one `StepEvent` per
decoding step, then exactly one `Completion` (finish_reason ABORT after `abort`, ERROR after a failure).
The Ray scheduler's backend implements the same protocol; `LocalBackend` is its reference (and the
serving path of a single process without Ray).

Not for: wire formats, validation of sizes at the edge or authentication (cluster.server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Protocol, Sequence

from engine.config import Mode
from engine.decode import Completion, Engine, Request, RequestError, StepEvent
from engine.output import FinishReason, Output
from engine.sampling import SamplingParams
from engine.tokenizer import ChatMessage, Tokenizer
from engine.verify import Provenance

log = logging.getLogger("judgeserve.backend")

LOSSY_NOTE = (
    "ar and standard modes are lossless (exactly the target model's output); judge mode is lossy by design: "
    "the judge head may accept draft tokens the target would not have produced"
)


class RequestIdInUse(RequestError):
    """A request id that an active request already holds (maps to ALREADY_EXISTS, not INVALID_ARGUMENT)."""


class BackendNotReady(RuntimeError):
    """The models are not up, or not all of the backend is (health says NOT_SERVING until they are): while
    loading, and while failed actors restart. Raised before a stream starts or in the middle of one (its
    request is lost); maps to UNAVAILABLE: retry."""


# Request ids of streams closed early that a backend remembers for tests and operators (the oldest go).
RECENT_CLOSED = 1024


class Backend(Protocol):
    def make_request(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        prompt_ids: Sequence[int] | None = None,
        params: SamplingParams,
        mode: Mode | None,
        draft_tokens: int | None,
        threshold: float | None,
    ) -> Request:
        """Tokenizes and checks one request against the models (Engine.make_request); raises RequestError."""
        ...

    def stream(self, request_id: str, request: Request) -> AsyncIterator[StepEvent | Completion]:
        """Runs one request: yields a StepEvent per step, then one Completion. Raises RequestIdInUse before
        the first item when request_id is active. Closing the iterator (aclose, or cancelling the task that
        awaits it) stops the request's work within one step."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Ends an active request; its stream then yields a Completion with finish_reason ABORT within one
        step. False when no active request has this id."""
        ...

    def model_info(self) -> dict:
        """The served models, judge and defaults (the keys of `describe`)."""
        ...

    async def ready(self) -> bool:
        """True once requests can run (models loaded); False if they never will (the start failed)."""
        ...

    def serving(self) -> bool:
        """After `ready`: whether requests can run now (False while failed parts restart)."""
        ...

    def load(self) -> tuple[int, int]:
        """(running, waiting): requests decoding now, and requests queued for a slot."""
        ...

    def capacity(self) -> tuple[int, int]:
        """(running, waiting) at most: the server refuses requests beyond their sum (RESOURCE_EXHAUSTED)."""
        ...


def describe(engine: Engine) -> dict:
    """ModelInfo as plain data; a backend whose models live elsewhere builds the same dict there."""

    def model(loaded, spec) -> dict:
        a = loaded.args
        return {
            "name": loaded.name,
            "family": a.family,
            "layers": a.num_layers,
            "hidden_size": a.hidden_size,
            "vocab_size": a.vocab_size,
            "dtype": spec.dtype.value,
            "fingerprint": loaded.fingerprint,
        }

    cfg, judge = engine.config, engine.judge
    return {
        "name": cfg.name,
        "target": model(engine.target, cfg.target),
        "draft": model(engine.draft, cfg.draft) if engine.draft is not None else None,
        "judge": {
            "present": judge is not None,
            "target_name": judge.target_name if judge is not None else "",
            "target_fingerprint": judge.target_fingerprint if judge is not None else "",
            "default_threshold": engine.default_threshold(),
        },
        "default_mode": cfg.decoding.mode.value,
        "default_draft_tokens": cfg.decoding.draft_tokens,
        "default_max_tokens": cfg.decoding.max_new_tokens,
        "max_seq_len": engine.max_seq_len,
        "lossy_note": LOSSY_NOTE,
    }


class StreamTracker:
    """Mirrors a request's Output from its StepEvents, so that what is streamed always equals the final
    Completion, and an aborted request still gets one.

    The engine's last StepEvent may carry tokens past a stop token, EOS or the token that completed a stop
    string, which its Completion then drops; replaying each step through the same `Output` rules keeps
    exactly the tokens the Completion keeps (a stop rule only ever cuts tokens of the current step).
    """

    def __init__(self, tokenizer: Tokenizer, request: Request):
        self.request = request
        self.output = Output(tokenizer, request.params)
        self.steps = 0
        self.started = time.perf_counter()
        self.finished = False  # the engine returned its Completion

    def step(self, event: StepEvent) -> StepEvent:
        """The event as it should be streamed: tokens cut where the output stops, text as Output emits it."""
        before = len(self.output.token_ids)
        text = self.output.extend(event.tokens, event.provenance)
        self.steps += 1
        return StepEvent(self.output.token_ids[before:], self.output.provenance[before:], text)

    def completion(self, finish: FinishReason) -> Completion:
        """A Completion of what was streamed so far (for ABORT and ERROR; the engine's otherwise)."""
        out, request = self.output, self.request
        done = Completion(
            text=out.text,
            token_ids=list(out.token_ids),
            provenance=list(out.provenance),
            finish_reason=finish,
            prompt_tokens=len(request.prompt_ids),
            mode=request.mode,
            steps=self.steps,
            speculative_steps=sum(p in (Provenance.CORRECTION, Provenance.BONUS) for p in out.provenance),
            draft_tokens_proposed=0,  # not observable from the stream; the engine's own Completion has it
            draft_tokens_accepted=sum(p in (Provenance.MATCHED, Provenance.JUDGE) for p in out.provenance),
            judge_accepted_tokens=sum(p is Provenance.JUDGE for p in out.provenance),
        )
        done.timings.close(time.perf_counter() - self.started)
        return done


@dataclass
class _Active:
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class LocalBackend:
    """Runs an in-process Engine for the server: one request at a time in FIFO order, each engine step on
    one worker thread (the engine and its KV caches are not thread-safe), so the event loop stays free.

    `running` (request ids whose engine generator is open) and `closed_early` (request id -> tokens emitted
    when its generator was closed before it finished; the last RECENT_CLOSED) let tests and operators see
    that cancelled work really stopped.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judgeserve-engine")
        self._turn = asyncio.Lock()  # FIFO: asyncio.Lock wakes waiters in arrival order
        self._active: dict[str, _Active] = {}  # queued or running, by request id
        self._stats_lock = threading.Lock()  # `running` and `closed_early` change on the worker thread
        self._running: set[str] = set()
        self._closed_early: dict[str, int] = {}

    # ---- Backend -------------------------------------------------------------------------------------

    def make_request(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        prompt_ids: Sequence[int] | None = None,
        params: SamplingParams,
        mode: Mode | None,
        draft_tokens: int | None,
        threshold: float | None,
    ) -> Request:
        return self.engine.make_request(
            prompt=prompt,
            messages=messages,
            prompt_ids=prompt_ids,
            params=params,
            mode=mode,
            draft_tokens=draft_tokens,
            threshold=threshold,
        )

    async def stream(self, request_id: str, request: Request) -> AsyncIterator[StepEvent | Completion]:
        if request_id in self._active:
            raise RequestIdInUse(f"request_id: {request_id!r} is already active")
        active = self._active[request_id] = _Active()
        tracker = StreamTracker(self.engine.tokenizer, request)
        try:
            if not await self._wait_turn(active.aborted):
                yield tracker.completion(FinishReason.ABORT)
                return
            try:
                async with contextlib.aclosing(self._run(request_id, request, tracker, active.aborted)) as items:
                    async for item in items:
                        yield item
            finally:
                self._turn.release()
        finally:
            del self._active[request_id]

    async def abort(self, request_id: str) -> bool:
        active = self._active.get(request_id)
        if active is None:
            return False
        active.aborted.set()
        return True

    def model_info(self) -> dict:
        return describe(self.engine)

    async def ready(self) -> bool:
        return True  # the Engine was loaded before this backend was built

    def serving(self) -> bool:
        return True

    def load(self) -> tuple[int, int]:
        running = len(self.running)
        return running, max(0, len(self._active) - running)

    def capacity(self) -> tuple[int, int]:
        return 1, self.engine.config.serve.max_queued_requests

    # ---- observability and shutdown ------------------------------------------------------------------

    @property
    def running(self) -> frozenset[str]:
        with self._stats_lock:
            return frozenset(self._running)

    @property
    def closed_early(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._closed_early)

    def close(self) -> None:
        """Stops the worker thread after the step in progress (call once the server has stopped)."""
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ---- internals -----------------------------------------------------------------------------------

    async def _wait_turn(self, aborted: asyncio.Event) -> bool:
        """Waits for the engine; False (and the turn not held) when the request is aborted while queued."""
        if aborted.is_set():
            return False
        acquire = asyncio.ensure_future(self._turn.acquire())
        abort = asyncio.ensure_future(aborted.wait())
        try:
            await asyncio.wait((acquire, abort), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while queued: leave the queue, then let the cancellation through
            abort.cancel()
            self._give_up_turn(acquire)
            raise
        abort.cancel()
        if acquire.done() and not aborted.is_set():
            return True
        self._give_up_turn(acquire)
        return False

    def _give_up_turn(self, acquire: asyncio.Future) -> None:
        if not acquire.done():
            acquire.cancel()  # asyncio.Lock passes the turn on when a waiter is cancelled, even one just woken
        elif not acquire.cancelled():
            self._turn.release()

    async def _run(
        self, request_id: str, request: Request, tracker: StreamTracker, aborted: asyncio.Event
    ) -> AsyncIterator[StepEvent | Completion]:
        loop = asyncio.get_running_loop()
        steps = self.engine.stream(request)  # a generator: no work until the first step
        tracker.started = time.perf_counter()  # wall time excludes the queue, as the engine's own does
        with self._stats_lock:
            self._running.add(request_id)
        try:
            while not aborted.is_set():
                item = await loop.run_in_executor(self._worker, _advance, steps, tracker)
                yield item
                if isinstance(item, Completion):
                    return
            yield tracker.completion(FinishReason.ABORT)
        except Exception:  # the engine failed: log it, end the stream with ERROR
            log.exception("request %s failed", request_id)
            yield tracker.completion(FinishReason.ERROR)
        finally:
            # Queued on the single worker, so it runs right after a step still in progress (a cancelled
            # await does not stop the thread) and before the next request's first step.
            self._worker.submit(self._close, request_id, steps, tracker)

    def _close(self, request_id: str, steps: Iterator[StepEvent], tracker: StreamTracker) -> None:
        """Worker thread: closes the engine generator, which stops its work (GeneratorExit at its yield)."""
        if not tracker.finished:
            steps.close()
        with self._stats_lock:
            self._running.discard(request_id)
            if not tracker.finished:
                self._closed_early[request_id] = len(tracker.output.token_ids)
                if len(self._closed_early) > RECENT_CLOSED:
                    del self._closed_early[next(iter(self._closed_early))]


def _advance(steps: Iterator[StepEvent], tracker: StreamTracker) -> StepEvent | Completion:
    """Worker thread: one engine step -> the event to stream, or the engine's Completion when done."""
    try:
        event = next(steps)
    except StopIteration as done:
        tracker.finished = True
        return done.value
    return tracker.step(event)
