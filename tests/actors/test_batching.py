"""Continuous batching (issue 6): the scheduler's StepBatcher without Ray, and served requests of different
modes, K, thresholds and lengths, arriving and finishing at different times, batched into shared passes.

The served checks run the tiny pair in bfloat16, where the CPU's matrix products give a row the same bits
whatever the batch (docs/engine.md), so each request's greedy output must equal the same request run alone
in the in-process engine, token for token, provenance and acceptance counts included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import ray

from actors.messages import StepPlan
from actors.scheduler import StepBatcher, capped_draft_length, run_ahead
from cluster.ray_backend import RayBackend
from engine.config import Config, Mode
from engine.decode import Completion, Engine
from engine.output import FinishReason
from engine.sampling import SamplingParams

pytestmark = pytest.mark.timeout(240)


# ---- StepBatcher, no Ray -------------------------------------------------------------------------------


class FakeGraph:
    """Records each execution's request ids; fails when asked to."""

    def __init__(self, fail: bool = False):
        self.batches: list[list[str]] = []
        self.fail = fail

    async def run(self, plans: list[StepPlan], qs: list) -> list[str]:
        self.batches.append([p.request_id + ("/release" if p.release else "") for p in plans])
        await asyncio.sleep(0.01)
        if self.fail:
            raise RuntimeError("an actor died")
        return [f"result of {p.request_id}" for p in plans]


def _plan(request_id: str, release: bool = False) -> StepPlan:
    return StepPlan(request_id, None, None, None, False, 1.0, None, [], release)


def test_the_steps_of_every_running_request_leave_as_one_batch():
    async def run():
        graph = FakeGraph()
        batcher = StepBatcher(graph, wait_s=5.0)  # a long wait: the batch must leave because all are in
        for _ in range(3):
            batcher.join()

        async def request(name: str, delay: float) -> str:
            await asyncio.sleep(delay)
            return await batcher.run(_plan(name), None)

        results = await asyncio.gather(request("a", 0), request("b", 0.02), request("c", 0.04))
        return graph, batcher, results

    t0 = time.monotonic()
    graph, batcher, results = asyncio.run(run())
    assert time.monotonic() - t0 < 1.0
    assert graph.batches == [["a", "b", "c"]]
    assert results == ["result of a", "result of b", "result of c"]
    assert (batcher.batches, batcher.batched_steps) == (1, 3)


def test_a_batch_leaves_without_a_straggler_after_the_wait_and_when_a_request_leaves():
    async def run():
        graph = FakeGraph()
        batcher = StepBatcher(graph, wait_s=0.05)
        batcher.join()
        batcher.join()
        batcher.join()
        # only "a" submits: the batch leaves after wait_s without the other two
        await batcher.run(_plan("a"), None)
        # "b" submits, then the third request leaves (finished): the batch of "b" and "c" need not wait
        b = asyncio.ensure_future(batcher.run(_plan("b"), None))
        await asyncio.sleep(0)
        batcher.leave()
        c = asyncio.ensure_future(batcher.run(_plan("c"), None))
        t0 = time.monotonic()
        await asyncio.gather(b, c)
        return graph, time.monotonic() - t0

    graph, waited = asyncio.run(run())
    assert graph.batches == [["a"], ["b", "c"]]
    assert waited < 0.04  # left as soon as both running requests were in, not after wait_s


def test_a_release_rides_along_and_a_failure_reaches_every_request_of_the_batch():
    async def run():
        graph = FakeGraph(fail=True)
        batcher = StepBatcher(graph, wait_s=1.0)
        batcher.join()
        batcher.join()
        release = asyncio.ensure_future(batcher.run(_plan("old", release=True), None))
        outcomes = await asyncio.gather(
            batcher.run(_plan("a"), None), batcher.run(_plan("b"), None), release, return_exceptions=True
        )
        return graph, batcher, outcomes

    graph, batcher, outcomes = asyncio.run(run())
    assert graph.batches == [["old/release", "a", "b"]]  # the release did not count as a running request's step
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert (batcher.batches, batcher.batched_steps) == (1, 2)


def test_each_streamed_step_is_handed_over_after_the_next_step_left():
    """run_ahead: while the consumer handles step t (Ray reporting its record), step t+1 is in the graph."""
    async def run():
        graph = FakeGraph()
        batcher = StepBatcher(graph, wait_s=5.0)
        batcher.join()

        async def steps():
            for i in range(3):
                yield await batcher.run(_plan(f"r{i}"), None)

        plain = [(result, len(graph.batches)) async for result in steps()]
        ahead = [(result, len(graph.batches) - 3) async for result in run_ahead(steps())]
        return plain, ahead

    plain, ahead = asyncio.run(run())
    assert [r for r, _ in ahead] == [r for r, _ in plain] == ["result of r0", "result of r1", "result of r2"]
    assert [n for _, n in plain] == [1, 2, 3]  # iterated directly: step t+1 waits for the consumer
    assert [n for _, n in ahead] == [2, 3, 3]


def test_run_ahead_raises_the_sources_error_after_its_items_and_closing_it_stops_the_source():
    ended = []

    async def source(fail: bool):
        try:
            for i in range(3):
                await asyncio.sleep(0.01)
                yield i
            if fail:
                raise ValueError("step failed")
            await asyncio.sleep(60)  # a step in flight when the consumer goes
        finally:
            ended.append(fail)

    async def run():
        got = []
        with pytest.raises(ValueError, match="step failed"):
            async for item in run_ahead(source(fail=True)):
                got.append(item)
        stream = run_ahead(source(fail=False))
        first = await stream.__anext__()
        started = time.perf_counter()
        # the client went: the source is cancelled and has ended when aclose returns (the scheduler
        # releases the request's caches right after, so no step may follow)
        await stream.aclose()
        return got, first, time.perf_counter() - started, list(ended)

    got, first, closing_s, ended_at_close = asyncio.run(run())
    assert got == [0, 1, 2] and first == 0
    assert ended_at_close == [True, False] and closing_s < 1.0


@pytest.mark.parametrize(
    "k, running, caps, want",
    [(8, 1, {}, 8), (8, 20, {}, 8), (8, 3, {4: 4, 16: 2}, 8), (8, 4, {4: 4, 16: 2}, 4), (8, 64, {4: 4, 16: 2}, 2), (1, 64, {16: 2}, 1)],
)
def test_draft_length_under_load(k, running, caps, want):
    assert capped_draft_length(k, running, caps) == want


# ---- served: many requests at once ----------------------------------------------------------------------


PROMPTS = [b"The quick brown fox", b"def add(a, b):", b"Dear Sir,", b"import os\n", b"Hello, world", b"abc"]
# (prompt, mode, K, threshold, max_tokens): different lengths, modes, K and thresholds in one batch
REQUESTS = {
    "ar-long": (0, Mode.AR, None, None, 40),
    "standard-k4": (1, Mode.STANDARD, 4, None, 36),
    "judge-lenient": (2, Mode.JUDGE, 3, 0.5, 30),
    "judge-strict": (3, Mode.JUDGE, 5, 0.999, 34),  # arrives after the first tokens of the others
    "standard-k2": (4, Mode.STANDARD, 2, None, 12),  # arrives when a slot frees (max_active_requests 4)
    "ar-short": (5, Mode.AR, None, None, 6),
}


@pytest.fixture(scope="module")
def config(judge_config) -> Config:
    # bfloat16: the batch-invariant dtype on the CPU; the judge head's fingerprint is dtype-independent
    update = {"target": judge_config.target.model_copy(update={"dtype": "bfloat16"}),
              "draft": judge_config.draft.model_copy(update={"dtype": "bfloat16"})}
    return judge_config.model_copy(update=update)


@pytest.fixture(scope="module")
def alone(config) -> dict[str, Completion]:
    """Each request run alone in the in-process engine."""
    engine = Engine.from_config(config)
    out = {}
    for name, (p, mode, k, t, n) in REQUESTS.items():
        request = engine.make_request(
            prompt=PROMPTS[p].decode(), params=SamplingParams(max_tokens=n, ignore_eos=True), mode=mode, draft_tokens=k, threshold=t
        )
        out[name] = engine.generate(request)
    assert out["judge-lenient"].judge_accepted_tokens > 0, "the judge must be lossy here to test anything"
    return out


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
    yield
    ray.shutdown()


def _backend(config: Config, loop, running: int, pipeline: bool = True, compiled: bool = False) -> RayBackend:
    serve = config.serve.model_copy(update={"max_active_requests": running, "pipeline": pipeline, "compiled_graph": compiled})
    backend = RayBackend(config.model_copy(update={"serve": serve}))
    assert loop.run(backend.ready(), timeout=90)
    return backend


async def _drain(backend: RayBackend, name: str, n: int | None = None, first_token: asyncio.Event | None = None) -> Completion:
    p, mode, k, t, max_tokens = REQUESTS.get(name, (0, Mode.AR, None, None, n))
    request = backend.make_request(
        prompt=PROMPTS[p].decode(), params=SamplingParams(max_tokens=n or max_tokens, ignore_eos=True),
        mode=mode, draft_tokens=k, threshold=t,
    )
    async with contextlib.aclosing(backend.stream(name, request)) as items:
        async for item in items:
            if isinstance(item, Completion):
                return item
            if first_token is not None and item.tokens:
                first_token.set()
    raise AssertionError("no completion")


@pytest.mark.parametrize("compiled", [False, True], ids=["calls", "graph"])
def test_batched_requests_equal_each_request_run_alone(ray_local, config, alone, compiled):
    from tests.conftest import EventLoopThread

    loop = EventLoopThread()
    backend = _backend(config, loop, running=4, compiled=compiled)
    try:

        async def run() -> dict[str, Completion]:
            started = asyncio.Event()
            first = {name: asyncio.ensure_future(_drain(backend, name, first_token=started if name == "ar-long" else None))
                     for name in ("ar-long", "standard-k4", "judge-lenient")}
            await started.wait()
            late = {name: asyncio.ensure_future(_drain(backend, name)) for name in ("judge-strict", "standard-k2", "ar-short")}
            return {name: await task for name, task in {**first, **late}.items()}

        done = loop.run(run(), timeout=180)
        stats = loop.run(backend.actor_stats())
    finally:
        backend.close()
        loop.close()
    for name, want in alone.items():
        got = done[name]
        assert got.token_ids == want.token_ids, name
        assert got.provenance == want.provenance, name
        for key in ("finish_reason", "speculative_steps", "draft_tokens_accepted", "judge_accepted_tokens"):
            assert getattr(got, key) == getattr(want, key), (name, key)
    steps = sum(c.steps for c in done.values())
    # a step is one target pass, except an autoregressive call, which may decode several tokens (one pass each)
    # when its batch holds nothing else (serve.ar_tokens_per_call)
    ar_passes = sum(c.steps - c.speculative_steps for c in done.values())
    assert steps - ar_passes < stats["batched_steps"] <= steps
    # Unbatched, every step is an execution of its own; batched, the longest request's steps carry the
    # others' (a request arriving or leaving mid-batch may cost one extra batch each).
    longest = max(c.steps for c in done.values())
    assert stats["batches"] <= longest + len(REQUESTS) < steps, f"{stats['batches']} batches for {steps} steps"


def test_an_aborted_request_frees_its_slot_for_the_next(ray_local, config, alone):
    from tests.conftest import EventLoopThread

    loop = EventLoopThread()
    backend = _backend(config, loop, running=2)
    try:

        async def run():
            x = asyncio.ensure_future(_drain(backend, "x", n=400))
            y = asyncio.ensure_future(_drain(backend, "y", n=400))
            while not all(r in backend._active and backend._active[r].admitted for r in ("x", "y")):
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(_drain(backend, "standard-k2"))
            await asyncio.sleep(0.3)
            assert not waiting.done(), "a third request ran while two held both slots"
            assert await backend.abort("x")
            third = await waiting  # runs in x's slot while y is still decoding
            assert not y.done()
            assert await backend.abort("y")
            return await x, await y, third

        x, y, third = loop.run(run(), timeout=180)
        deadline = time.monotonic() + 20
        while True:
            stats = loop.run(backend.actor_stats())
            held = [stats["scheduler"], stats["draft"], *stats["target"]]
            if not any(held) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        backend.close()
        loop.close()
    assert x.finish_reason is FinishReason.ABORT and y.finish_reason is FinishReason.ABORT
    assert third.token_ids == alone["standard-k2"].token_ids and third.finish_reason is FinishReason.LENGTH
    assert not any(held), stats


def test_a_seeded_sampled_request_draws_the_same_tokens_batched_as_alone(ray_local, config):
    """Per-request sampling in a batch: a seeded request with its own temperature and top-k, run alone and
    then beside greedy requests of other modes, emits the same tokens (every random draw comes from the
    request's own seed and step, and its rows compute the same bits in a batch)."""
    from tests.conftest import EventLoopThread

    loop = EventLoopThread()
    backend = _backend(config, loop, running=4)
    params = SamplingParams(max_tokens=24, temperature=0.8, top_k=40, seed=11, ignore_eos=True)

    async def sampled(request_id: str) -> Completion:
        request = backend.make_request(prompt="Dear Sir,", params=params, mode=Mode.STANDARD, draft_tokens=4, threshold=None)
        async with contextlib.aclosing(backend.stream(request_id, request)) as items:
            async for item in items:
                if isinstance(item, Completion):
                    return item
        raise AssertionError("no completion")

    try:
        alone = loop.run(sampled("sampled-alone"), timeout=120)

        async def together():
            others = [asyncio.ensure_future(_drain(backend, name)) for name in ("ar-long", "judge-lenient", "standard-k4")]
            got = await sampled("sampled-batched")
            await asyncio.gather(*others)
            return got

        batched = loop.run(together(), timeout=120)
    finally:
        backend.close()
        loop.close()
    assert alone.finish_reason is FinishReason.LENGTH and len(alone.token_ids) == 24
    assert batched.token_ids == alone.token_ids
