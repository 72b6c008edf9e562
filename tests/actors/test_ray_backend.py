"""The Ray actors through cluster.ray_backend.RayBackend (and once through the gRPC server), on the tiny pair.

One local Ray per module (loopback, logical CPUs only: the actors are idle between tests); the backends
are started once each and shared: TP=1 and TP=2 (gloo) with pipelining, TP=1 without, and TP=1 with the
draft model in target rank 0's process (serve.draft_placement in_rank0, no draft worker actor). At TP=1 the draft
worker hands its greedy blocks to the shard through memory both map (actors.handoff) where a step drafts
nothing ahead (every step without pipelining), at TP=2 they go through the step graph. Greedy outputs must
equal the in-process Engine's in every mode, with and without pipelining; abort and cancellation must
leave no request state in any actor. The async backend runs on an event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import pytest
import ray

from cluster.backend import describe
from cluster.client import Final, JudgeserveClient
from cluster.ray_backend import RayBackend
from engine.config import Config, DraftPlacement, Mode
from engine.decode import Completion, Engine, RequestError, StepEvent
from engine.output import FinishReason
from engine.sampling import SamplingParams
from tests.conftest import EventLoopThread

TINY_YAML = Path(__file__).resolve().parents[2] / "config" / "tiny.yaml"
PROMPT = "The quick"
SHORT, LONG = 12, 40  # max_tokens of the equality checks and of the pipelining comparison
ENDLESS = 400  # max_tokens of requests that must still be running when aborted (ignore_eos)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def config(judge_config) -> Config:
    return judge_config


@pytest.fixture(scope="module")
def engine(config) -> Engine:
    return Engine.from_config(config)


@pytest.fixture(scope="module")
def expected(engine) -> dict[tuple[Mode, int], Completion]:
    """The in-process engine's greedy outputs, by (mode, max_tokens)."""
    out = {}
    for mode in Mode:
        for n in (SHORT, LONG):
            request = engine.make_request(prompt=PROMPT, params=SamplingParams(max_tokens=n), mode=mode)
            out[mode, n] = engine.generate(request)
    assert out[Mode.JUDGE, SHORT].judge_accepted_tokens > 0, "the judge case must be lossy to test anything"
    return out


@pytest.fixture(scope="module")
def loop():
    lp = EventLoopThread()
    yield lp
    lp.close()


class _Backends:
    """RayBackends by (tensor_parallel, pipeline, compiled step graph, ...), each started once and kept, all
    closed at the end; except that at most one with a compiled graph is up at a time, and none while a backend
    without one is in use: a compiled graph's actors poll their channels even when idle (two cores for TP=2,
    all this machine has), which would slow every later test."""

    def __init__(self, config: Config, loop: EventLoopThread):
        self.config, self.loop, self.started = config, loop, {}
        self.since = time.time()  # for the rendezvous folders the TP groups made

    def get(
        self,
        tp: int,
        pipeline: bool,
        compiled: bool = False,
        running: int | None = None,
        ar_tokens: int | None = None,
        in_rank0: bool = False,
    ) -> RayBackend:
        key = tp, pipeline, compiled, running, ar_tokens, in_rank0
        for other in [k for k in self.started if k[2] and k != key]:
            self.started.pop(other).close()
        if key not in self.started:
            # at TP=1 greedy blocks reach rank 0 through the hand-off buffer (the CUDA default where the draft
            # shares rank 0's GPU; a shared-memory file here), at TP=2 through the step graph's channel
            update = {"tensor_parallel": tp, "pipeline": pipeline, "compiled_graph": compiled,
                      "block_handoff": tp == 1 and not in_rank0}
            if in_rank0:  # the draft model in rank 0's process: its nodes are rank 0's (no draft worker actor)
                update["draft_placement"] = DraftPlacement.IN_RANK0
            if running is not None:
                update["max_active_requests"] = running
            if ar_tokens is not None:
                update["ar_tokens_per_call"] = ar_tokens
            backend = RayBackend(self.config.model_copy(update={"serve": self.config.serve.model_copy(update=update)}))
            assert self.loop.run(backend.ready(), timeout=90)
            self.started[key] = backend
        return self.started[key]

    def close(self) -> None:
        for backend in self.started.values():
            backend.close()


@pytest.fixture(scope="module")
def backends(config, loop):
    # Logical CPUs for up to 8 backends' bundles (the actors are idle between tests).
    ray.init(num_cpus=24, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
    started = _Backends(config, loop)
    yield started
    started.close()
    ray.shutdown()


# The step graph as plain calls (the CPU default) with TP=1 and TP=2, and as a Ray Compiled Graph (the CUDA
# default) with TP=2. Module-scoped so that pytest runs each backend's tests together.
@pytest.fixture(scope="module", params=[(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2-graph"])
def backend(request, backends) -> RayBackend:
    tp, compiled = request.param
    return backends.get(tp, pipeline=True, compiled=compiled)


async def _collect(backend: RayBackend, request_id: str, **kwargs) -> tuple[list[StepEvent], Completion]:
    mode = kwargs.pop("mode", None)
    params = SamplingParams(**kwargs)
    request = backend.make_request(prompt=PROMPT, params=params, mode=mode, draft_tokens=None, threshold=None)
    events = []
    async with contextlib.aclosing(backend.stream(request_id, request)) as items:
        async for item in items:
            if isinstance(item, Completion):
                return events, item
            events.append(item)
    raise AssertionError("no completion")


def _wait_empty(backend: RayBackend, loop: EventLoopThread, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = loop.run(backend.actor_stats())
        held = [stats["scheduler"], stats["draft"], *stats["target"], stats["judge"]]
        if not any(held) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def _assert_same(got: Completion, want: Completion, events: list[StepEvent] | None = None) -> None:
    assert got.token_ids == want.token_ids
    assert got.text == want.text
    assert got.provenance == want.provenance
    for key in ("finish_reason", "steps", "speculative_steps", "draft_tokens_accepted", "judge_accepted_tokens"):
        assert getattr(got, key) == getattr(want, key), key
    if events is not None:
        assert [t for e in events for t in e.tokens] == want.token_ids
        assert "".join(e.text for e in events) == want.text


# ---- outputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_greedy_output_equals_in_process_engine(backend, loop, expected, mode):
    events, done = loop.run(_collect(backend, f"eq-{mode.value}", max_tokens=SHORT, mode=mode))
    _assert_same(done, expected[mode, SHORT], events)
    t = done.timings
    assert t.total_s > 0 and t.verify_s > 0 and t.overhead_s >= 0
    assert 0 < t.prefill_s < t.verify_s  # the prompt's pass, one of the request's target passes
    assert (t.draft_s > 0) == mode.is_speculative and (t.judge_s > 0) == (mode is Mode.JUDGE)


@pytest.mark.parametrize("compiled", [False, True], ids=["calls", "graph"])
def test_the_draft_in_rank_0s_process_gives_the_engines_output_with_no_actor_of_its_own(
    backends, loop, engine, expected, compiled
):
    backend = backends.get(1, pipeline=False, compiled=compiled, in_rank0=True)
    assert "draft" not in backend.actors()
    assert backend.model_info()["draft"] == describe(engine)["draft"]  # rank 0's draft_info: the draft's noisy weights
    for mode in Mode:
        events, done = loop.run(_collect(backend, f"rank0-{mode.value}", max_tokens=LONG, mode=mode))
        _assert_same(done, expected[mode, LONG], events)
    assert _wait_empty(backend, loop)["draft"] == []  # rank 0's draft caches released with the requests


@pytest.mark.parametrize("compiled", [False, True], ids=["calls", "graph"])
def test_pipelined_and_unpipelined_give_the_same_output(backends, loop, expected, compiled):
    runs = {}
    for pipeline in (True, False):
        backend = backends.get(1, pipeline, compiled)
        for mode in (Mode.STANDARD, Mode.JUDGE):
            _, runs[pipeline, mode] = loop.run(_collect(backend, f"pipe-{pipeline}", max_tokens=LONG, mode=mode))
            _assert_same(runs[pipeline, mode], expected[mode, LONG])
    for mode in (Mode.STANDARD, Mode.JUDGE):
        on, off = runs[True, mode], runs[False, mode]
        assert off.pipelined_blocks == 0
        assert 0 < on.pipelined_blocks_used <= on.pipelined_blocks <= on.speculative_steps
        print(
            f"\n{mode.value}: {on.speculative_steps} speculative steps, {on.pipelined_blocks} blocks drafted ahead, "
            f"{on.pipelined_blocks_used} used; wall {on.timings.total_s:.3f} s pipelined vs {off.timings.total_s:.3f} s; "
            f"waits draft {on.timings.draft_s:.3f} vs {off.timings.draft_s:.3f} s"
        )


@pytest.mark.parametrize("tp", [1, 2])
def test_grpc_server_over_ray_backend_streams_the_engines_output(backends, loop, expected, tp):
    backend = backends.get(tp, pipeline=True)

    server, port = loop.start_server(backend, host="127.0.0.1", port=0)
    try:
        with JudgeserveClient(f"127.0.0.1:{port}") as client:
            assert client.health() == "SERVING"
            assert client.model_info()["target"]["name"] == "dummy:tiny"
            for mode in Mode:
                *deltas, final = list(client.stream(PROMPT, max_tokens=SHORT, mode=mode.value, timeout=60))
                want = expected[mode, SHORT]
                assert isinstance(final, Final) and final.result["token_ids"] == want.token_ids
                assert final.result["text"] == want.text == "".join(d.text for d in deltas)
                assert final.result["provenance"] == [p.name.lower() for p in want.provenance]
    finally:
        loop.run(server.stop(0))


def test_autoregressive_calls_of_several_tokens_give_the_output_of_one_token_calls(backends, loop, config):
    """serve.ar_tokens_per_call (default 8) against 1, at TP=2 (the shards run the further passes on tokens
    rank 0 broadcasts): the same tokens greedy, seeded-sampled, and stopping at a stop id in the middle of a
    call, as many passes, in fewer step-graph executions."""
    per = config.serve.ar_tokens_per_call
    assert per == 8
    several, single = backends.get(2, pipeline=True), backends.get(2, pipeline=True, ar_tokens=1)
    n = 13  # the calls after the prefill's take 8 tokens, then the 4 left: the last call is cut to max_tokens
    sampled = dict(temperature=0.8, top_p=0.9, top_k=50, seed=3)
    runs = {}
    for name, backend in (("several", several), ("single", single)):
        before = loop.run(backend.actor_stats())["batches"]
        _, greedy = loop.run(_collect(backend, f"ar-{name}", max_tokens=n, mode=Mode.AR))
        _, drawn = loop.run(_collect(backend, f"ar-sampled-{name}", max_tokens=n, mode=Mode.AR, **sampled))
        runs[name] = greedy, drawn, loop.run(backend.actor_stats())["batches"] - before
    (greedy, drawn, calls), (greedy_1, drawn_1, calls_1) = runs["several"], runs["single"]
    for got, want in ((greedy, greedy_1), (drawn, drawn_1)):
        assert got.token_ids == want.token_ids and len(got.token_ids) == n
        assert got.steps == want.steps == n and got.finish_reason == want.finish_reason
    assert drawn.token_ids != greedy.token_ids  # the sampled request did sample
    assert calls_1 == 2 * n and calls == 2 * (1 + -(-(n - 1) // per))  # a prefill call each, then 8 tokens a call
    # a stop id that first appears at token 6 or later (in the call of tokens 2-9 unless the output repeats
    # itself for long): the call holding it ends there, as one-token calls would
    stop = next(t for i, t in enumerate(greedy.token_ids) if i >= 5 and t not in greedy.token_ids[:i])
    at = greedy.token_ids.index(stop)
    for backend in (several, single):
        _, done = loop.run(_collect(backend, "ar-stop", max_tokens=n, mode=Mode.AR, stop_token_ids=[stop]))
        assert done.token_ids == greedy.token_ids[: at + 1] and done.finish_reason is FinishReason.STOP


def test_seeded_sampling_is_reproducible(backends, loop):
    backend = backends.get(1, pipeline=True)
    kwargs = dict(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50, seed=3, mode=Mode.JUDGE)
    _, a = loop.run(_collect(backend, "sample-a", **kwargs))
    _, b = loop.run(_collect(backend, "sample-b", **kwargs))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 16


# ---- requests, model info -----------------------------------------------------------------------------


def test_a_tp_group_leaves_no_rendezvous_folder_behind(backends):
    """actors.target_group.form_group: the file store's folder goes once every rank has joined."""
    backends.get(2, pipeline=True)
    folders = Path(tempfile.gettempdir()).glob("judgeserve-tp-*")
    assert [f for f in folders if f.stat().st_ctime >= backends.since - 1] == []


def test_model_info_and_request_checks_are_the_engines(backends, engine):
    backend = backends.get(1, pipeline=True)
    assert backend.model_info() == describe(engine)
    with pytest.raises(RequestError, match="^prompt_ids:"):
        backend.make_request(prompt_ids=[10**6], params=SamplingParams(), mode=None, draft_tokens=None, threshold=None)
    request = backend.make_request(prompt=PROMPT, params=SamplingParams(), mode=None, draft_tokens=None, threshold=None)
    assert request == engine.make_request(prompt=PROMPT, params=SamplingParams())


# ---- abort and cancellation ---------------------------------------------------------------------------


def test_abort_stops_the_request_and_frees_every_actor(backend, loop):
    async def run() -> tuple[list[StepEvent], Completion, bool]:
        request = backend.make_request(
            prompt=PROMPT, params=SamplingParams(max_tokens=ENDLESS, ignore_eos=True), mode=Mode.STANDARD,
            draft_tokens=None, threshold=None,
        )
        events, found = [], None
        async with contextlib.aclosing(backend.stream("abort-me", request)) as items:
            async for item in items:
                if isinstance(item, Completion):
                    return events, item, found
                events.append(item)
                if len(events) == 2:
                    found = await backend.abort("abort-me")

    events, done, found = loop.run(run())
    assert found is True and done.finish_reason is FinishReason.ABORT
    assert 2 <= len(done.token_ids) < ENDLESS and done.token_ids == [t for e in events for t in e.tokens]
    stats = _wait_empty(backend, loop)
    assert stats["scheduler"] == [] and stats["draft"] == [] and stats["judge"] == []
    assert stats["target"] == [[]] * len(stats["target"])
    assert loop.run(backend.abort("abort-me")) is False


def test_closing_the_stream_cancels_the_request_and_frees_every_actor(backends, loop, expected):
    backend = backends.get(2, pipeline=True)

    async def run() -> int:
        request = backend.make_request(
            prompt=PROMPT, params=SamplingParams(max_tokens=ENDLESS, ignore_eos=True), mode=Mode.STANDARD,
            draft_tokens=None, threshold=None,
        )
        items = backend.stream("cancel-me", request)
        for _ in range(2):
            await items.__anext__()
        await items.aclose()  # what a cancelled gRPC call does
        return len(backend._active)

    assert loop.run(run()) == 0
    stats = _wait_empty(backend, loop)
    assert not any([stats["scheduler"], stats["draft"], *stats["target"]]), stats
    assert 2 <= stats["cancelled"]["cancel-me"] < ENDLESS  # stopped, not run to the end
    # The freed id is usable again at once, with the same output as before.
    _, done = loop.run(_collect(backend, "cancel-me", max_tokens=SHORT, mode=Mode.JUDGE))
    _assert_same(done, expected[Mode.JUDGE, SHORT])


def test_a_queued_request_can_be_aborted(backends, loop):
    backend = backends.get(1, pipeline=True, running=1)  # serve.max_active_requests = 1: the second request waits

    async def run() -> tuple[Completion, Completion]:
        def request(n):
            return backend.make_request(
                prompt=PROMPT, params=SamplingParams(max_tokens=n, ignore_eos=True), mode=Mode.AR,
                draft_tokens=None, threshold=None,
            )

        async def drain(request_id, n):
            async for item in backend.stream(request_id, request(n)):
                if isinstance(item, Completion):
                    return item

        running = asyncio.ensure_future(drain("hold", ENDLESS))
        while "hold" not in backend._active or not backend._active["hold"].admitted:
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(drain("queued", 4))
        while "queued" not in backend._active or not backend._active["queued"].admitted:
            await asyncio.sleep(0.01)
        assert await backend.abort("queued")
        waited = await queued
        assert not running.done()
        assert await backend.abort("hold")
        return waited, await running

    waited, held = loop.run(run())
    assert waited.finish_reason is FinishReason.ABORT and waited.token_ids == []
    assert held.finish_reason is FinishReason.ABORT and 1 <= len(held.token_ids) < ENDLESS
    stats = _wait_empty(backend, loop)
    assert not any([stats["scheduler"], stats["draft"], *stats["target"]]), stats


def test_a_replayed_trace_accepts_alike_in_process_and_served(backends, loop, config, tmp_path):
    """decoding.replay_trace (GPU benchmarks on dummy weights): the scheduler replays a trace exactly as the
    in-process engine does, so served and in-process replayed outputs, provenance included, are equal."""
    from engine.trace import AcceptanceTrace

    path = tmp_path / "trace.json"
    AcceptanceTrace("test", "judge", 4, accepted=[4, 0, 2, 3, 1], judged=[1, 0, 2, 0, 0]).save(path)
    replayed = config.model_copy(update={"decoding": config.decoding.model_copy(update={"replay_trace": path})})
    engine = Engine.from_config(replayed)
    want = engine.generate(engine.make_request(prompt=PROMPT, params=SamplingParams(max_tokens=LONG), mode=Mode.STANDARD))
    assert [sum(p.name == "JUDGE" for p in want.provenance)] == [want.judge_accepted_tokens] and want.judge_accepted_tokens > 0
    backend = RayBackend(replayed)
    try:
        assert loop.run(backend.ready(), timeout=90)
        events, got = loop.run(_collect(backend, "replayed", max_tokens=LONG, mode=Mode.STANDARD))
    finally:
        backend.close()
    _assert_same(got, want, events)


def test_replayed_guesses_let_pipelining_reuse_its_blocks(loop, config, tmp_path, backends):
    """decoding.replay_guesses (pipelining measured on dummy weights): with a trace that accepts every block
    in full, each block drafted ahead counts as guessed right and is used by the next step."""
    from engine.trace import AcceptanceTrace

    path = tmp_path / "full.json"
    AcceptanceTrace("test", "standard", 4, accepted=[4] * 8, judged=[0] * 8).save(path)
    decoding = config.decoding.model_copy(update={"replay_trace": path, "replay_guesses": True})
    backend = RayBackend(config.model_copy(update={"decoding": decoding}))
    try:
        assert loop.run(backend.ready(), timeout=90)
        _, done = loop.run(_collect(backend, "guesses", max_tokens=LONG, mode=Mode.STANDARD, ignore_eos=True))
    finally:
        backend.close()
    assert done.pipelined_blocks > 2 and done.pipelined_blocks_used == done.pipelined_blocks
