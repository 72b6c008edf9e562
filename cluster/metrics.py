"""Prometheus metrics of the gRPC server, under the `judgeserve_` prefix, on their own HTTP port.

The speculative-decoding counters are vLLM's (spec_decode_num_drafts, _num_draft_tokens,
_num_accepted_tokens, _num_accepted_tokens_per_pos) so existing dashboards carry over; judgeserve adds
judge-accepted tokens (draft tokens the standard rule rejected and the judge accepted: the lossy part).
Latencies are vLLM's too: time to first token, inter-token latency (per streamed step, divided over its
tokens, since a speculative step emits several at once), end-to-end request latency; gauges count
running and waiting requests as the backend reports them.

All of it is fed from what the servicer already sees (StepEvents and the final Completion), so a
LocalBackend and the Ray backend are measured the same way. Each server has its own registry (tests
start many servers in one process).

Not for: the scheduler's per-phase timers (they travel in each Completion's timings).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.decode import Completion, StepEvent
from engine.verify import Provenance

PREFIX = "judgeserve"
# Buckets in seconds: from one GPU decode step (ms) to a long CPU generation (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_POSITIONS = 128  # decoding.draft_tokens' upper bound: the per-position counter's label range


class Metrics:
    """The server's metrics; `request()` gives the tracker of one stream."""

    def __init__(self, running_waiting=lambda: (0, 0)):
        self.registry = r = CollectorRegistry()
        self.drafts = Counter(f"{PREFIX}_spec_decode_num_drafts", "speculative steps (draft blocks verified)", registry=r)
        self.draft_tokens = Counter(f"{PREFIX}_spec_decode_num_draft_tokens", "draft tokens proposed", registry=r)
        self.accepted = Counter(
            f"{PREFIX}_spec_decode_num_accepted_tokens", "draft tokens accepted (matched or judged)", registry=r
        )
        self.accepted_per_pos = Counter(
            f"{PREFIX}_spec_decode_num_accepted_tokens_per_pos",
            "draft tokens accepted, by their position in the block (0 = first)",
            ["position"],
            registry=r,
        )
        self.judge_accepted = Counter(
            f"{PREFIX}_judge_accepted_tokens", "draft tokens accepted by the judge that standard verification rejected", registry=r
        )
        self.requests = Counter(f"{PREFIX}_requests", "finished requests, by finish reason and mode", ["finish_reason", "mode"], registry=r)
        self.refused = Counter(
            f"{PREFIX}_requests_refused",
            "requests refused (overload: RESOURCE_EXHAUSTED) or lost (unavailable: UNAVAILABLE) by the backend",
            ["reason"],
            registry=r,
        )
        self.generated = Counter(f"{PREFIX}_generation_tokens", "tokens streamed to clients", registry=r)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "request arrival to its first streamed token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "time between streamed steps, per token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "request arrival to its final message", buckets=LATENCY_BUCKETS, registry=r
        )
        running = Gauge(f"{PREFIX}_num_requests_running", "requests decoding now", registry=r)
        waiting = Gauge(f"{PREFIX}_num_requests_waiting", "requests queued for a decoding slot", registry=r)
        running.set_function(lambda: running_waiting()[0])
        waiting.set_function(lambda: running_waiting()[1])

    def serve_http(self, host: str, port: int) -> int:
        """Exposes /metrics on host:port (0 picks a free port); returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def request(self) -> "RequestMetrics":
        return RequestMetrics(self)


class RequestMetrics:
    """Observes one stream: call `step` per StepEvent relayed, `done` with its Completion."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.arrived = self.last = time.perf_counter()
        self.first = True

    def step(self, event: StepEvent) -> None:
        if not event.tokens:
            return
        now = time.perf_counter()
        if self.first:
            self.m.ttft.observe(now - self.arrived)
            self.first = False
        else:
            gap = (now - self.last) / len(event.tokens)
            for _ in event.tokens:
                self.m.itl.observe(gap)
        self.last = now
        self.m.generated.inc(len(event.tokens))
        # A speculative step streams its accepted draft tokens, then a correction or bonus: position i of
        # the block was accepted when i accepted tokens precede that final token.
        accepted = 0
        for p in event.provenance:
            if p in (Provenance.MATCHED, Provenance.JUDGE):
                accepted += 1
            elif p in (Provenance.CORRECTION, Provenance.BONUS):
                for pos in range(min(accepted, MAX_POSITIONS)):
                    self.m.accepted_per_pos.labels(position=str(pos)).inc()
                accepted = 0

    def done(self, completion: Completion) -> None:
        m = self.m
        m.e2e.observe(time.perf_counter() - self.arrived)
        m.requests.labels(finish_reason=completion.finish_reason.value, mode=completion.mode.value).inc()
        m.drafts.inc(completion.speculative_steps)
        m.draft_tokens.inc(completion.draft_tokens_proposed)
        m.accepted.inc(completion.draft_tokens_accepted)
        m.judge_accepted.inc(completion.judge_accepted_tokens)
